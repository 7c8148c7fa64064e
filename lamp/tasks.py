"""The LaMP tasks, declared once as data (docs/design.md §1-3, §7-8).

Everything else looks a task up here: the loader checks profile items against
`item_fields`, the metrics read `kind` and `labels`, the retrievers extract the
query after `query_anchor`, and the prompt renderer fills the templates.
"""

from dataclasses import dataclass

from lamp.errors import LampError

LAMP_2_TAGS = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia",
    "dark comedy", "classic", "psychology", "fantasy", "romance",
    "thought-provoking", "social commentary", "violence", "true story",
)

NUMBER = (int, float)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    what: str
    # Keys every profile item must carry, with the JSON types each may take.
    item_fields: dict
    # Whether its profile items carry a `date` (LaMP's time-based files): what
    # Recency sorts by and `use_date` shows BM25 (docs/design.md §4).
    dated: bool
    # The two halves of a profile item (docs/design.md §3); LaMP_7 has no input half.
    input_half: str | None
    output_half: str
    # The task input as the data set writes it; `{}` is where the content goes
    # (LaMP_1 names its three slots).
    input_template: str
    # The query for BM25 is the text after this anchor (docs/design.md §4); LaMP_1 uses
    # the quoted titles instead and has no anchor.
    query_anchor: str | None
    kind: str  # "classification", "regression" or "generation"
    labels: tuple | None
    metrics: tuple  # LaMP's own keys, the main metric first
    higher_is_better: bool  # of the main metric
    epochs: int  # the study's default (docs/design.md §8)
    max_new_tokens: int
    # Prompt rendering (docs/design.md §7). A full item fills {input} and {output}; the
    # one-half ablations list the halves in quotes after a lead; the profile
    # block then precedes the task input, separated by `profile_joiner`
    # (LaMP_1 has none: its block goes after the paper's quoted title).
    item_template: str
    output_lead: str
    input_lead: str
    profile_joiner: str | None

    @property
    def main_metric(self) -> str:
        return self.metrics[0]


TASKS = {
    spec.name: spec
    for spec in (
        TaskSpec(
            name="LaMP_1",
            what="citation identification",
            item_fields={"id": (str, int), "title": str, "abstract": str},
            dated=True,
            input_half="abstract",
            output_half="title",
            input_template=(
                'For an author who has written the paper with the title "{title}", '
                "which reference is related? Just answer with [1] or [2] without "
                'explanation. [1]: "{ref1}" [2]: "{ref2}"'
            ),
            query_anchor=None,
            kind="classification",
            labels=("[1]", "[2]"),
            metrics=("accuracy", "f1"),
            higher_is_better=True,
            epochs=10,
            max_new_tokens=4,
            item_template='"{output}"',
            output_lead="",
            input_lead="",
            profile_joiner=None,
        ),
        TaskSpec(
            name="LaMP_2",
            what="movie tagging",
            item_fields={"id": (str, int), "description": str, "tag": str},
            dated=True,
            input_half="description",
            output_half="tag",
            input_template=(
                "Which tag does this movie relate to among the following tags? Just "
                "answer with the tag name without further explanation. tags: ["
                + ", ".join(LAMP_2_TAGS)
                + "] description: {}"
            ),
            query_anchor="description:",
            kind="classification",
            labels=LAMP_2_TAGS,
            metrics=("f1", "accuracy"),
            higher_is_better=True,
            epochs=10,
            max_new_tokens=8,
            item_template='the tag for the movie: "{input}" is "{output}"',
            output_lead="the tag for the previous movies are",
            input_lead="The previous movies are",
            profile_joiner=". ",
        ),
        TaskSpec(
            name="LaMP_3",
            what="product rating",
            item_fields={"id": (str, int), "text": str, "score": (str, *NUMBER)},
            dated=True,
            input_half="text",
            output_half="score",
            input_template=(
                "What is the score of the following review on a scale of 1 to 5? just "
                "answer with 1, 2, 3, 4, or 5 without further explanation. review: {}"
            ),
            query_anchor="review:",
            kind="regression",
            labels=("1", "2", "3", "4", "5"),
            metrics=("MAE", "RMSE"),
            higher_is_better=False,
            epochs=10,
            max_new_tokens=4,
            item_template='{output} is the score for "{input}"',
            output_lead="the score for the previous reviews are",
            input_lead="The previous reviews are",
            profile_joiner=". ",
        ),
        TaskSpec(
            name="LaMP_4",
            what="news headline generation",
            item_fields={"id": (str, int), "text": str, "title": str},
            dated=True,
            input_half="text",
            output_half="title",
            input_template="Generate a headline for the following article: {}",
            query_anchor="article:",
            kind="generation",
            labels=None,
            metrics=("rouge-L", "rouge-1"),
            higher_is_better=True,
            epochs=20,
            max_new_tokens=32,
            item_template='"{output}" is the title for "{input}"',
            output_lead="the title for the previous articles are",
            input_lead="The previous articles are",
            profile_joiner=". ",
        ),
        TaskSpec(
            name="LaMP_5",
            what="scholarly title generation",
            item_fields={"id": (str, int), "abstract": str, "title": str},
            dated=True,
            input_half="abstract",
            output_half="title",
            input_template="Generate a title for the following abstract of a paper: {}",
            query_anchor="paper:",
            kind="generation",
            labels=None,
            metrics=("rouge-L", "rouge-1"),
            higher_is_better=True,
            epochs=20,
            max_new_tokens=32,
            item_template='"{output}" is the title for "{input}"',
            output_lead="the title for the previous papers are",
            input_lead="The previous papers are",
            profile_joiner=". Following the given patterns ",
        ),
        TaskSpec(
            name="LaMP_7",
            what="tweet paraphrasing",
            item_fields={"id": (str, int), "text": str},
            dated=True,
            input_half=None,
            output_half="text",
            input_template=(
                "Paraphrase the following tweet without any explanation before or "
                "after it: {}"
            ),
            query_anchor=":",
            kind="generation",
            labels=None,
            metrics=("rouge-L", "rouge-1"),
            higher_is_better=True,
            epochs=20,
            max_new_tokens=48,
            item_template='"{output}"',
            output_lead="",
            input_lead="",
            profile_joiner=" are written by a person. Following the given patterns ",
        ),
    )
}

# Mean profile items per user, LaMP's own statistic rounded: the study's
# AVERAGE_NUM (Bingo-W/Personalisation-in-LLM, data_process/datasets.py at d498d21).
# The study samples that many users per example for RanBM25; synth draws
# profiles of that mean size.
LAMP_PROFILE_SIZE = {"LaMP_1": 91, "LaMP_2": 159, "LaMP_3": 188, "LaMP_4": 287, "LaMP_5": 90, "LaMP_7": 18}


def get_task(name: str) -> TaskSpec:
    """The spec of a task by name, or a clear error naming the valid ones."""
    if name in TASKS:
        return TASKS[name]
    if name == "LaMP_6":
        raise LampError(
            "LaMP_6 (email subject generation) is not public: its data is private "
            "Avocado e-mail and cannot be downloaded; valid tasks: " + ", ".join(TASKS)
        )
    raise LampError(f"unknown task {name!r}; valid tasks: " + ", ".join(TASKS))
