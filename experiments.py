"""lamp-grid's command line, and the named experiments.

    python experiments.py                        the demo grid on synthetic data (= run demo)
    python experiments.py run GRID               fine-tune and evaluate every cell, tracked in MLflow
    python experiments.py synth --out DIR        synthetic LaMP data with a planted signal
    python experiments.py validate --data DIR    check LaMP files and print their shape
    python experiments.py evaluate --task LaMP_k --golds FILE --preds FILE
    python experiments.py render --data DIR --task LaMP_k --retriever BM25 --k 4 ...
    python experiments.py prepare --data DIR             rank once into the shard cache

Every verb has `--help`. Bad input ends with a one-line message and exit 2.
"""

import argparse
import json
import sys
from pathlib import Path

from lamp.errors import LampError
from lamp.prompts import MAX_PROMPT_TOKENS
from lamp.tasks import TASKS, get_task

WORKDIR = "lamp-grid-work"

# The named experiments: each a grid a user runs by name (`run NAME`), in the
# schema of grid/spec.py (a YAML file with the same keys works too).
GRIDS = {
    "demo": {
        "name": "demo",
        "tasks": ["LaMP_2", "LaMP_4"],
        "model": "tiny",
        "axes": [
            {"retriever": ["none", "Full_Random", "RanBM25", "Random", "BM25"], "k": [4]},
            {"retriever": ["BM25"], "ablation": ["only_output"], "k": [4]},
        ],
        # Sized for a laptop CPU: the tiny model learns from 1200 users' questions in
        # 3 epochs at a high rate, on prompts of 96 tokens; greedy decoding, with a
        # repetition penalty that keeps its titles from repeating a word.
        "training": {"epochs": 3, "lr": 3e-3, "weight_decay": 0, "batch_size": 16, "beams": 1,
                     "max_prompt_tokens": 96, "repetition_penalty": 1.3},
    },
}


def cmd_synth(args) -> int:
    from lamp.synth import write_synthetic

    write_synthetic(args.out, tasks=args.tasks, users=args.users, seed=args.seed,
                    profile_size=args.profile_size)
    print(f"wrote synthetic LaMP data for {', '.join(args.tasks)} under {args.out}")
    return 0


def cmd_validate(args) -> int:
    from lamp.data import find_splits, summarize_split

    ok = True
    for split in find_splits(args.data, args.tasks):
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
    from lamp.data import read_outputs
    from lamp.metrics import evaluate

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


def load_tokens(model):
    """Token counting for the budget: the model's tokenizer, or whitespace words."""
    from lamp.prompts import TokenizerTokens, WhitespaceTokens

    if model is None:
        return WhitespaceTokens()
    from transformers import AutoTokenizer

    try:
        return TokenizerTokens(AutoTokenizer.from_pretrained(model))
    except (OSError, ValueError) as error:
        raise LampError(f"cannot load a tokenizer from {model!r}: {str(error).splitlines()[0]}") from None


def cmd_render(args) -> int:
    from lamp.cell import Cell
    from lamp.data import find_splits, read_examples
    from lamp.retrieval import ItemPool

    cell = Cell(args.task, args.retriever, 0 if args.retriever == "none" else args.k, args.ablation,
                args.order, args.rank_offset, args.seed, args.input_retriever, args.output_retriever)
    cell.check()
    splits = [s for s in find_splits(args.data, [args.task]) if s.split == args.split]
    if not splits:
        raise LampError(f"{args.data}: no {args.task} {args.split} split")
    tokens = load_tokens(args.model)
    examples = list(read_examples(splits[0]))
    pool = ItemPool(examples) if cell.needs_pool else None
    for example in examples[: args.limit]:
        prompt, items = cell.render(example, tokens, pool, args.max_tokens)
        retrieved = [item["id"] for item in items]
        if args.json:
            print(json.dumps({"id": example.id, "retrieved": retrieved, "prompt": prompt,
                              "n_tokens": tokens.count(prompt)}))
        else:
            print(f"== {example.id}: {tokens.count(prompt)} tokens, items {retrieved}\n{prompt}\n")
    return 0


def cmd_prepare(args) -> int:
    from grid.shards import prepare

    prepare(args.data, args.cache or Path(args.workdir) / "cache", tasks=args.tasks,
            retrievers=args.retrievers, seeds=args.seeds, workers=args.workers, address=args.address)
    return 0


def cmd_run(args) -> int:
    from grid.run import Workdir, run_grid
    from grid.spec import Resources, load_grid, with_overrides

    spec = with_overrides(load_grid(args.grid, GRIDS), model=args.model, seeds=args.seeds, epochs=args.epochs,
                          limit_train=args.limit_train, limit_dev=args.limit_dev)
    resources = Resources(workers_per_trial=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker,
                          zero_stage=args.zero_stage)
    results = run_grid(spec, args.data, Path(args.workdir), tracking_uri=args.tracking_uri, storage=args.storage,
                       address=args.address, resources=resources, max_concurrent=args.max_concurrent,
                       resume=args.resume, dry_run=args.dry_run, retries=args.retries, users=args.users)
    if args.dry_run:
        return 0
    print_results(results, args.tracking_uri or Workdir(Path(args.workdir).resolve()).tracking_uri)
    return 0 if all(r.status == "FINISHED" for r in results) else 1


def print_results(results: list, tracking_uri: str) -> None:
    """The results table, the cells that did not finish, and how to look closer."""
    from mlflow.tracking import MlflowClient

    from grid.report import compare_cells, format_table

    print()
    print(format_table(compare_cells(MlflowClient(tracking_uri), results)))
    for r in results:
        if r.status != "FINISHED":
            print(f"{r.status}: {r.cell.key}")
    ui = f"mlflow ui --backend-store-uri {tracking_uri}" if tracking_uri.startswith("sqlite") else tracking_uri
    print(f"\nEvery run, its metrics and artifacts: {ui}")


def build_parser() -> argparse.ArgumentParser:
    from grid.run import SYNTHETIC_USERS

    parser = argparse.ArgumentParser(prog="lamp-grid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    p = verbs.add_parser("synth", help="write synthetic LaMP data in the official layout")
    p.add_argument("--out", required=True, help="directory to write LaMP_k/<split>/ files into")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), metavar="LaMP_k")
    p.add_argument("--users", type=int, default=400, help="users per task (train + dev)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-size", type=int, default=None,
                   help="mean profile items per user (default: per task)")
    p.set_defaults(run=cmd_synth)

    p = verbs.add_parser("validate", help="check LaMP files and print their shape")
    p.add_argument("--data", required=True, help="a directory holding LaMP_k task folders")
    p.add_argument("--tasks", nargs="+", default=None, metavar="LaMP_k")
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
    p.add_argument("--retriever", required=True, help="none, BM25, Random, Full_Random, RanBM25 or Mixed")
    p.add_argument("--k", type=parse_k, default=0, help="items (whole) or a fraction of the profile")
    p.add_argument("--ablation", default="both", help="both, only_output, decouple or only_input")
    p.add_argument("--order", default="start", help="start, end, middle or random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank-offset", type=int, default=0, help="take ranks [T, T+k)")
    p.add_argument("--input-retriever", help="Mixed: where the input halves come from")
    p.add_argument("--output-retriever", help="Mixed: where the output halves come from")
    p.add_argument("--model", help="count tokens with this model's tokenizer (default: words)")
    p.add_argument("--max-tokens", type=int, default=MAX_PROMPT_TOKENS,
                   help=f"the prompt budget, a grid's max_prompt_tokens (default {MAX_PROMPT_TOKENS})")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(run=cmd_render)

    p = verbs.add_parser("prepare", help="convert LaMP files to Parquet and rank every example once")
    p.add_argument("--data", required=True, help="a directory holding LaMP_k task folders")
    p.add_argument("--tasks", nargs="+", default=None, metavar="LaMP_k")
    p.add_argument("--retrievers", nargs="+", default=["BM25", "Random", "Full_Random", "RanBM25"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--workdir", default=WORKDIR, help=f"lamp-grid's work directory (default {WORKDIR})")
    p.add_argument("--cache", help="the shard cache (default: WORKDIR/cache, shared by every command)")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one)")
    p.add_argument("--workers", type=int, help="ranking workers (default: one per CPU)")
    p.set_defaults(run=cmd_prepare)

    p = verbs.add_parser("run", help="run a grid: fine-tune and evaluate every cell, tracked in MLflow")
    p.add_argument("grid", help=f"a named grid ({', '.join(GRIDS)}) or a YAML file")
    p.add_argument("--data", default="synthetic", help="a LaMP directory, or `synthetic` (default)")
    p.add_argument("--users", type=int, default=SYNTHETIC_USERS,
                   help="with --data synthetic: users per task, written once into the work directory")
    p.add_argument("--model", help="a hub id, a local model folder, `tiny` or `vote` (default: the grid's)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite in the work directory)")
    p.add_argument("--storage", help="Ray's storage path (default: WORKDIR/ray_results)")
    p.add_argument("--address", help="a Ray cluster to run on (default: a local one)")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=0)
    p.add_argument("--zero-stage", type=int, default=2, choices=[0, 1, 2, 3])
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as fit)")
    p.add_argument("--seeds", nargs="+", type=int, help="override the grid's seeds")
    p.add_argument("--epochs", type=int, help="override the grid's epochs (0: zero-shot)")
    p.add_argument("--limit-train", type=int, help="train on the first N examples only")
    p.add_argument("--limit-dev", type=int, help="evaluate on the first N dev examples only")
    p.add_argument("--retries", type=int, default=2, help="retries of a crashed trial")
    p.add_argument("--workdir", default=WORKDIR, help=f"lamp-grid's work directory (default {WORKDIR})")
    p.add_argument("--resume", action="store_true", help="restore this grid's interrupted run")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their resources; run nothing")
    p.set_defaults(run=cmd_run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", "demo", *argv]  # no verb: the demo grid, e.g. `python experiments.py --workdir DIR`
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except LampError as error:
        print(f"lamp-grid {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lamp-grid {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
