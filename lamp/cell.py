"""One cell of the grid: the retrieval and rendering settings that make a prompt."""

from dataclasses import dataclass

from lamp.data import SETTINGS
from lamp.errors import LampError
from lamp.prompts import MAX_PROMPT_TOKENS, Prompt, render_prompt
from lamp.recipes import get_recipe
from lamp.retrieval import ItemPool, retrieve
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
    recipe: str = "lamp"  # docs/design.md §7a: `lamp`, or `study` (the study's code, reproduced); see lamp.recipes
    setting: str = "user"  # whose files it reads: LaMP's user-based or time-based split (docs/design.md, setting)
    use_date: bool = False  # BM25 reads each item's date with its text, as LaMP's --use_date (§4)

    def check(self) -> None:
        """Refuses, in one line, a cell that cannot run."""
        if self.setting not in SETTINGS:
            raise LampError(f"unknown setting {self.setting!r}; valid: {', '.join(SETTINGS)}")
        get_recipe(self.recipe).check(self)

    @property
    def data(self) -> tuple:
        """The files it reads: its task's, in its setting."""
        return (self.task, self.setting)

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
                        input_retriever=self.input_retriever, output_retriever=self.output_retriever,
                        use_date=self.use_date)

    def render(self, example, counter, pool: ItemPool | None = None, max_tokens: int = MAX_PROMPT_TOKENS) -> Prompt:
        """A `lamp` cell's prompt for an example."""
        return render_prompt(get_task(self.task), example.input, self.retrieve(example, pool),
                             self.ablation, self.order, self.seed, example.id, counter, max_tokens)

    def render_split(self, examples: list, counter, max_tokens: int = MAX_PROMPT_TOKENS, pool: ItemPool | None = None,
                     train: list = (), dev: list = (), limit: int | None = None) -> list:
        """The prompts of a split's first `limit` examples, in file order. `lamp`'s
        other-user retrievers draw from `pool`, the split's ItemPool; `study` replays
        its draws over the whole split, other users' from the examples of train and dev."""
        recipe = get_recipe(self.recipe)
        items = recipe.retrieve(self, examples, limit, pool, train, dev)
        return recipe.prompts(self, examples[:limit], items, counter, max_tokens)
