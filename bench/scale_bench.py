"""Benchmark: rendering at LaMP's sizes, today's path (a baseline revision) against the new one.

On synthetic data at LaMP's own sizes (`synth --like-lamp --scale F`: LaMP_2,
and LaMP_3 at --lamp3-scale), written once, measured in one run:

1. `prepare` (conversion + BM25 rankings), once per task: the same step on both paths.
2. Rendering paper-fig-b's 18 LaMP_2 cells (BM25, ablation both and only_output,
   k in 1..80; recipe lamp) and one LaMP_3 cell (BM25 k=4, both), train and dev,
   with the tiny model's tokenizer:
   - old: the baseline revision (--baseline-rev, default da8be0f), checked out as a
     git worktree and run in a subprocess with PYTHONPATH on it. It prepares its
     own cache from the same data, then times `grid.shards.cell_table` per cell and
     split in one process, as each Tune trial driver did.
   - new: this tree's `grid.render.render_grid` over the same cells on local Ray
     (a Ray Data pipeline, batched tokenization, one Parquet file per cell and split);
     the k=80 `both` cell also alone (a cache of its own) and, for reference,
     rendered in-process by this tree's `grid.render.cell_table`.
   Each path runs in one fresh process (prepare, then rendering).
   Peak RSS: each process's VmHWM (reset through /proc/self/clear_refs before each
   phase; ru_maxrss for the whole process) and, for the new path, the renderer
   actors' VmHWM (Ray workers whose command line names RenderCells, polled).
   The prompts of every cell and split must be the same on both paths (compared
   by hash; the k=80 cell row by row): the run fails loudly if not.
3. A trial's start to its first training step (MLflow's
   `trial_start_to_first_step_s`), old vs new, at two data sizes (--small-scale and
   --scale): a 1-cell grid (LaMP_2, BM25 k=4, the tiny model, 1 epoch, small
   limit_dev) run by each tree's `grid.run.run_grid` (one process per path, both
   sizes; at --scale the caches prepared above are reused). The new path renders before
   its trials, so its figure excludes rendering by design; the old one renders in
   the trial.

The machine is shared and noisy: compare the two paths within one run.

    python bench/scale_bench.py [--scale 0.05] [--small-scale 0.02] [--lamp3-scale F]
                                [--baseline-rev da8be0f] [--out bench/results/scale.json]
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory_peaks import ProcessPeaks, max_rss_mb, peak_mb, reset_peak  # bench/: scripts run from bench/
from report import write_result

REPO = Path(__file__).resolve().parent.parent
FIG_B_K = (1, 2, 3, 4, 16, 32, 48, 64, 80)
FIG_B_ABLATIONS = ("both", "only_output")
SPLITS = ("train", "dev")
MAX_TOKENS = 512  # the grids' default prompt budget (Training.max_prompt_tokens)
K80 = "LaMP_2/k=80/both"


# --- helpers shared by the parent and its children (stdlib only at import time) ---------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prompts_digest(prompts: list) -> str:
    h = hashlib.blake2b(digest_size=12)
    for prompt in prompts:
        h.update(prompt.encode())
        h.update(b"\0")
    return h.hexdigest()


def cell_specs() -> list:
    """(label, Cell fields) of the cells rendered: paper-fig-b's 18, and the LaMP_3 one."""
    cells = [(f"LaMP_2/k={k}/{ablation}", dict(task="LaMP_2", retriever="BM25", k=k, ablation=ablation))
             for ablation in FIG_B_ABLATIONS for k in FIG_B_K]
    return cells + [("LaMP_3/k=4/both", dict(task="LaMP_3", retriever="BM25", k=4, ablation="both"))]


def shards_by_task(shard_list) -> dict:
    """task -> {split: SplitShards}, user-based first: what the baseline tree's code reads."""
    shards = {}
    for s in shard_list:
        if s.setting == "user" or s.split not in shards.get(s.task, {}):
            shards.setdefault(s.task, {})[s.split] = s
    return shards


def check_tree(tree: str) -> None:
    """The grid package this process imports is the tree it was started for."""
    import grid

    where = Path(grid.__file__).resolve()
    if not where.is_relative_to(Path(tree).resolve()):
        raise SystemExit(f"imported grid from {where}, not from {tree}")


# --- children: each a fresh process in one tree --------------------------------------


def child_new(job: dict) -> dict:
    """This tree: `prepare` per task (timed after Ray is up); then render_grid over the
    k=80 cell alone, paper-fig-b's 18 cells and the LaMP_3 cell; then the k=80 cell
    in-process (grid.render.cell_table)."""
    import transformers  # noqa: F401 (imported before any timing, on both paths)

    from grid.cluster import ensure_ray
    from grid.model import ModelRef
    from grid.render import cell_table, render_grid
    from grid.shards import prepare
    from grid.spec import GridCell, Training
    from lamp.cell import Cell

    start = time.perf_counter()
    ensure_ray(log=log)
    result = {"ray_start_s": time.perf_counter() - start, "phases": {}}
    for task in ("LaMP_2", "LaMP_3"):
        start = time.perf_counter()
        prepare(job["data"], job["cache"], tasks=[task], retrievers=["BM25"], seeds=[0], log=log)
        result[f"prepare_{task}_s"] = time.perf_counter() - start
    shards = shards_by_task(prepare(job["data"], job["cache"], retrievers=["BM25"], seeds=[0], log=log))
    for task in shards.values():  # render_grid writes into directories prepare made
        for s in task.values():
            Path(job["cache_single"], s.task, f"{s.setting}-{s.split}").mkdir(parents=True, exist_ok=True)
    cells = {label: GridCell(Cell(**fields), "tiny", Training(max_prompt_tokens=MAX_TOKENS))
             for label, fields in cell_specs()}
    model, paths = ModelRef.named(job["model"]).resolved(), {}
    phases = [("k80_alone", [K80], job["cache_single"]),
              ("fig_b", [label for label in cells if label.startswith("LaMP_2/")], job["cache"]),
              ("lamp3", [label for label in cells if label.startswith("LaMP_3/")], job["cache"])]
    for phase, labels, cache in phases:
        reset_peak()
        actors = ProcessPeaks(b"RenderCells")
        actors.start()
        start = time.perf_counter()
        renders = render_grid([cells[label] for label in labels], {(task, "user"): splits for task, splits in
                                                                   shards.items()}, model, Path(cache).resolve(),
                              log=log)
        seconds = time.perf_counter() - start
        rows = {label: {split: renders[cells[label].key][split].stats["rows"] for split in SPLITS}
                for label in labels}
        result["phases"][phase] = {"s": seconds, "rows": rows, "driver_peak_mb": peak_mb(),
                                   "renderers": actors.stop()}
        paths[phase] = {label: {split: renders[cells[label].key][split].path for split in SPLITS}
                        for label in labels}
        log(f"new {phase}: {sum(sum(r.values()) for r in rows.values())} rows in {seconds:.1f} s")
    result["paths"] = paths

    # The same cell rendered in this process by the new code, no pipeline: a reference,
    # after one warm-up row (the old path's k=80 cell comes after others in its process).
    cell, rows, prompts = cells[K80].cell, {}, {}
    cell_table(shards["LaMP_2"]["dev"], cell, model, 1, MAX_TOKENS, shards["LaMP_2"])
    reset_peak()
    start = time.perf_counter()
    for split in SPLITS:
        table = cell_table(shards["LaMP_2"][split], cell, model, None, MAX_TOKENS, shards["LaMP_2"])
        rows[split], prompts[split] = table.num_rows, prompts_digest(table.column("prompt").to_pylist())
    result["phases"]["k80_inprocess"] = {"s": time.perf_counter() - start, "rows": {K80: rows},
                                         "driver_peak_mb": peak_mb(), "digests": prompts}
    result["max_rss_mb"] = max_rss_mb()
    return result


def child_old_render(job: dict) -> dict:
    """The baseline's way: prepare (its own cache), then grid.shards.cell_table per cell
    and split in this one process, as its trial drivers did."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import transformers  # noqa: F401 (imported before any timing, on both paths)

    from grid.cluster import ensure_ray
    from grid.shards import cell_table, prepare
    from lamp.cell import Cell

    start = time.perf_counter()
    ensure_ray(log=log)
    result = {"ray_start_s": time.perf_counter() - start, "cells": {}}
    start = time.perf_counter()
    shards = shards_by_task(prepare(job["data"], job["cache"], retrievers=["BM25"], seeds=[0], log=log))
    result["prepare_s"] = time.perf_counter() - start
    for label, fields in cell_specs():
        cell, task = Cell(**fields), fields["task"]
        for split in SPLITS:
            reset_peak()
            start = time.perf_counter()
            table = cell_table(shards[task][split], cell, job["model"], None, MAX_TOKENS, shards[task])
            seconds = time.perf_counter() - start
            prompts = table.column("prompt").to_pylist()
            result["cells"].setdefault(label, {})[split] = {"s": seconds, "rows": table.num_rows,
                                                             "peak_mb": peak_mb(), "digest": prompts_digest(prompts)}
            if label == K80:
                pq.write_table(pa.table({"id": table.column("id"), "prompt": table.column("prompt")}),
                               Path(job["k80_out"]) / f"old-{split}.parquet")
            log(f"old {label} {split}: {table.num_rows} rows in {seconds:.1f} s")
    result["max_rss_mb"] = max_rss_mb()
    return result


def child_trials(job: dict) -> dict:
    """1-cell grids through this tree's run_grid, one after the other on one local Ray;
    each trial's MLflow timings."""
    from mlflow.tracking import MlflowClient

    from grid.cluster import ensure_ray
    from grid.run import Workdir, run_grid
    from grid.spec import parse_grid

    ensure_ray(log=log)
    out = {}
    for run in job["runs"]:
        start = time.perf_counter()
        results = run_grid(parse_grid(job["grid"], "scale_bench"), run["data"], Path(run["workdir"]),
                           cache=run["cache"], retries=0, log=log)
        wall = time.perf_counter() - start
        if [r.status for r in results] != ["FINISHED"]:
            raise SystemExit(f"trial grid ended {[r.status for r in results]}")
        client = MlflowClient(Workdir(Path(run["workdir"]).resolve()).tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        metrics = [r.data.metrics for r in client.search_runs(experiments)
                   if "trial_start_to_first_step_s" in r.data.metrics]
        if len(metrics) != 1:
            raise SystemExit(f"expected one run with trial_start_to_first_step_s, found {len(metrics)}")
        wanted = ("trial_start_to_first_step_s", "trial_s", "last_step_to_results_logged_s")
        out[str(run["scale"])] = {"run_grid_s": wall, **{k: metrics[0][k] for k in wanted if k in metrics[0]}}
        log(f"trial at scale {run['scale']}: {out[str(run['scale'])]}")
    return out


CHILDREN = {"new": child_new, "old": child_old_render, "trials": child_trials}


def run_child(mode: str, tree: Path, job: dict, work: Path, timeout: float) -> dict:
    """Runs a child mode of this script in a fresh process that imports `tree`."""
    job = {**job, "tree": str(tree)}
    name = f"{mode}-{len(list(work.glob('job-*.json')))}"
    job_file, result_file = work / f"job-{name}.json", work / f"result-{name}.json"
    job_file.write_text(json.dumps({**job, "result": str(result_file)}))
    log(f"--- {mode} ({tree})")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--job", str(job_file)],
                   cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True, timeout=timeout)
    return json.loads(result_file.read_text())


# --- the parent -----------------------------------------------------------------------


def compare_prompts(old: dict, new: dict, work: Path) -> dict:
    """Every cell's prompts must be the same on both paths; the k=80 cell row by row."""
    import pyarrow.parquet as pq

    new_paths = {**new["paths"]["fig_b"], **new["paths"]["lamp3"]}
    mismatched = []
    for label, splits in old["cells"].items():
        for split, timing in splits.items():
            table = pq.read_table(new_paths[label][split], columns=["prompt"])
            if (table.num_rows, prompts_digest(table.column("prompt").to_pylist())) != (timing["rows"],
                                                                                      timing["digest"]):
                mismatched.append(f"{label} {split}")
    for split in SPLITS:
        theirs = pq.read_table(work / f"old-{split}.parquet")
        for phase in ("fig_b", "k80_alone"):
            ours = pq.read_table(new["paths"][phase][K80][split], columns=["id", "prompt"])
            if ours.column("id").to_pylist() != theirs.column("id").to_pylist():
                mismatched.append(f"{K80} {split} ({phase}): example ids or their order differ")
                continue
            for row, (a, b) in enumerate(zip(theirs.column("prompt").to_pylist(), ours.column("prompt").to_pylist())):
                if a != b:
                    mismatched.append(f"{K80} {split} ({phase}) row {row}:\n  old: {a[:300]!r}\n  new: {b[:300]!r}")
                    break
        if new["phases"]["k80_inprocess"]["digests"][split] != old["cells"][K80][split]["digest"]:
            mismatched.append(f"{K80} {split}: this tree's in-process cell_table")
    if mismatched:
        raise SystemExit("the old and new paths render different prompts:\n" + "\n".join(mismatched))
    return {"cells_compared": len(old["cells"]), "k80_rows_compared": sum(old["cells"][K80][s]["rows"]
                                                                          for s in SPLITS)}


def render_numbers(old: dict, new: dict) -> dict:
    def old_sum(labels):
        cells = [old["cells"][label][split] for label in labels for split in SPLITS]
        return sum(c["s"] for c in cells), sum(c["rows"] for c in cells), max(c["peak_mb"] for c in cells)

    def rate(rows, seconds):
        return round(rows / seconds, 1)

    out = {}
    groups = {"fig_b": [label for label in old["cells"] if label.startswith("LaMP_2/")],
              "lamp3": [label for label in old["cells"] if label.startswith("LaMP_3/")], "k80": [K80]}
    for group, labels in groups.items():
        seconds, rows, peak = old_sum(labels)
        phase = new["phases"]["k80_alone" if group == "k80" else group]
        new_rows = sum(sum(r.values()) for r in phase["rows"].values())
        assert new_rows == rows, f"{group}: old rendered {rows} rows, new {new_rows}"
        out[group] = {"cells": len(labels), "examples": rows,
                      "old_s": round(seconds, 2), "old_examples_per_s": rate(rows, seconds),
                      "old_driver_peak_mb": peak,
                      "new_s": round(phase["s"], 2), "new_examples_per_s": rate(rows, phase["s"]),
                      "new_driver_peak_mb": phase["driver_peak_mb"],
                      "new_renderers": phase["renderers"],
                      "speedup": round(seconds / phase["s"], 2)}
    inprocess = new["phases"]["k80_inprocess"]
    out["k80"].update(new_inprocess_s=round(inprocess["s"], 2),
                      new_inprocess_examples_per_s=rate(out["k80"]["examples"], inprocess["s"]),
                      new_inprocess_peak_mb=inprocess["driver_peak_mb"],
                      inprocess_speedup=round(out["k80"]["old_s"] / inprocess["s"], 2))
    both = [out["fig_b"], out["lamp3"]]
    examples, old_s, new_s = (sum(g[k] for g in both) for k in ("examples", "old_s", "new_s"))
    out["all"] = {"examples": examples, "old_s": round(old_s, 2), "old_examples_per_s": rate(examples, old_s),
                  "new_s": round(new_s, 2), "new_examples_per_s": rate(examples, new_s),
                  "speedup": round(old_s / new_s, 2)}
    return out


def markdown(result: dict, command: str) -> str:
    r, sizes = result["render"], result["sizes"]
    lines = [f"`{command}` (results: `{result['out']}`)", "",
             f"{result['machine']}, {result['date']}, load average at start {result['load_at_start']}; "
             f"whole run {result['wall_s']:.0f} s. Old: {result['baseline']}; new: the working tree.", "",
             f"Data: `synth --like-lamp`, LaMP_2 at scale {sizes['scale']} ({sizes['LaMP_2']}), "
             f"LaMP_3 at scale {sizes['lamp3_scale']} ({sizes['LaMP_3']}) (train, dev questions). "
             f"`prepare` (BM25, same step on both paths): LaMP_2 {result['prepare']['LaMP_2_s']:.1f} s, "
             f"LaMP_3 {result['prepare']['LaMP_3_s']:.1f} s (after Ray's start, "
             f"{result['prepare']['ray_start_s']:.1f} s); the baseline's own prepare "
             f"{result['prepare']['baseline_prepare_s']:.1f} s.", "",
             "| render (train + dev) | examples | old s | old ex/s | new s | new ex/s | new/old |",
             "|---|---|---|---|---|---|---|"]
    names = {"fig_b": "paper-fig-b, 18 LaMP_2 cells", "lamp3": "LaMP_3 BM25 k=4 both",
             "all": "all 19 cells", "k80": "LaMP_2 k=80 both, alone"}
    for group in ("fig_b", "lamp3", "all", "k80"):
        g = r[group]
        lines.append(f"| {names[group]} | {g['examples']} | {g['old_s']:.1f} | {g['old_examples_per_s']:,.1f} | "
                     f"{g['new_s']:.1f} | {g['new_examples_per_s']:,.1f} | **{g['speedup']:.2f}x** |")
    k80 = r["k80"]
    lines.append(f"| k=80 both, new code in-process (`grid.render.cell_table`, no pipeline) | {k80['examples']} | "
                 f"{k80['old_s']:.1f} | {k80['old_examples_per_s']:,.1f} | {k80['new_inprocess_s']:.1f} | "
                 f"{k80['new_inprocess_examples_per_s']:,.1f} | {k80['inprocess_speedup']:.2f}x |")
    lines += ["", "New pipeline times include starting its renderer actors (one pool per split and render_grid "
              "call); Ray's own start is excluded on both paths. Target: k=80 new >= 10x old.", "",
              "| peak RSS (MB) | old: trial driver (max over cells) | new: driver | new: renderer actors "
              "(max each / sum) |", "|---|---|---|---|"]
    for group in ("fig_b", "lamp3", "k80"):
        g = r[group]
        lines.append(f"| {names[group]} | {g['old_driver_peak_mb']:.0f} | {g['new_driver_peak_mb']:.0f} | "
                     f"{g['new_renderers']['max_mb']:.0f} / {g['new_renderers']['sum_mb']:.0f} "
                     f"({g['new_renderers']['processes']} actors) |")
    lines.append(f"| whole process, prepare included (ru_maxrss) | {result['rss']['old_process_mb']:.0f} | "
                 f"{result['rss']['new_process_mb']:.0f} | |")
    if result.get("trials"):
        lines += ["", "| trial start to first step (1 LaMP_2 BM25 k=4 cell, tiny model, 1 epoch, limit_dev "
                  f"{result['limit_dev']}) | train examples | old s | new s | old/new |", "|---|---|---|---|---|"]
        for t in result["trials"]:
            old, new = (t[path]["trial_start_to_first_step_s"] for path in ("old", "new"))
            lines.append(f"| scale {t['scale']} | {t['train_examples']} | {old:.1f} | {new:.1f} | {t['ratio']:.2f}x |")
        lines += ["", "The new path renders before its trials (not in this figure); the old one renders inside "
                  "the trial."]
    if result.get("trials_error"):
        lines += ["", f"Trial timings failed: {result['trials_error']}"]
    return "\n".join(lines)


def time_trials(args, data: Path, sizes: dict, caches: dict, work: Path, baseline: Path, model: str) -> tuple:
    """Step 3: a trial's start to its first step, old vs new, at two sizes: one process per
    path, the smaller size first. At --scale the caches prepared before are reused.
    Returns (per size, the error that stopped them or None)."""
    from grid.tiny import TINY_TRAINING
    from lamp.synth import write_like_lamp

    runs = {"old": [], "new": []}
    train_examples = {}
    for scale in ([] if args.no_trials else sorted({args.small_scale, args.scale})):
        trial_data = data if scale == args.scale else work / f"data-{scale}"
        train_examples[scale] = (sizes["LaMP_2"] if scale == args.scale
                                 else write_like_lamp(trial_data, ["LaMP_2"], scale)["LaMP_2"])[0]
        for path in runs:
            workdir = work / f"trial-{path}-{scale}"
            runs[path].append({"scale": scale, "data": str(trial_data), "workdir": str(workdir),
                               "cache": str(caches[path] if scale == args.scale else workdir / "cache")})
    grid = {"name": "scale-bench", "tasks": ["LaMP_2"], "model": model, "recipe": "lamp",
            "axes": [{"retriever": ["BM25"], "k": [4]}],
            "training": {**TINY_TRAINING, "epochs": 1, "limit_dev": args.limit_dev}}
    try:  # the render numbers are written even if a trial run fails
        timed = {path: run_child("trials", tree, {"grid": grid, "runs": runs[path]}, work, args.timeout)
                 for path, tree in (("old", baseline), ("new", REPO)) if runs[path]}
        return [{"scale": scale, "train_examples": n,
                 **{path: {k: round(v, 2) for k, v in timed[path][str(scale)].items()} for path in timed},
                 "ratio": round(timed["old"][str(scale)]["trial_start_to_first_step_s"]
                                / timed["new"][str(scale)]["trial_start_to_first_step_s"], 2)}
                for scale, n in train_examples.items()], None
    except (subprocess.SubprocessError, KeyError, ZeroDivisionError) as error:
        log(f"trial timings failed: {type(error).__name__}: {error}")
        return [], f"{type(error).__name__}: {error}"


def measure(args, work: Path, baseline: Path) -> dict:
    """Steps 1-3 on data written once; the numbers the result holds."""
    from grid.tiny import build_tiny_model
    from lamp.synth import write_like_lamp

    lamp3_scale = args.lamp3_scale or args.scale
    data = work / "data"
    sizes = {"scale": args.scale, "lamp3_scale": lamp3_scale,
             **write_like_lamp(data, ["LaMP_2"], args.scale), **write_like_lamp(data, ["LaMP_3"], lamp3_scale)}
    log(f"data: {sizes}")
    model = str(build_tiny_model(data, ["LaMP_2", "LaMP_3"], work / "tiny"))
    base = {"data": str(data), "model": model}
    # 1-2. prepare, and rendering on both paths; each path in a fresh process.
    caches = {"new": work / "cache", "old": work / "cache-old"}
    new = run_child("new", REPO, {**base, "cache": str(caches["new"]), "cache_single": str(work / "cache-single")},
                    work, args.timeout)
    old = run_child("old", baseline, {**base, "cache": str(caches["old"]), "k80_out": str(work)}, work, args.timeout)
    checked = compare_prompts(old, new, work)
    log(f"prompts: the same on both paths ({checked})")
    trials, trials_error = time_trials(args, data, sizes, caches, work, baseline, model)
    return {
        "sizes": sizes, "limit_dev": args.limit_dev,
        "prepare": {"ray_start_s": round(new["ray_start_s"], 1),
                    "LaMP_2_s": round(new["prepare_LaMP_2_s"], 2), "LaMP_3_s": round(new["prepare_LaMP_3_s"], 2),
                    "baseline_prepare_s": round(old["prepare_s"], 2)},
        "render": render_numbers(old, new), "prompts_checked": checked,
        "rss": {"old_process_mb": old["max_rss_mb"], "new_process_mb": new["max_rss_mb"]},
        "old_per_cell": {label: {s: {k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()
                                     if k != "digest"} for s, t in splits.items()}
                         for label, splits in old["cells"].items()},
        "trials": trials, **({"trials_error": trials_error} if trials_error else {}),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.05, help="fraction of LaMP's question counts")
    parser.add_argument("--small-scale", type=float, default=0.02, help="the trial timing's smaller data size")
    parser.add_argument("--lamp3-scale", type=float, default=None, help="LaMP_3's scale (default: --scale)")
    parser.add_argument("--baseline-rev", default="da8be0f", help="the old path's revision")
    parser.add_argument("--limit-dev", type=int, default=16, help="dev examples a timed trial evaluates")
    parser.add_argument("--no-trials", action="store_true", help="skip the trial timings (step 3)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds any one child process may take")
    parser.add_argument("--out", default="bench/results/scale.json")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(Path(args.job).read_text())
        check_tree(job["tree"])
        Path(job["result"]).write_text(json.dumps(CHILDREN[args.child](job)))
        return

    command = "python bench/scale_bench.py " + " ".join(sys.argv[1:])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="lamp-scale-"))
    baseline = work / "baseline"
    worktree = False
    try:
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline), args.baseline_rev], cwd=REPO,
                       check=True, capture_output=True)
        worktree = True
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=baseline, check=True,
                             capture_output=True, text=True).stdout.strip()
        numbers = measure(args, work, baseline)
        result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "load_at_start": load, "command": command, "out": args.out,
                  "baseline": f"{args.baseline_rev} ({rev})", "wall_s": round(time.perf_counter() - started, 1),
                  **numbers}
        write_result(result, str(Path(args.out).resolve()))
        print()
        print(markdown(result, command))
        if numbers.get("trials_error"):
            raise SystemExit(f"trial timings failed: {numbers['trials_error']}")
    finally:
        if worktree:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, check=False)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
