import pytest

from lamp.tasks import TASKS
from lamp.vote import vote

LAMP_1_INPUT = TASKS["LaMP_1"].input_template.format(
    title="Some paper", ref1="graph neural networks for molecules", ref2="speech recognition with transformers")


def paper(title, abstract=""):
    return {"id": title, "title": title, "abstract": abstract}


def test_lamp_1_picks_the_reference_closer_to_the_profile():
    speech = [paper("end-to-end speech models", "we study recognition of speech")]
    assert vote("LaMP_1", LAMP_1_INPUT, speech) == "[2]"
    graphs = [paper("molecules as graphs", "neural message passing")]
    assert vote("LaMP_1", LAMP_1_INPUT, graphs) == "[1]"
    # Distinct tokens count once: "speech speech speech" is one shared token.
    many = [paper("speech speech speech", ""), paper("graph neural", "")]
    assert vote("LaMP_1", LAMP_1_INPUT, many) == "[1]"


def test_lamp_1_ties_and_nothing_go_to_1():
    assert vote("LaMP_1", LAMP_1_INPUT, [paper("neural", "recognition")]) == "[1]"
    assert vote("LaMP_1", LAMP_1_INPUT, [paper("speech", "")]) == "[2]"  # the tie rule is not a constant
    assert vote("LaMP_1", LAMP_1_INPUT, []) == "[1]"


def tags(*values):
    return [{"id": str(i), "description": "d", "tag": t} for i, t in enumerate(values)]


def test_lamp_2_majority_and_tie_to_the_higher_ranked():
    assert vote("LaMP_2", "", tags("comedy", "action", "action")) == "action"
    assert vote("LaMP_2", "", tags("comedy", "action", "comedy", "action")) == "comedy"
    assert vote("LaMP_2", "", tags("action", "comedy", "action", "comedy")) == "action"
    assert vote("LaMP_2", "", []) == "sci-fi"


def scores(*values):
    return [{"id": str(i), "text": "t", "score": s} for i, s in enumerate(values)]


@pytest.mark.parametrize("values, expected", [
    ((4, 4.0, "5"), "4"),  # numbers and strings of one score count together
    (("5", 4, 5.0, "4.0"), "5"),  # tie: the higher-ranked
    ((2, 5, 5), "5"),
    ((3.5,), "3.5"),
    ((5.0,), "5"),  # returned in string form
    ((4.0, "4", 5), "4"),
    (("4.0", 5, "4"), "4"),
    ((), "3"),
])
def test_lamp_3_majority_of_scores(values, expected):
    assert vote("LaMP_3", "", scores(*values)) == expected


@pytest.mark.parametrize("task, half", [("LaMP_4", "title"), ("LaMP_5", "title"), ("LaMP_7", "text")])
def test_generation_copies_the_top_item(task, half):
    items = [{"id": "1", "text": "first text", "abstract": "a", "title": "first title"},
             {"id": "2", "text": "second", "abstract": "b", "title": "second"},
             {"id": "3", "text": "second", "abstract": "c", "title": "second"}]
    assert vote(task, "", items) == items[0][half]
    assert vote(task, "", []) == ""
