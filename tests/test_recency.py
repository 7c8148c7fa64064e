"""LaMP's own baselines beside the study's axes: the Recency retriever, `use_date`
and the time-based setting, from the date a profile item carries to the cell key
a grid names it by."""

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
from rank_bm25 import BM25Okapi

from grid.run import splits_by_data
from grid.examples import load_examples
from grid.shards import prepare, ranking_name
from grid.spec import GridCell, parse_grid
from lamp.cell import Cell
from lamp.data import Example, find_splits
from lamp.errors import LampError
from lamp.retrieval import (
    check_cell,
    check_dated,
    check_dates,
    date_key,
    document_text,
    rank,
    retrieve,
)
from lamp.synth import write_synthetic
from lamp.tasks import get_task
from tests.cli import call_cli

QUERY = "Which tag does this movie relate to among the following tags? Just answer with the tag name " \
        "without further explanation. tags: [sci-fi] description: {}"


def movie(id, date, description="a b c", tag="comedy"):
    item = {"id": id, "description": description, "tag": tag}
    return item if date is None else {**item, "date": date}


def example(profile, text="x y z", id="q0"):
    return Example(id=id, user=id, input=QUERY.format(text), profile=profile, output=None)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """Synthetic LaMP_2 in both layouts, in one directory."""
    out = tmp_path_factory.mktemp("layouts")
    for setting in ("user", "time"):
        write_synthetic(out, tasks=["LaMP_2"], users=30, seed=3, setting=setting)
    return out


# ----------------------------------------------------------------------------- dates


@pytest.mark.parametrize("date, key", [("2013-05-21", (2013, 5, 21)), ("2009", (2009,)), (2009, (2009,)),
                                       ("2013-5-1", (2013, 5, 1)), ("2013-05", (2013, 5))])
def test_dates_are_read_as_lamps_code_reads_them(date, key):
    assert date_key(date) == key


@pytest.mark.parametrize("date", ["May 2013", "2013/05/21", "", "2013-05-", "21.05.2013"])
def test_a_date_that_is_not_integers_joined_by_dashes_is_not_read(date):
    with pytest.raises(ValueError):
        date_key(date)


def test_recency_ranks_newest_first_and_ties_by_id():
    profile = [movie("7", "2010-05-01"), movie("3", "2012"), movie("12", "2012-01-01"), movie("5", "2010-05-01"),
               movie("1", "2009-12-31"), movie("2", "2012-01-01")]
    ranked = [item["id"] for item in rank("LaMP_2", example(profile), "Recency").items]
    # (2012, 1, 1) is after (2012,), as LaMP's tuples compare; ties by id, as strings.
    assert ranked == ["12", "2", "3", "5", "7", "1"]
    # The profile's order changes nothing.
    assert [item["id"] for item in rank("LaMP_2", example(profile[::-1]), "Recency").items] == ranked


def test_recency_drops_the_query_item_and_takes_any_window():
    profile = [movie(str(n), f"2010-01-{n + 1:02d}", description=f"movie {n}") for n in range(10)]
    ranked = [f"{n}" for n in range(9, -1, -1)]
    leaked = example(profile, text="movie 9")  # the item the question was made from
    assert [item["id"] for item in rank("LaMP_2", leaked, "Recency").items] == ranked[1:]
    newest = example(profile)
    assert [item["id"] for item in retrieve("LaMP_2", newest, "Recency", 3, rank_offset=2)] == ranked[2:5]
    assert [item["id"] for item in retrieve("LaMP_2", newest, "Recency", 0.5)] == ranked[:5]
    for ablation in ("both", "only_output", "decouple", "only_input"):
        for order in ("start", "end", "middle", "random"):
            check_cell("LaMP_2", "Recency", 0.5, ablation, order, rank_offset=1)
    assert [item["id"] for item in retrieve("LaMP_2", newest, "Recency", 3, ablation="decouple")] == ranked[:3]


def test_a_task_whose_items_carry_no_date_is_refused_with_the_task_named():
    undated = replace(get_task("LaMP_4"), dated=False)
    with pytest.raises(LampError, match="^LaMP_4's profile items carry no date: Recency ranks by it$"):
        check_dated(undated, "Recency", False)
    with pytest.raises(LampError, match="^LaMP_4's profile items carry no date: use_date"):
        check_dated(undated, "BM25", True)
    check_dated(undated, "BM25", False)
    check_dated(get_task("LaMP_4"), "Recency", False)


def test_use_date_is_for_text_rankers_and_the_lamp_recipe():
    check_cell("LaMP_2", "BM25", 2, use_date=True)
    check_cell("LaMP_2", "Mixed", 2, input_retriever="BM25", output_retriever="Random", use_date=True)
    with pytest.raises(LampError, match="Random reads no text"):
        check_cell("LaMP_2", "Random", 2, use_date=True)
    with pytest.raises(LampError, match="recipe study has no Recency"):
        Cell("LaMP_2", "Recency", 2, recipe="study").check()
    with pytest.raises(LampError, match="unknown setting 'weekly'; valid: user, time"):
        Cell("LaMP_2", "Recency", 2, setting="weekly").check()


def test_an_item_without_a_readable_date_is_named_by_file_example_item_and_field():
    with pytest.raises(LampError) as error:
        check_dates("dev_questions.json", "q9", [movie("1", "2010"), movie("44", "last week")], parsed=True)
    assert str(error.value) == ("dev_questions.json: id 'q9': field 'profile[1].date': item '44': date 'last week' "
                                "is not whole numbers joined by '-' (LaMP's dates: 2013-05-21, 2009)")
    with pytest.raises(LampError, match=r"^f.json: id 'q9': field 'profile\[0\].date': item '3' has no date"):
        check_dates("f.json", "q9", [movie("3", None)], parsed=False)
    check_dates("f.json", "q9", [movie("3", "last week")], parsed=False)  # use_date shows it as it is


def test_recency_on_undated_files_is_refused_before_any_work(layouts, tmp_path):
    done = call_cli("render", "--data", layouts, "--task", "LaMP_2", "--retriever", "Recency", "--k", "2")
    assert done.returncode == 2 and done.stdout == ""
    (first,) = [e for e in load_questions(layouts / "LaMP_2" / "dev")][:1]
    assert (f"lamp-grid render: error: {layouts / 'LaMP_2' / 'dev' / 'dev_questions.json'}: id {first['id']!r}: "
            f"field 'profile[0].date': item {first['profile'][0]['id']!r} has no date") in done.stderr
    # prepare refuses them before it starts Ray (no cluster runs in this test) or writes a ranking.
    with pytest.raises(LampError, match=r"train_questions.json: id '\d+': field 'profile\[0\].date'"):
        prepare(layouts, tmp_path, retrievers=["Recency"], settings=["user"], log=lambda _: None)
    assert not [p for p in tmp_path.rglob("Recency*")]


def test_an_unreadable_date_in_the_files_is_refused_by_prepare_naming_it(tmp_path):
    write_synthetic(tmp_path / "data", tasks=["LaMP_7"], users=10, seed=1, setting="time")
    path = tmp_path / "data" / "time" / "LaMP_7" / "train" / "train_questions.json"  # the first split ranked
    questions = json.loads(path.read_text())
    questions[1]["profile"][2]["date"] = "last week"
    path.write_text(json.dumps(questions))
    item = questions[1]["profile"][2]["id"]
    # Before Ray starts: no cluster runs in this test.
    with pytest.raises(LampError) as error:
        prepare(tmp_path / "data", tmp_path / "cache", retrievers=["Recency"], settings=["time"], log=lambda _: None)
    assert str(error.value) == (f"{path}: id {questions[1]['id']!r}: field 'profile[2].date': item {item!r}: date "
                                "'last week' is not whole numbers joined by '-' (LaMP's dates: 2013-05-21, 2009)")


def load_questions(folder):
    return json.loads((folder / f"{folder.name}_questions.json").read_text())


# ----------------------------------------------------------------------------- use_date


def test_use_date_appends_the_date_as_lamps_corpus_does():
    item = {"id": "1", "text": "an article", "title": "a title", "date": "2012-04-06"}
    assert document_text("LaMP_4", item, use_date=True) == "an article a title date: 2012-04-06"
    assert document_text("LaMP_4", item, by_input=True, use_date=True) == "an article date: 2012-04-06"
    assert document_text("LaMP_4", item) == "an article a title"
    assert document_text("LaMP_7", {"id": "2", "text": "a tweet", "date": "2009"}, use_date=True) == \
        "a tweet date: 2009"


def test_use_date_ranks_by_bm25_over_the_dated_texts():
    profile = [movie("1", "2011-01-01", "x y"), movie("2", "2015-03-03", "x y"), movie("3", "2012", "y z")]
    query = example(profile, text="x 2015-03-03")
    for use_date, dated in ((True, " date: {date}"), (False, "")):
        corpus = [f"{{description}} {{tag}}{dated}".format(**item).split() for item in profile]
        expected = BM25Okapi(corpus).get_scores("x 2015-03-03".split())
        ranking = rank("LaMP_2", query, "BM25", use_date=use_date)
        assert [item["id"] for item in ranking.items] == [profile[i]["id"] for i in np.argsort(-expected,
                                                                                                kind="stable")]
        assert ranking.scores.tolist() == sorted(expected.tolist(), reverse=True)
        # Only with dates does the one item whose date the query names come first.
        assert (ranking.items[0]["id"] == "2") == use_date


# ----------------------------------------------------------------------------- the setting axis


def test_default_setting_and_use_date_leave_keys_and_params_as_they_were():
    cell = GridCell(Cell("LaMP_2", "BM25", 4), "tiny")
    assert cell.key == "LaMP_2/lamp/BM25/k=4/both/start/offset=0/seed=0/tiny"
    assert "setting" not in cell.params() and "use_date" not in cell.params()
    assert cell.description == ("LaMP_2, recipe lamp, model tiny, seed 0: k=4 profile item(s) by BM25; "
                                "whole items shown; most relevant first.")
    dated = GridCell(Cell("LaMP_2", "BM25", 4, setting="time", use_date=True), "tiny")
    assert dated.key == "LaMP_2/time/lamp/BM25+date/k=4/both/start/offset=0/seed=0/tiny"
    assert dated.arm == "LaMP_2/time/lamp/BM25+date/k=4/both/start/offset=0/tiny"
    assert dated.params()["setting"] == "time" and dated.params()["use_date"] is True
    for grid_cell in (cell, dated, GridCell(Cell("LaMP_2", "none", setting="time"), "tiny")):
        params = {name: str(value) for name, value in grid_cell.params().items()}
        assert GridCell.from_params(params, "run") == grid_cell


def test_a_grid_with_both_settings_has_cells_on_both():
    grid = parse_grid({"name": "g", "tasks": ["LaMP_2"], "axes": [
        {"setting": ["user", "time"], "retriever": ["none", "Recency"], "use_date": [False], "k": [1]},
        {"setting": ["time"], "retriever": ["BM25"], "use_date": [False, True], "k": [1]}]}, "test")
    keys = [c.key for c in grid.cells()]
    assert keys == ["LaMP_2/lamp/none/seed=0/tiny", "LaMP_2/lamp/Recency/k=1/both/start/offset=0/seed=0/tiny",
                    "LaMP_2/time/lamp/none/seed=0/tiny",
                    "LaMP_2/time/lamp/Recency/k=1/both/start/offset=0/seed=0/tiny",
                    "LaMP_2/time/lamp/BM25/k=1/both/start/offset=0/seed=0/tiny",
                    "LaMP_2/time/lamp/BM25+date/k=1/both/start/offset=0/seed=0/tiny"]
    assert {c.cell.data for c in grid.cells()} == {("LaMP_2", "user"), ("LaMP_2", "time")}


# ----------------------------------------------------------------------------- synth's time-based layout


def test_synth_writes_a_time_based_layout_of_the_same_users(layouts, tmp_path):
    found = {(s.setting, s.split) for s in find_splits(layouts)}
    assert found == {("user", "train"), ("user", "dev"), ("time", "train"), ("time", "dev")}
    for split in ("train", "dev"):
        users, timed = load_questions(layouts / "LaMP_2" / split), load_questions(layouts / "time" / "LaMP_2" / split)
        assert [q["id"] for q in timed] == [q["id"] for q in users]
        for user, question in zip(users, timed):
            assert all("date" not in item for item in user["profile"])
            assert [{k: v for k, v in item.items() if k != "date"} for item in question["profile"]] == user["profile"]
            dates = [date_key(item["date"]) for item in question["profile"]]
            assert len(question["date"]) == 10 and all(date_key(question["date"]) > d for d in dates)
    # The user-based files are the same bytes whether or not the time-based ones are written.
    write_synthetic(tmp_path, tasks=["LaMP_2"], users=30, seed=3)
    for split in ("train", "dev"):
        for name in (f"{split}_questions.json", f"{split}_outputs.json"):
            assert (tmp_path / "LaMP_2" / split / name).read_bytes() == \
                (layouts / "LaMP_2" / split / name).read_bytes()


def test_synth_command_writes_the_settings_asked(tmp_path):
    done = call_cli("synth", "--out", tmp_path, "--tasks", "LaMP_7", "--users", "10", "--setting", "user", "time")
    assert done.returncode == 0, done.stderr
    assert "wrote synthetic time-based LaMP data for LaMP_7" in done.stdout
    assert {s.setting for s in find_splits(tmp_path)} == {"user", "time"}


# ----------------------------------------------------------------------------- prepare


def test_prepare_ranks_recency_once_into_the_cache(layouts, tmp_path, ray_local):
    messages = []
    shards = prepare(layouts, tmp_path, retrievers=["Recency", "BM25"], use_date=True, settings=["time"],
                     by_input=False, log=messages.append)
    assert {s.setting for s in shards} == {"time"}
    assert "prepare: 8 shard(s) computed" in messages[-1]  # examples, Recency, BM25, BM25_date, per split
    dev = splits_by_data(shards)["LaMP_2", "time"]["dev"]
    assert set(dev.rankings) == {("Recency", None), ("BM25", None), ("BM25_date", None)}
    assert ranking_name("BM25", False, True) == "BM25_date" and ranking_name("Recency", True, True) == "Recency"
    examples = load_examples(dev.examples)
    ranked = [Cell("LaMP_2", "Recency", 1000, setting="time").retrieve(e) for e in examples]
    stored = pq.read_table(f"{dev.ranking('Recency', 0)}/ranking.parquet").to_pylist()
    assert [[examples[row["row"]].profile[p]["id"] for p in row["cand_pos"]] for row in stored] == \
        [[item["id"] for item in items] for items in ranked]
    again = []
    assert prepare(layouts, tmp_path, retrievers=["Recency", "BM25"], use_date=True, settings=["time"],
                   by_input=False, log=again.append) == shards
    assert again[-1].startswith("prepare: 0 shard(s) computed, 8 already cached")


def test_render_shows_the_newest_items_of_the_time_based_files(layouts):
    done = call_cli("render", "--data", layouts, "--task", "LaMP_2", "--setting", "time", "--retriever", "Recency",
                    "--k", "3", "--limit", "4", "--json")
    assert done.returncode == 0, done.stderr
    questions = load_questions(layouts / "time" / "LaMP_2" / "dev")
    for question, row in zip(questions, map(json.loads, done.stdout.splitlines())):
        newest = sorted(question["profile"], key=lambda item: (item["id"]))
        newest = sorted(newest, key=lambda item: date_key(item["date"]), reverse=True)[:3]
        assert row["id"] == question["id"] and row["retrieved"] == [item["id"] for item in newest]


# ----------------------------------------------------------------------------- a grid on both settings


@pytest.mark.slow
def test_a_grid_on_both_settings_runs_each_cell_on_its_layout(tmp_path, ray_local):
    from mlflow.tracking import MlflowClient

    from grid.run import Workdir, run_grid

    spec = parse_grid({"name": "settings", "tasks": ["LaMP_2"], "model": "vote", "axes": [
        {"setting": ["user"], "retriever": ["none", "BM25"], "k": [3]},
        {"setting": ["time"], "retriever": ["none", "Recency"], "k": [3]},
        {"setting": ["time"], "retriever": ["BM25"], "use_date": [True], "k": [3]}]}, "test")
    messages = []
    rows = run_grid(spec, "synthetic", tmp_path, users=40, log=messages.append)
    assert [r.status for r in rows] == ["FINISHED"] * 5
    assert any(m.startswith("writing synthetic time-based data for LaMP_2") for m in messages)
    client = MlflowClient(Workdir(tmp_path).tracking_uri)
    params = {r.cell.key: client.get_run(r.run_id).data.params for r in rows}
    assert "setting" not in params["LaMP_2/lamp/BM25/k=3/both/start/offset=0/seed=0/vote"]
    dated = params["LaMP_2/time/lamp/BM25+date/k=3/both/start/offset=0/seed=0/vote"]
    assert dated["setting"] == "time" and dated["use_date"] == "True"
    # Each cell read its own layout's dev split: the time-based cells the dated copy.
    sources = {r.cell.key: client.get_run(r.run_id).data.tags["data_fingerprint"] for r in rows}
    assert len({sources[r.cell.key] for r in rows if r.cell.cell.setting == "time"}) == 1
    assert sources["LaMP_2/lamp/none/seed=0/vote"] != sources["LaMP_2/time/lamp/none/seed=0/vote"]
    done = call_cli("report", "--experiment", "settings", "--workdir", tmp_path, "--out", tmp_path / "report")
    assert done.returncode == 0, done.stderr
    recency = next(line for line in done.stdout.splitlines() if "/time/lamp/Recency/" in line)
    assert "(baseline)" not in recency and "(no `none` cell" not in recency  # compared with time's `none`
