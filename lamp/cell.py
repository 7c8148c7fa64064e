"""One cell of the grid: the retrieval and rendering settings that make a prompt."""

from dataclasses import dataclass

from lamp.prompts import MAX_PROMPT_TOKENS, render_prompt
from lamp.retrieval import ItemPool, check_cell, retrieve
from lamp.tasks import get_task


@dataclass(frozen=True)
class Cell:
    task: str
    retriever: str = "none"
    k: int | float = 0
    ablation: str = "both"
    order: str = "start"
    rank_offset: int = 0
    seed: int = 0
    input_retriever: str | None = None
    output_retriever: str | None = None

    def check(self) -> None:
        """Refuses, in one line, a cell that cannot run."""
        check_cell(self.task, self.retriever, self.k, self.ablation, self.order, self.rank_offset,
                   self.input_retriever, self.output_retriever)

    @property
    def needs_pool(self) -> bool:
        """Whether the cell draws other users' items, and so needs the split's ItemPool."""
        sides = {self.retriever, self.input_retriever, self.output_retriever}
        return bool(sides & {"Full_Random", "RanBM25"})

    def retrieve(self, example, pool: ItemPool | None = None) -> list:
        """The profile items the cell shows for an example, most relevant first."""
        return retrieve(self.task, example, self.retriever, self.k, ablation=self.ablation,
                        rank_offset=self.rank_offset, seed=self.seed, pool=pool,
                        input_retriever=self.input_retriever, output_retriever=self.output_retriever)

    def render(self, example, tokens, pool: ItemPool | None = None, max_tokens: int = MAX_PROMPT_TOKENS) -> tuple:
        """(prompt, items in prompt order) for an example."""
        return render_prompt(get_task(self.task), example.input, self.retrieve(example, pool),
                             self.ablation, self.order, self.seed, example.id, tokens, max_tokens)
