"""Every benchmark of bench/ at a tiny size (a smoke run), so that none can rot: each
exits 0 and writes its result, with the fields BENCHMARKS.md reads, into the tests'
own directory (never bench/results/). The smoke runs go one after another beside the
other tests (tests/conftest.py); their tests, last, read what they left. The numbers
of a smoke run mean nothing."""

import functools
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lamp.data import find_splits, read_examples
from lamp.synth import write_synthetic
from tests.beside import Check
from tests.cli import ROOT

# Each benchmark's tiny size. scale_bench runs without its trial timings (step 3): a
# trial of each path is minutes here, and tests/test_run.py runs today's trials.
SMOKES = {"prepare_bench": ["--users", 8, "--profile-size", 20],
          "padding_bench": ["--users", 20, "--batches", 2, "--batch-size", 2],
          "trial_floor": ["--trials", 1],
          "order_bench": ["--smoke"],
          "scale_bench": ["--scale", 0.001, "--small-scale", 0.001, "--no-trials"],
          "embed_bench": ["--scale", 0.002]}


def run_bench(script: str, *args, timeout: float) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout, check=False)
    assert done.returncode == 0, f"{script} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@functools.cache  # one chain for all the tests below (each test's `beside` marker asks for it)
def start_smokes() -> Check:
    """Every benchmark's smoke run, one after another in one process group that starts
    with the session (tests/conftest.py): beside the other tests, one at a time, they
    fill the machine's idle moments without crowding it. Each leaves NAME.json,
    NAME.out (its stdout and stderr) and NAME.status in the check's folder."""
    folder = Path(tempfile.mkdtemp(prefix="lamp-bench-smokes-"))
    steps = [f"{shlex.join([sys.executable, f'bench/{name}.py', *map(str, args), '--out', str(folder / f'{name}.json')])}"
             f" > {folder / f'{name}.out'} 2>&1; echo $? > {folder / f'{name}.status'}" for name, args in SMOKES.items()]
    return Check(["bash", "-c", "\n".join(steps)], folder)


def smoke(check: Check, name: str) -> tuple:
    """(the result, what it printed) of one benchmark's smoke run, once the chain is done."""
    check.wait(3000)
    status, printed = (check.folder / f"{name}.status").read_text().strip(), (check.folder / f"{name}.out").read_text()
    assert status == "0", f"{name}.py exited {status}:\n{printed[-5000:]}"
    return json.loads((check.folder / f"{name}.json").read_text()), printed


@pytest.mark.slow
@pytest.mark.beside.with_args(start_smokes)
def test_prepare_bench_renders_the_same_prompts_both_ways(beside):
    result, _ = smoke(beside, "prepare_bench")
    assert result["examples"] == 8 and result["cells"] == 48  # 4 ablations x 4 orders x 3 k
    for field in ("study_way_s", "ours_prepare_s", "ours_render_s", "ours_total_s", "speedup",
                  "rank_bm25_loop_examples_per_s", "vectorized_bm25_examples_per_s",
                  "prepare_examples_ranked_per_s"):
        assert result[field] >= 0, field


def test_make_big_lamp3_writes_copies_with_unique_ids(tmp_path):
    write_synthetic(tmp_path / "src", ["LaMP_3"], users=10, seed=0)
    run_bench("make_big_lamp3.py", tmp_path / "src", tmp_path / "big", "--copies", 3, timeout=120)
    (source,) = [s for s in find_splits(tmp_path / "src", ["LaMP_3"]) if s.split == "train"]
    (big,) = find_splits(tmp_path / "big", ["LaMP_3"])
    originals, copies = list(read_examples(source)), list(read_examples(big))
    assert len(copies) == 3 * len(originals)
    assert len({e.id for e in copies}) == len(copies)
    assert [(e.input, e.output) for e in copies] == [(e.input, e.output) for e in originals] * 3


@pytest.mark.slow
@pytest.mark.beside.with_args(start_smokes)
def test_embed_bench_embeds_and_prepares_contriever(beside):
    result, _ = smoke(beside, "embed_bench")
    one, two = result["throughput"]
    assert (one["actors"], two["actors"]) == (1, 2) and one["items"] == two["items"] > 0
    assert one["items_per_s"] > 0 and two["items_per_s"] > 0 and one["actor_peak_rss_mb"] > 0
    for task in ("LaMP_2", "LaMP_4"):
        prepared = result["prepare"][task]
        assert prepared["examples"] > 0 and prepared["items"] > 0 and prepared["s"] > 0, task
        assert prepared["driver_peak_mb"] > 0 and prepared["embedder_peak_rss_mb"] > 0, task


@pytest.mark.slow
@pytest.mark.beside.with_args(start_smokes)
def test_padding_bench_trains_the_same_tokens_both_ways(beside):
    result, _ = smoke(beside, "padding_bench")
    assert result["batches"] == 2 and result["batch_size"] == 2
    assert 0 < result["prompt_tokens_mean"] <= result["prompt_tokens_max"] <= 512
    assert result["dynamic_tokens_per_s"] > 0 and result["pad_to_512_tokens_per_s"] > 0 and result["speedup"] > 0


@pytest.mark.slow
@pytest.mark.beside.with_args(start_smokes)
def test_trial_floor_times_an_empty_trial(beside):
    result, _ = smoke(beside, "trial_floor")
    assert result["trials"] == 1 and result["at_once"] >= 1
    for field in ("python_loop_s", "wall_s", "machine_cpu_s", "cpu_s_per_trial", "wall_s_per_trial",
                  "trials_s_for_12"):
        assert result[field] >= 0, field


@pytest.mark.slow
@pytest.mark.beside.with_args(start_smokes)
def test_order_bench_compares_a_checkout_with_itself(beside):
    result, _ = smoke(beside, "order_bench")
    assert result["baseline"] == "this checkout" and result["rounds"] == 1
    assert set(result["per_cell"]) == {"baseline", "this"}
    for runs in result["per_cell"].values():
        assert [len(run) for run in runs] == [1]  # one cell a run
    assert all(v > 0 for v in result["train_examples_per_s"].values()) and result["ratio_this_to_baseline"] > 0


@pytest.mark.slow
@pytest.mark.beside.with_args(start_smokes)
def test_scale_bench_renders_the_same_prompts_on_both_paths(beside):
    result, printed = smoke(beside, "scale_bench")
    assert result["prompts_checked"]["cells_compared"] == 19  # paper-fig-b's 18 and the LaMP_3 cell
    for group in ("fig_b", "lamp3", "k80", "all"):
        assert result["render"][group]["examples"] > 0 and result["render"][group]["speedup"] > 0, group
    assert "| all 19 cells |" in printed  # the markdown table BENCHMARKS.md takes
