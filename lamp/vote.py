"""A baseline that needs no training: answer from the retrieved items alone.

- LaMP_2, LaMP_3: the most frequent output half (tag, score) among the
  retrieved items; a tie goes to the value seen first, i.e. the higher-ranked.
- LaMP_4, LaMP_5, LaMP_7: the output half of the top-ranked item, copied.
- LaMP_1: its output half is a paper title, not a label, so it cannot be
  counted. Instead: the reference, [1] or [2], whose quoted title shares more
  distinct whitespace tokens with the retrieved items' titles and abstracts,
  i.e. the one that looks more like what the author writes about; ties to [1].

With nothing retrieved (k = 0) the answer is a fixed, non-personalized default:
"" for generation; "[1]" for LaMP_1 (the tie rule); the first label,
"sci-fi", for LaMP_2 (no label is favoured without data, so take the list's
first); "3" for LaMP_3, the middle of the 1..5 scale, which bounds the
absolute error at 2 whatever the gold is.
"""

from collections import Counter

from lamp.retrieval import lamp_1_titles
from lamp.tasks import get_task

DEFAULTS = {"LaMP_1": "[1]", "LaMP_2": "sci-fi", "LaMP_3": "3"}


def score_text(value) -> str:
    """A LaMP_3 score as one string: 4, 4.0 and "4" are all "4"."""
    try:
        number = float(value)
    except ValueError:
        return str(value).strip()
    return str(int(number)) if number.is_integer() else str(number)


def vote(task: str, input_text: str, retrieved: list[dict]) -> str:
    """The prediction for one example from its retrieved items, most relevant first."""
    spec = get_task(task)
    if task == "LaMP_1":
        return _closer_reference(input_text, retrieved)
    outputs = [item[spec.output_half] for item in retrieved]
    if spec.kind == "generation":
        return str(outputs[0]) if outputs else ""
    if not outputs:
        return DEFAULTS[task]
    outputs = [score_text(o) if task == "LaMP_3" else str(o).strip() for o in outputs]
    return Counter(outputs).most_common(1)[0][0]  # equal counts keep first-seen (rank) order


def _closer_reference(input_text: str, retrieved: list[dict]) -> str:
    _, ref_1, ref_2 = lamp_1_titles(input_text)
    seen = {t for item in retrieved for t in f"{item['title']} {item['abstract']}".split()}
    shared_1, shared_2 = (len(set(ref.split()) & seen) for ref in (ref_1, ref_2))
    return "[2]" if shared_2 > shared_1 else "[1]"
