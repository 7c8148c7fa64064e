"""The `lamp` recipe (docs/design.md §5-7), ours: every retriever ranks a split's candidates
once and a cell selects a window of the rankings (lamp/retrieval.py); its prompts
fit a hard token budget, the task input whole (lamp/prompts.py)."""

from lamp.prompts import render_prompts
from lamp.retrieval import check_cell
from lamp.tasks import get_task


class LampRecipe:
    """Ours: the Recipe of lamp.recipes."""

    name = "lamp"
    reads_rankings = True
    seeds_every_render = False  # only random draws and the random order take the seed (grid.render.prompt_seed)

    def check(self, cell) -> None:
        check_cell(cell.task, cell.retriever, cell.k, cell.ablation, cell.order, cell.rank_offset,
                   cell.input_retriever, cell.output_retriever, use_date=cell.use_date)

    def retrieve(self, cell, examples: list, limit: int | None = None, pool=None, train: list = (),
                 dev: list = ()) -> list:
        """The items of examples[:limit], most relevant first; other users' items from
        `pool`, the split's own ItemPool."""
        return [cell.retrieve(example, pool) for example in examples[:limit]]

    def prompts(self, cell, examples: list, items: list, counter, max_tokens: int) -> list:
        cases = [(example.id, example.input, shown) for example, shown in zip(examples, items)]
        return render_prompts(get_task(cell.task), cases, cell.ablation, cell.order, cell.seed, counter, max_tokens)

    def prompt_tokens(self, decoder_only: bool, max_tokens: int) -> int:
        return max_tokens

    def model_inputs(self, tokenizer, task: str, prompts: list, max_tokens: int, decoder_only: bool) -> tuple:
        """Prompts fit their budget as built: the model reads them whole."""
        return prompts, tokenizer(prompts)["input_ids"]

    def decoding(self, task: str, beams: int, decoder_only: bool) -> dict:
        return {"num_beams": beams, "max_new_tokens": get_task(task).max_new_tokens}

    def answer(self, generated: str, decoder_only: bool) -> str:
        return generated.strip()
