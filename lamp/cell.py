"""One cell of the grid: the retrieval and rendering settings that make a prompt."""

from dataclasses import dataclass

from lamp.errors import LampError
from lamp.prompts import MAX_PROMPT_TOKENS, Prompt, render_prompt
from lamp.retrieval import ItemPool, check_cell, retrieve
from lamp.study import CHAT_TOKENS, Replay, chat_input, study_prompt
from lamp.tasks import get_task


@dataclass(frozen=True)
class Cell:
    task: str
    retriever: str = "none"
    k: int | float = 0
    ablation: str = "both"
    order: str = "start"
    rank_offset: int | float = 0
    seed: int = 0
    input_retriever: str | None = None
    output_retriever: str | None = None
    recipe: str = "lamp"  # SPEC §7a: `lamp`, or `study` (the study's code, reproduced)

    def check(self) -> None:
        """Refuses, in one line, a cell that cannot run."""
        check_cell(self.task, self.retriever, self.k, self.ablation, self.order, self.rank_offset,
                   self.input_retriever, self.output_retriever, self.recipe)

    @property
    def needs_pool(self) -> bool:
        """Whether the cell draws other users' items, and so needs the split's ItemPool
        (the study recipe: train's and dev's examples)."""
        sides = {self.retriever, self.input_retriever, self.output_retriever}
        return bool(sides & {"Full_Random", "RanBM25"})

    def retrieve(self, example, pool: ItemPool | None = None) -> list:
        """The profile items a `lamp` cell shows for an example, most relevant first."""
        return retrieve(self.task, example, self.retriever, self.k, ablation=self.ablation,
                        rank_offset=self.rank_offset, seed=self.seed, pool=pool,
                        input_retriever=self.input_retriever, output_retriever=self.output_retriever)

    def render(self, example, tokens, pool: ItemPool | None = None, max_tokens: int = MAX_PROMPT_TOKENS) -> Prompt:
        """A `lamp` cell's prompt for an example."""
        return render_prompt(get_task(self.task), example.input, self.retrieve(example, pool),
                             self.ablation, self.order, self.seed, example.id, tokens, max_tokens)

    def render_split(self, examples: list, tokens, max_tokens: int = MAX_PROMPT_TOKENS, pool: ItemPool | None = None,
                     train: list = (), dev: list = (), limit: int | None = None) -> list:
        """The prompts of a split's first `limit` examples, in file order. `study`
        replays its draws over the whole split; its other-user retrievers draw from
        the examples of train and dev."""
        if self.recipe == "lamp":
            return [self.render(example, tokens, pool, max_tokens) for example in examples[:limit]]
        tokenizer = study_tokenizer(tokens)
        drawn = Replay(self, train, dev).split(examples)
        return [study_prompt(self.task, example.input, items, self.ablation, tokenizer, max_tokens)
                for example, items in zip(examples[:limit], drawn)]


def study_tokenizer(tokens):
    """The study cut its prompts with the model's own tokenizer: there is no study prompt without one."""
    if not hasattr(tokens, "tokenizer"):
        raise LampError("recipe study builds its prompts with a model's tokenizer: name a model (--model)")
    return tokens.tokenizer


def model_inputs(tokenizer, task: str, recipe: str, prompts: list, max_tokens: int, decoder_only: bool) -> tuple:
    """(texts, token ids): what the model reads. `lamp` prompts fit their budget as
    built; `study` prompts are cut to max_tokens by the tokenizer, as the study's
    were, and a decoder-only model reads them as the study's Llama-2-7b-chat did."""
    if recipe != "study":
        return prompts, tokenizer(prompts)["input_ids"]
    if decoder_only:
        texts = [chat_input(task, prompt, tokenizer) for prompt in prompts]
        return texts, tokenizer(texts)["input_ids"]
    return prompts, tokenizer(prompts, max_length=max_tokens, truncation=True)["input_ids"]


def prompt_tokens(recipe: str, decoder_only: bool, max_tokens: int) -> int:
    """The input length prompts are built for: the study built its Llama-2 prompts for 3000 tokens."""
    return CHAT_TOKENS if recipe == "study" and decoder_only else max_tokens
