"""lamp-grid's command line, and the named experiments.

    python experiments.py                        the demo grid on synthetic data (= run demo)
    python experiments.py run GRID               fine-tune and evaluate every cell, tracked in MLflow
    python experiments.py synth --out DIR        synthetic LaMP data with a planted signal
    python experiments.py validate --data DIR    check LaMP files and print their shape
    python experiments.py evaluate --task LaMP_k --golds FILE --preds FILE
    python experiments.py render --data DIR --task LaMP_k --retriever BM25 --k 4 ...
    python experiments.py prepare --data DIR             rank once into the shard cache
    python experiments.py list                           the named experiments (the study's analyses)
    python experiments.py report GRID --out DIR          tables, confidence intervals and figures of a grid
    python experiments.py report GRID --export-test DIR  each cell's test predictions, ready to submit
    python experiments.py rerun RUN_ID                   one cell again from its MLflow record, compared

Every verb has `--help`. Bad input ends with a one-line message and exit 2.
"""

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from grid import tracking
from grid.embed import DEFAULT_RETRIEVER_MODEL
from grid.reference import reference_prompts
from grid.run import (SYNTHETIC_USERS, Workdir, check_retriever_model, data_predicting_test, prepare_grid,
                      render_cells, run_grid)
from grid.shards import prepare
from grid.spec import NAMED_GRIDS, Resources, load_grid, with_overrides
from grid.storage import local_data
from lamp.cell import Cell
from lamp.data import SETTINGS, find_splits, read_outputs, summarize_split
from lamp.errors import LampError
from lamp.prompts import MAX_PROMPT_TOKENS
from lamp.synth import write_like_lamp, write_synthetic
from lamp.tasks import TASKS, get_task

WORKDIR = "lamp-grid-work"


def cmd_synth(args) -> int:
    if args.like_lamp:
        given = [name for name, value in (("--users", args.users), ("--profile-size", args.profile_size),
                                          ("--test-users", args.test_users)) if value is not None]
        if given:
            raise LampError(f"--like-lamp sets the sizes itself; drop {' and '.join(given)}")
        scale = 1.0 if args.scale is None else args.scale
        for setting in args.setting:
            counts = write_like_lamp(args.out, tasks=args.tasks, scale=scale, seed=args.seed, setting=setting)
            sizes = ", ".join(f"{task} {train}/{dev}" for task, (train, dev) in counts.items())
            print(f"wrote LaMP-sized synthetic {layout(setting)}data (train/dev questions: {sizes}) under {args.out}")
        return 0
    if args.scale is not None:
        raise LampError("--scale works with --like-lamp only")
    for setting in args.setting:
        write_synthetic(args.out, tasks=args.tasks, users=400 if args.users is None else args.users, seed=args.seed,
                        profile_size=args.profile_size, setting=setting, test_users=args.test_users or 0)
        print(f"wrote synthetic {layout(setting)}LaMP data for {', '.join(args.tasks)} under {args.out}")
    return 0


def layout(setting: str) -> str:
    """How synth names a setting's layout: the user-based one as it always has."""
    return "" if setting == "user" else f"{setting}-based "


def cmd_validate(args) -> int:
    ok = True
    for split in find_splits(local_data(args.data, Workdir(Path(args.workdir).resolve()).mirror), args.tasks):
        label = f"{split.task} {split.setting}-based {split.split}"
        try:
            s = summarize_split(split)
        except LampError as error:
            ok = False
            print(f"{label}: ERROR {error}")
            continue
        print(f"{label}: {s.examples} examples, {s.users} users, profile size "
              f"mean {s.mean_profile:.1f} max {s.max_profile}"
              + ("" if split.outputs else " (no outputs file: test split)"))
    return 0 if ok else 2


def cmd_evaluate(args) -> int:
    from lamp.metrics import evaluate  # deferred: rouge_score and nltk take seconds to import

    get_task(args.task)
    golds = read_outputs(args.golds, args.task)
    preds = read_outputs(args.preds, args.task)
    print(json.dumps(evaluate(args.task, golds, preds, preds_name=args.preds)))
    return 0


def parse_k(text: str) -> int | float:
    """k is a whole number of items or a fraction of the profile."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"k must be a whole number or a fraction, got {text!r}") from None


def custom_resources(text: str) -> dict:
    """A JSON object of Ray resource name -> amount."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in value.values()):
        raise argparse.ArgumentTypeError(f"expected a JSON object of resource -> positive amount, got {text!r}")
    return value


def cmd_render(args) -> int:

    cell = Cell(args.task, args.retriever, 0 if args.retriever == "none" else args.k, args.ablation,
                args.order, args.rank_offset, args.seed, args.input_retriever, args.output_retriever, args.recipe,
                args.setting, args.use_date)
    cell.check()
    for prompt in reference_prompts(cell, args.data, args.split, args.model, args.max_tokens, args.limit):
        with_ids = prompt.input_ids is not None
        if args.json:
            print(json.dumps({"id": prompt.id, "retrieved": prompt.retrieved, "prompt": prompt.text,
                              **({"input_ids": prompt.input_ids} if with_ids else {}), "input_cut": prompt.input_cut}))
        else:
            length = f"{prompt.length} tokens" if with_ids else f"{prompt.length} words"
            print(f"== {prompt.id}: {length}, items {prompt.retrieved}" + (", input cut" if prompt.input_cut else "")
                  + f"\n{prompt.text}\n")
    return 0


def cmd_prepare(args) -> int:

    work = Workdir(Path(args.workdir).resolve())
    if args.grid is None:
        if args.data is None:
            raise LampError("prepare: give --data, or --grid to prepare a grid's cells")
        prepare(local_data(args.data, work.mirror), args.cache or work.cache, tasks=args.tasks,
                retrievers=args.retrievers, seeds=args.seeds or [0], workers=args.workers, address=args.address,
                stage_dir=work.cache, use_date=args.use_date, settings=args.setting and [args.setting],
                retriever_model=args.retriever_model or DEFAULT_RETRIEVER_MODEL)
        return 0
    spec = grid_spec(args)
    cells, cache = spec.cells(), args.cache or str(work.cache)
    check_retriever_model(spec, cells)
    work.root.mkdir(parents=True, exist_ok=True)
    data_dir, model, shards = prepare_grid(spec, cells, args.data or spec.data, work, cache, args.address, args.users)
    data_predicting_test(spec, cells, data_dir)
    render_cells(cells, shards, model, work, cache, args.address, args.workers, spec.predict_test)
    return 0


def cmd_run(args) -> int:

    spec = grid_spec(args)
    resources = Resources(workers_per_trial=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker,
                          zero_stage=args.zero_stage, custom_per_worker=args.resources_per_worker)
    results = run_grid(spec, args.data or spec.data, Path(args.workdir), tracking_uri=args.tracking_uri,
                       storage=args.storage, cache=args.cache,
                       address=args.address, resources=resources, max_concurrent=args.max_concurrent,
                       resume=args.resume, dry_run=args.dry_run, retries=args.retries, users=args.users,
                       log_model=args.log_model, verbose=args.verbose,
                       command=shlex.join(["python", "experiments.py", *args.argv]))
    if args.dry_run:
        return 0
    print_results(results, args.tracking_uri or Workdir(Path(args.workdir).resolve()).tracking_uri, spec.name)
    return 0 if all(r.status == "FINISHED" for r in results) else 1


def print_results(results: list, tracking_uri: str, grid: str) -> None:
    """After the results table (run_grid logs it): the cells that did not finish, and
    where to compare them: the grid's view of its cells in the MLflow UI."""
    for r in results:
        if r.status != "FINISHED":
            print(f"{r.status}: {r.cell.key}")
    experiment = tracking.find_experiment(tracking.connect(tracking_uri), grid).experiment_id
    if tracking_uri.startswith("sqlite"):  # no server yet: `mlflow ui` serves one on port 5000
        view = tracking.cells_view("http://127.0.0.1:5000", experiment)
        opened = f"`mlflow ui --backend-store-uri {tracking_uri}`, then open {view}"
    else:
        opened = tracking.cells_view(tracking_uri, experiment)
    print(f"\nCompare the cells in the MLflow UI: {opened}")


def cmd_list(args) -> int:
    for name in NAMED_GRIDS:
        spec = load_grid(name)
        cells = spec.cells()
        print(f"{name:<16} {len(cells):>3} cells ({len(cells) // len(spec.seeds)} settings x {len(spec.seeds)} "
              f"seed(s)); {', '.join(spec.tasks)}; model {spec.model}; data {spec.data}")
    return 0


def cmd_report(args) -> int:
    # deferred: the report's metrics import rouge_score and nltk, seconds on every command
    from grid.report import compare_cells, environment_note, export_test, format_table, read_results, write_report

    if bool(args.grid) == bool(args.experiment):
        raise LampError("report: name a GRID (named or YAML) or an --experiment, one of the two")
    if not (args.out or args.export_test):
        raise LampError("report: give --out DIR (the report), --export-test DIR (the test predictions), or both")
    uri = args.tracking_uri or Workdir(Path(args.workdir).resolve()).tracking_uri
    client = tracking.connect(uri)
    if args.grid:
        spec = with_overrides(load_grid(args.grid), model=args.model, seeds=args.seeds, recipe=args.recipe,
                              tasks=args.tasks, setting=args.setting, retriever_model=args.retriever_model)
        name, cells, published = spec.name, spec.cells(), spec.published
    else:
        name, cells, published = args.experiment, None, {}
    if not published and name in NAMED_GRIDS:  # none of its own (`--experiment paper-fig-b`): the named grid's
        published = load_grid(name).published
    experiment = tracking.find_experiment(client, name)
    if experiment is None:
        raise LampError(f"no MLflow experiment {name!r} in {uri}: run the grid first")
    results = read_results(client, experiment, cells)
    if args.export_test:
        written = export_test(client, results, Path(args.export_test))
        print(f"wrote the test predictions of {len(written)} cell(s) into {args.export_test}, a folder per cell:")
        print("\n".join(f"  {folder}/{file}  ({key})" for key, (folder, file) in written.items()))
    if not args.out:
        return 0
    rows, note = compare_cells(client, results), environment_note(results)
    out = Path(args.out)
    files = write_report(rows, out, f"lamp-grid report: {name}", uri, published, note)
    print(format_table(rows) + (f"\n{note}" if note else ""))
    parent = tracking.newest_parent(client, experiment.experiment_id)
    if parent is not None:
        client.log_artifacts(parent, str(out), artifact_path="report")
    print(f"\nwrote {', '.join(str(f) for f in files)}"
          + (f"\nlogged to the grid's newest parent run {parent} (artifacts: report/)" if parent else ""))
    return 0


def cmd_rerun(args) -> int:
    from grid.rerun import rerun  # deferred: it imports the report's metrics (rouge_score, nltk)

    work = Workdir(Path(args.workdir).resolve())
    return rerun(args.run_id, args.tracking_uri or work.tracking_uri, work.root, args.address, args.verbose)


def add_grid_overrides(p) -> None:
    """What `run` and `prepare --grid` may override in a grid, so both render the same cells."""
    p.add_argument("--model", help="a hub id, a local model folder, `tiny` or `vote` (default: the grid's)")
    p.add_argument("--seeds", nargs="+", type=int, help="override the grid's seeds (prepare without a grid: 0)")
    p.add_argument("--tasks", nargs="+", metavar="LaMP_k", help="only these of the grid's tasks (prepare without a "
                   "grid: the tasks to prepare; default all)")
    p.add_argument("--recipe", help="run every cell with this recipe: lamp or study (default: the grid's)")
    p.add_argument("--setting", choices=SETTINGS, help="every cell on LaMP's user-based or time-based files (default: "
                   "the grid's; prepare without a grid: only that setting's splits)")
    p.add_argument("--epochs", type=int, help="override the grid's epochs (0: zero-shot)")
    p.add_argument("--limit-train", type=int, help="train on the first N examples only")
    p.add_argument("--limit-dev", type=int, help="evaluate on the first N dev examples only")
    p.add_argument("--predict-test", action=argparse.BooleanOptionalAction, default=None,
                   help="each cell also decodes its task's test split with its selected epoch into "
                   "LaMP_k-test-predictions.json, an MLflow artifact (default: the grid's predict_test)")
    p.add_argument("--retriever-model", help="Contriever's encoder: a hub id or a local folder "
                   f"(default: the grid's, else {DEFAULT_RETRIEVER_MODEL})")


def grid_spec(args):
    """The grid named on the command line, with the overrides given."""
    return with_overrides(load_grid(args.grid), model=args.model, seeds=args.seeds, recipe=args.recipe,
                          tasks=args.tasks, setting=args.setting, predict_test=args.predict_test,
                          retriever_model=args.retriever_model, epochs=args.epochs, limit_train=args.limit_train,
                          limit_dev=args.limit_dev)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lamp-grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    add_data_verbs(verbs)
    add_grid_verbs(verbs)
    return parser


def add_data_verbs(verbs) -> None:
    """The verbs on LaMP files and one cell: synth, validate, evaluate, render."""
    p = verbs.add_parser("synth", help="write synthetic LaMP data in the official layout")
    p.add_argument("--out", required=True, help="directory to write LaMP_k/<split>/ files into")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="LaMP_k")
    p.add_argument("--users", type=int, default=None, help="users per task (train + dev; default 400)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-size", type=int, default=None,
                   help="mean profile items per user (default: per task)")
    p.add_argument("--like-lamp", action="store_true",
                   help="LaMP's own sizes: its user-based train/dev question counts, profile sizes, text lengths")
    p.add_argument("--scale", type=float, default=None,
                   help="with --like-lamp: this fraction (0 < F <= 1) of LaMP's question counts (default 1)")
    p.add_argument("--setting", nargs="+", choices=SETTINGS, default=["user"],
                   help="the layouts to write: user (LaMP_k/...), time (time/LaMP_k/..., items dated and each "
                   "question after its user's items), or both (default user)")
    p.add_argument("--test-users", type=int, default=None,
                   help="also a test split of N more users; its golds go to test/test_golds.json, which the "
                   "loader does not read (LaMP's test golds are hidden)")
    p.set_defaults(run=cmd_synth)

    p = verbs.add_parser("validate", help="check LaMP files and print their shape")
    p.add_argument("--data", required=True, help="a directory (or s3://, gs:// URI) holding LaMP_k task folders")
    p.add_argument("--tasks", nargs="+", default=None, metavar="LaMP_k")
    p.add_argument("--workdir", default=WORKDIR, help="where a copy of data at a URI is kept")
    p.set_defaults(run=cmd_validate)

    p = verbs.add_parser("evaluate", help="score predictions with LaMP's official metrics")
    p.add_argument("--task", required=True, metavar="LaMP_k")
    p.add_argument("--golds", required=True, help="a <split>_outputs.json file")
    p.add_argument("--preds", required=True, help="predictions in the same format")
    p.set_defaults(run=cmd_evaluate)

    p = verbs.add_parser("render", help="print the prompts one cell would train on")
    p.add_argument("--data", required=True, help="a directory holding LaMP_k task folders")
    p.add_argument("--task", required=True, metavar="LaMP_k")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--retriever", required=True, help="none, BM25, Random, Full_Random, RanBM25, Mixed or Recency")
    p.add_argument("--k", type=parse_k, default=0, help="items (whole) or a fraction of the profile")
    p.add_argument("--ablation", default="both", help="both, only_output, decouple or only_input")
    p.add_argument("--order", default="start", help="start, end, middle or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank-offset", type=parse_k, default=0, help="take ranks [T, T+k) (study: T may be a share)")
    p.add_argument("--input-retriever", help="Mixed: where the input halves come from")
    p.add_argument("--output-retriever", help="Mixed: where the output halves come from")
    p.add_argument("--recipe", default="lamp", help="lamp (the default) or study: the study's code, reproduced")
    p.add_argument("--setting", default="user", choices=SETTINGS, help="LaMP's user-based (the default) or "
                   "time-based files")
    p.add_argument("--use-date", action="store_true", help="BM25 over texts with the items' dates (LaMP's --use_date)")
    p.add_argument("--model", help="count tokens with this model's tokenizer: a hub id or a local model folder "
                   "(default: words); the study recipe needs one")
    p.add_argument("--max-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"the prompt budget, a grid's max_prompt_tokens (default {MAX_PROMPT_TOKENS})")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_render)


def add_grid_verbs(verbs) -> None:
    """The verbs on a grid: prepare, run, list, report, rerun."""
    p = verbs.add_parser("prepare", help="convert LaMP files to Parquet and rank every example once; with "
                         "--grid, also render every cell of the grid (what `run` does before its trials)")
    p.add_argument("--grid", help=f"a named grid ({', '.join(NAMED_GRIDS)}) or a YAML file: prepare and render its "
                   "cells")
    p.add_argument("--data", help="a directory (or s3://, gs:// URI) holding LaMP_k task folders, or `synthetic` "
                   "(required without --grid; default: the grid's)")
    p.add_argument("--users", type=int, default=SYNTHETIC_USERS,
                   help="with --data synthetic: users per task, written once into the work directory")
    p.add_argument("--retrievers", nargs="+", default=["BM25", "Random", "Full_Random", "RanBM25"],
                   help="without --grid: the rankings to compute (Recency too, on dated files)")
    p.add_argument("--use-date", action="store_true", help="without --grid: also BM25's rankings over texts with "
                   "the items' dates")
    add_grid_overrides(p)
    p.add_argument("--workdir", default=WORKDIR, help=f"lamp-grid's work directory (default {WORKDIR})")
    p.add_argument("--cache", help="the shard cache, a directory or URI (default: WORKDIR/cache, shared by every "
                   "command)")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one)")
    p.add_argument("--workers", type=int, help="ranking workers (default: one per CPU)")
    p.set_defaults(run=cmd_prepare)

    p = verbs.add_parser("run", help="run a grid: fine-tune and evaluate every cell, tracked in MLflow")
    p.add_argument("grid", help=f"a named grid ({', '.join(NAMED_GRIDS)}) or a YAML file")
    p.add_argument("--data", help="a LaMP directory or URI (s3://...), or `synthetic` (default: the grid's)")
    p.add_argument("--users", type=int, default=SYNTHETIC_USERS,
                   help="with --data synthetic: users per task, written once into the work directory")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the work directory)")
    p.add_argument("--storage", help="Ray's storage path, a directory or URI (default: WORKDIR/ray_results)")
    p.add_argument("--cache", help="the shard cache, a directory or URI such as s3://... (default: WORKDIR/cache)")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one)")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--resources-per-worker", type=custom_resources, default={}, metavar="JSON",
                   help="custom Ray resources each trial worker needs, e.g. '{\"trial_node\": 1}'")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as fit)")
    add_grid_overrides(p)
    p.add_argument("--retries", type=int, default=2, help="retries of a crashed trial")
    p.add_argument("--workdir", default=WORKDIR, help=f"lamp-grid's work directory (default {WORKDIR})")
    p.add_argument("--resume", action="store_true", help="restore this grid's interrupted run")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their resources; run nothing")
    p.add_argument("--log-model", action="store_true",
                   help="log each cell's best model to its MLflow run (an MLflow `transformers` model; large)")
    p.add_argument("--verbose", action="store_true",
                   help="show everything: Tune's own tables and every Ray worker's output")
    p.set_defaults(run=cmd_run)

    p = verbs.add_parser("list", help="the named experiments and their cell counts")
    p.set_defaults(run=cmd_list)

    p = verbs.add_parser("report", help="tables, confidence intervals and figures of a grid's finished runs")
    p.add_argument("grid", nargs="?", help=f"a named grid ({', '.join(NAMED_GRIDS)}) or a YAML file")
    p.add_argument("--experiment", help="an MLflow experiment name instead: every cell it has runs of")
    p.add_argument("--model", help="the model the grid was run with, if not its own (e.g. tiny)")
    p.add_argument("--seeds", nargs="+", type=int, help="the seeds it was run with, if not its own")
    p.add_argument("--recipe", help="the recipe it was run with, if not its own")
    p.add_argument("--setting", choices=SETTINGS, help="the setting it was run with (--setting of run), if not its own")
    p.add_argument("--tasks", nargs="+", metavar="LaMP_k", help="the tasks it was run with (--tasks of run), if not "
                   "all of its own")
    p.add_argument("--retriever-model", help="Contriever's encoder it was run with, if not its own")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the work directory)")
    p.add_argument("--workdir", default=WORKDIR, help=f"lamp-grid's work directory (default {WORKDIR})")
    p.add_argument("--out", help="directory for report.md, report.html and the figures")
    p.add_argument("--export-test", metavar="DIR", help="gather each cell's test predictions (run --predict-test) "
                   "into DIR, a folder per cell, ready to submit to LaMP's leaderboard")
    p.set_defaults(run=cmd_report)

    p = verbs.add_parser("rerun", help="run one cell again from its MLflow record, into a new run, and compare: "
                         "`identical`, or by how much it differs and what differs in the environment")
    p.add_argument("run_id", help="the MLflow run id of a cell (a child of a grid run)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the work directory)")
    p.add_argument("--workdir", default=WORKDIR, help=f"lamp-grid's work directory (default {WORKDIR})")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one)")
    p.add_argument("--verbose", action="store_true", help="show everything, as `run --verbose` does")
    p.set_defaults(run=cmd_rerun)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", "demo", *argv]  # no verb: the demo grid, e.g. `python experiments.py --workdir DIR`
    args = build_parser().parse_args(argv)
    args.argv = argv  # as given: how to run it again
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, so that a reader gone away is caught below, not at exit
        return code
    except LampError as error:
        print(f"lamp-grid {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lamp-grid {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`list | head -1`). Python's own advice: point stdout
        # at /dev/null, or flushing it at exit raises again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1

