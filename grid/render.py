"""Rendering every cell of a grid once, before its trials start.

A cell's render of a split is its prompts and their token ids for the grid's
tokenizer, recipe and prompt budget: one Parquet file that a trial streams
(`ray.data.read_parquet`, delivered to each of its Train workers). No
trial driver loads a split or calls a tokenizer.

`render_grid` renders every missing one in one Ray Data pipeline over the
grid's splits: read the examples Parquet, `map_batches(RenderCells)` over the
cluster's CPUs (one tokenizer call per batch of texts), and the driver writes
one Parquet file per cell and split. Renderers stream the split a row group at a time: a `lamp` cell reads
its rankings and the rows its candidates live in, nothing else. (A `study`
cell replays the study's draws, whose random streams run through the whole
split in file order, so its renderers hold the split.)

Renders live in the content-addressed shard cache. A render's name is a hash
of what it is made of: the examples and rankings it reads (their directory
names are their content's hash), the cell's retrieval and prompt settings, the
tokenizer's files, the prompt budget, the example limit and the rendering
code. Training settings are not in it, so a cell that differs only in lr,
epochs, ZeRO stage or workers, a retry and a rerun all find it rendered. Each
is written under a temporary name and renamed when complete: a killed render
leaves nothing that looks complete.
"""

import functools
import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import lamp.cell
import lamp.prompts
import lamp.recipes
import lamp.recipes.lamp
import lamp.recipes.study
import lamp.retrieval
import lamp.seeding
import lamp.tasks
from tqdm import tqdm

from grid.cluster import ensure_ray
from grid.examples import load_examples, to_example
from grid.pipeline import (
    ACTOR_BASE,
    PYTHON_PER_ARROW,
    REMEMBERED_ROW_GROUPS,
    RowGroups,
    fit_actors,
    map_and_write,
)
from grid.model import HUB, ModelRef
from grid.shards import ProfileItems, SplitShards, default_workers, published, ranking_name, seeded
from grid.storage import digest, file_digest, is_published, join, open_input
from lamp.errors import LampError
from lamp.prompts import MAX_PROMPT_TOKENS, TokenCounter, WordCounter
from lamp.recipes import get_recipe
from lamp.retrieval import ranked_sides, select

RENDER_FORMAT = "1"
BATCH = 64  # examples per map_batches call: one tokenizer call renders them all
READ_CPUS = 0.01
TOKENIZER_BYTES = 512 << 20  # a renderer's tokenizer and the libraries it brings, over ACTOR_BASE
# Tokenizer files: what a render depends on in a model folder (not its weights).
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
PROMPT_SCHEMA = pa.schema([("render", pa.int32()), ("row", pa.int64()), ("id", pa.string()), ("user", pa.string()),
                           ("selection", pa.float64()), ("prompt", pa.string()), ("output", pa.string()),
                           ("retrieved", pa.list_(pa.string())), ("input_cut", pa.bool_())])
TOKEN_SCHEMA = pa.schema([(name, pa.list_(pa.int32())) for name in ("prompt_ids", "input_ids", "labels")])


def rendering_code_digest() -> str:
    """A hash of the rendering code's own source: a change to it invalidates stored renders."""
    modules = (lamp.cell, lamp.prompts, lamp.recipes, lamp.recipes.lamp, lamp.recipes.study, lamp.retrieval,
               lamp.seeding, lamp.tasks)
    return digest(*(Path(m.__file__).read_bytes() for m in modules), Path(__file__).read_bytes())


def tokenizer_digest(model: ModelRef) -> str:
    """A hash of the (resolved) model's tokenizer: its folder's files but the weights,
    or, for a hub id, the tokenizer as loaded and saved again."""
    if model.kind == HUB:
        folder = Path(tempfile.mkdtemp(prefix="lamp-grid-tokenizer-"))
        try:
            model.tokenizer().save_pretrained(folder)
            return folder_digest(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return folder_digest(Path(model.path))


def folder_digest(folder: Path) -> str:
    """A hash of a tokenizer folder: its files but the weights."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(WEIGHTS))
    return digest(*((p.relative_to(folder).as_posix(), file_digest(p)) for p in files))


def selection_fraction(user: str) -> float:
    """A user's place in [0, 1): train users below the selection share are held out
    for model selection. A hash of the user alone, so the held-out users are the
    same in every cell and every seed."""
    value = hashlib.blake2b(user.encode(), digest_size=8).digest()
    return int.from_bytes(value, "big") / 2 ** 64


def prompt_seed(cell) -> int | None:
    """The seed, where it changes a prompt: random draws or the random order. A BM25
    cell's prompts are the same for every seed, so its seeds share one render."""
    draws = any(seeded(side) for side in (cell.retriever, cell.input_retriever, cell.output_retriever) if side)
    return cell.seed if get_recipe(cell.recipe).seeds_every_render or cell.order == "random" or draws else None


@dataclass(frozen=True)
class Render:
    """What to render: a cell's first `limit` examples of a split, prompts built for `max_tokens`."""
    cell: object  # lamp.cell.Cell
    split: str
    limit: int | None
    max_tokens: int

    def inputs(self, splits: dict) -> list:
        """The cache directories it reads: its split's examples and rankings, and for
        the study's other-user draws both splits' examples."""
        shards, cell = splits[self.split], self.cell
        if not get_recipe(cell.recipe).reads_rankings:
            return [Path(str(s.examples)).parent.name for s in (splits.values() if cell.needs_pool else [shards])]
        by_input = cell.ablation == "decouple"
        rankings = [shards.ranking(ranking_name(side, by_input, cell.use_date), cell.seed)
                    for side in ranked_sides(cell.retriever, cell.input_retriever, cell.output_retriever)]
        return [Path(str(shards.examples)).parent.name, *(str(r).rstrip("/").rsplit("/", 1)[-1] for r in rankings)]

    def key(self, splits: dict, tokenizer: str, code: str) -> str:
        settings = {**asdict(self.cell), "seed": prompt_seed(self.cell)}
        return digest(RENDER_FORMAT, self.inputs(splits), sorted(settings.items()), tokenizer, self.max_tokens,
                      self.limit, code)


@dataclass(frozen=True)
class Rendered:
    """A render in the cache: `rendered.parquet` and its statistics."""
    directory: str  # a local path, or a URI in a cache at one
    stats: dict  # rows, items_shown (mean), input_cut_share

    @property
    def path(self) -> str:
        return join(self.directory, "rendered.parquet")

    @property
    def digest(self) -> str:
        """Its cache key: what made these prompts, hashed."""
        return self.directory.rstrip("/").rsplit("/", 1)[-1].removeprefix("render-")

    @property
    def rows(self) -> int:
        return self.stats["rows"]

    def dataset(self, columns: list, held_out: bool | None = None, share: float = 0.0):
        """Its rows as a Ray Dataset, streamed from the file (what a trial trains on);
        held_out True or False keeps only the users held out for model selection, or
        only the others."""
        import ray.data
        from ray.data.expressions import col

        # Read into the object store now, by the trial's driver: inside Ray Train, the
        # read tasks would compete with the trial's own workers for the CPUs (on a
        # small machine, forever). A sliver of CPU each: reading a file needs little.
        ds = ray.data.read_parquet(self.path, columns=columns + ["selection"] * (held_out is not None),
                                   num_cpus=READ_CPUS)
        if held_out is not None:
            kept = col("selection") < share if held_out else col("selection") >= share
            ds = ds.filter(expr=kept, num_cpus=READ_CPUS).select_columns(columns, num_cpus=READ_CPUS)
        return ds.materialize()

    def table(self, columns: list, held_out: bool | None = None, share: float = 0.0) -> pa.Table:
        """Its rows, read whole with pyarrow: for what a worker holds as a list anyway
        (the dev and selection rows it decodes), a Ray Dataset would only cost a trial
        seconds of execution start-up. held_out as for `dataset`."""
        table = pq.read_table(open_input(self.path), columns=columns + ["selection"] * (held_out is not None))
        if held_out is None:
            return table
        below = pa.compute.less(table.column("selection"), share)
        return table.filter(below if held_out else pa.compute.invert(below)).drop_columns(["selection"])


# --- rendering ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def split_examples(path: str) -> list:
    """A split's examples, loaded once per process: every `study` cell a renderer
    renders replays its draws over the same split (the replay copies what it changes)."""
    return load_examples(path)


class CellPrompts:
    """What one cell retrieves and renders for a split's examples. `lamp` reads the
    stored rankings, the rows around `row` only; `study` replays the study's draws
    over the whole split (splits: the task's SplitShards by name, whose examples
    its other-user retrievers draw from)."""

    def __init__(self, shards: SplitShards, cell, splits: dict | None = None):
        self.cell, self.recipe = cell, get_recipe(cell.recipe)
        if not self.recipe.reads_rankings:
            users = {}
            if cell.needs_pool:
                if splits is None:
                    raise LampError(f"recipe study's {cell.retriever} draws users of train and dev: "
                                    "it needs both splits' shards")
                users = {name: split_examples(str(split.examples)) for name, split in splits.items()}
            examples = users.get(shards.split) or split_examples(str(shards.examples))
            self.study_items = self.recipe.retrieve(cell, examples, train=users.get("train", ()),
                                                    dev=users.get("dev", ()))
            return
        by_input = cell.ablation == "decouple"
        self.sides = ranked_sides(cell.retriever, cell.input_retriever, cell.output_retriever)
        self.rankings = {side: RowGroups(join(str(shards.ranking(ranking_name(side, by_input, cell.use_date),
                                                                 cell.seed)),
                                              "ranking.parquet"), ["row", "cand_row", "cand_pos"])
                         for side in self.sides}
        # Other users' items (Full_Random, RanBM25) live in other rows of the split.
        self.others = ProfileItems(shards.examples) if cell.needs_pool else None

    def items(self, row: int, example, rows: list, positions: list) -> list:
        """The items at (rows[i], positions[i]): the example's own, or other users' read from the file."""
        if all(r == row for r in rows):
            return [example.profile[p] for p in positions]
        return self.others(rows, positions)

    def retrieved(self, row: int, example) -> list:
        """The items the cell retrieves for the example at `row`: `lamp` most relevant
        first, `study` in its prompt order."""
        cell = self.cell
        if not self.recipe.reads_rankings:
            return self.study_items[row]
        # Only the ranks the window can reach are looked up: a ranking holds the whole pool.
        reach = lamp.retrieval.reach(cell.retriever, cell.k, cell.rank_offset, len(example.profile))
        ranked = {}
        for side, rankings in self.rankings.items():
            ranking = rankings.row(row)
            assert ranking["row"] == row, f"{cell.task}: ranking rows out of order"
            ranked[side] = self.items(row, example, ranking["cand_row"][:reach], ranking["cand_pos"][:reach])
        return select(cell.task, cell.retriever, ranked, cell.k, cell.rank_offset, len(example.profile),
                      cell.input_retriever, cell.output_retriever)

    def render(self, rows: list, examples: list, counter, max_tokens: int = MAX_PROMPT_TOKENS) -> list:
        """The prompts of the examples at `rows`: what Cell.render_split gives."""
        items = [self.retrieved(row, e) for row, e in zip(rows, examples)]
        return self.recipe.prompts(self.cell, examples, items, counter, max_tokens)


class RenderCells:
    """map_batches callable: a batch of examples rendered for every Render asked of
    their split, one after the other, each row tagged with its Render's index.

    jobs: per examples file (its path or URI), (its SplitShards, the task's
    SplitShards by split, [(index, Render), ...]). prompt_ids feed generation;
    input_ids and labels feed training. A decoder-only model reads prompt and
    output as one sequence and learns only the output.
    """

    def __init__(self, jobs: dict, model: ModelRef | None):
        self.jobs, self.by_path, self.prompts = jobs, {}, {}
        self.tokenizer = self.decoder_only = None
        if model is not None:
            self.tokenizer, self.decoder_only = model.tokenizer(), model.decoder_only
        self.counter = TokenCounter(self.tokenizer) if self.tokenizer else WordCounter()
        self.schema = pa.unify_schemas([PROMPT_SCHEMA, TOKEN_SCHEMA]) if self.tokenizer else PROMPT_SCHEMA

    def job(self, path: str) -> tuple:
        """The job of the file a row came from (Ray Data names it without a URI's scheme)."""
        if path not in self.by_path:
            self.by_path[path] = next(job for examples, job in self.jobs.items() if examples.endswith(path))
        return self.by_path[path]

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [self.schema.empty_table()]
        for path in pa.compute.unique(batch.column("path")).to_pylist():
            shards, splits, renders = self.job(path)
            part = batch.filter(pa.compute.equal(batch.column("path"), path))
            limits = [render.limit for _, render in renders]
            if None not in limits:  # rows past every limit are not even read into Python
                part = part.filter(pa.compute.less(part.column("row"), max(limits)))
            records = part.to_pylist()
            for index, render in renders:
                kept = [r for r in records if render.limit is None or r["row"] < render.limit]
                if kept:
                    if index not in self.prompts:
                        self.prompts[index] = CellPrompts(shards, render.cell, splits)
                    tables.append(pa.table(self.render(index, render, kept), schema=self.schema))
        return pa.concat_tables(tables)

    def render(self, index: int, render: Render, records: list) -> dict:
        examples = [to_example(r) for r in records]
        rows = [r["row"] for r in records]
        rendered = self.prompts[index].render(rows, examples, self.counter, render.max_tokens)
        out = {"render": [index] * len(rows), "row": rows, "id": [e.id for e in examples],
               "user": [e.user for e in examples], "selection": [selection_fraction(e.user) for e in examples],
               "prompt": [p.text for p in rendered], "output": [e.output or "" for e in examples],
               "retrieved": [[item["id"] for item in p.items] for p in rendered],
               "input_cut": [p.input_cut for p in rendered]}
        if self.tokenizer is not None:
            cell = render.cell
            out["prompt"], prompt_ids = get_recipe(cell.recipe).model_inputs(self.tokenizer, cell.task, out["prompt"],
                                                                             render.max_tokens, self.decoder_only)
            out.update(self.token_ids(prompt_ids, out["output"]))
        return out

    def token_ids(self, prompt_ids: list, outputs: list) -> dict:
        if not self.decoder_only:
            return {"prompt_ids": prompt_ids, "input_ids": prompt_ids,
                    "labels": self.tokenizer(outputs)["input_ids"]}
        eos = [self.tokenizer.eos_token_id]
        answers = self.tokenizer([" " + o for o in outputs], add_special_tokens=False)["input_ids"]
        return {"prompt_ids": prompt_ids, "input_ids": [p + a + eos for p, a in zip(prompt_ids, answers)],
                "labels": [[-100] * len(p) + a + eos for p, a in zip(prompt_ids, answers)]}


def cell_table(shards: SplitShards, cell, model: ModelRef | None = None, limit: int | None = None,
               max_tokens: int = MAX_PROMPT_TOKENS, splits: dict | None = None) -> pa.Table:
    """The cell's rendered examples (and token ids, given a resolved model) as an
    Arrow table, rendered in this process by the code the pipeline runs."""
    if model is not None:
        max_tokens = get_recipe(cell.recipe).prompt_tokens(model.decoder_only, max_tokens)
    path = str(shards.examples)
    render = RenderCells({path: (shards, splits or {}, [(0, Render(cell, shards.split, limit, max_tokens))])}, model)
    with pq.ParquetFile(open_input(path)) as examples:
        tables = [render(pa.Table.from_batches([batch]).append_column("path", pa.array([path] * batch.num_rows)))
                  for batch in examples.iter_batches(BATCH)]
    return pa.concat_tables([t.drop_columns(["render"]) for t in tables if t.num_rows])


# --- the pipeline and the cache ---------------------------------------------------------


def renderer_memory(renders: list) -> int:
    """Bytes a renderer asks Ray for, given its (Render, the task's SplitShards by
    split) pairs: ACTOR_BASE and the tokenizer, and, as Python objects, its batch's
    row group of the examples and the few remembered for other users' items
    (Parquet's metadata gives their decoded sizes). A `study` renderer also holds
    the splits its draws run through."""
    def row_group_bytes(path) -> list:
        meta = pq.read_metadata(open_input(path))
        return [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)] or [0]

    held, whole = 0, set()
    for render, splits in renders:
        shards = splits[render.split]
        held = max(held, PYTHON_PER_ARROW * (1 + REMEMBERED_ROW_GROUPS) * max(row_group_bytes(shards.examples)))
        if not get_recipe(render.cell.recipe).reads_rankings:
            whole |= {str(s.examples) for s in (splits.values() if render.cell.needs_pool else [shards])}
    return ACTOR_BASE + TOKENIZER_BYTES + held + sum(PYTHON_PER_ARROW * sum(row_group_bytes(path)) for path in whole)


def write_renders(todo: dict, shards: dict, model: ModelRef, workers: int, progress, log=print) -> None:
    """Renders every Render of `todo` ((data, split) -> {final directory: Render}) in one
    Ray Data pass over the splits' examples, each into its own Parquet file with its
    statistics beside it; each directory appears when complete."""
    places, jobs = {}, {}  # places: a Render's index -> its final directory
    for (data, split), renders in todo.items():
        entries = []
        for directory, render in renders.items():
            entries.append((len(places), render))
            places[len(places)] = directory
        jobs[str(shards[data][split].examples)] = (shards[data][split], shards[data], entries)
    memory = renderer_memory([(render, job[1]) for job in jobs.values() for _, render in job[2]])
    workers, memory = fit_actors(workers, memory, "renderer", log)

    def renders(batch: pa.Table) -> dict:
        return {index: batch.filter(pa.compute.equal(batch.column("render"), index)).drop_columns(["render"])
                for index in pa.compute.unique(batch.column("render")).to_pylist()}

    def stats(index: int, directory, rows: int) -> None:
        written = pq.read_table(directory / "rendered.parquet", columns=["retrieved", "input_cut"])
        items = pa.compute.sum(pa.compute.list_value_length(written.column("retrieved"))).as_py()
        cut = pa.compute.sum(written.column("input_cut").cast("int64")).as_py()
        stats = {"rows": rows, "items_shown": items / rows, "input_cut_share": cut / rows}
        (directory / "stats.json").write_text(json.dumps(stats))

    map_and_write(list(jobs), RenderCells, dict(jobs=jobs, model=model), places, renders, "rendered.parquet",
                  batch_size=BATCH, memory=memory, workers=workers, finish=stats, progress=progress)


def render_grid(cells: list, shards: dict, model: ModelRef, cache: Path, remote: str | None = None,
                address: str | None = None, workers: int | None = None, predict_test: bool = False,
                log=print) -> dict:
    """Renders every split of every cell that the cache lacks; returns, per cell key,
    its Rendered splits ({"dev": ..., "train": ...}; train only where it trains; test
    with predict_test, where the task has a test split).

    shards: (task, setting) -> {split: SplitShards} (grid.run.splits_by_data); model: the grid's model, resolved (not
    `vote`); cache: the local (staging) cache; remote: the cache's URI where it is at
    one, renders published there."""
    tokenizer, code = tokenizer_digest(model), rendering_code_digest()
    wanted, groups, result = {}, set(), {}  # wanted: (data, split) -> {directory: Render}
    for grid_cell in cells:
        cell, training = grid_cell.cell, grid_cell.training
        max_tokens = get_recipe(cell.recipe).prompt_tokens(model.decoder_only, training.max_prompt_tokens)
        places = {}
        # The test split whole, whatever limit_dev: a submission holds every test id.
        test = [("test", None)] * (predict_test and "test" in shards[cell.data])
        for split, limit in [("dev", training.limit_dev)] + [("train", training.limit_train)] * bool(
                training.epochs_for(cell.task)) + test:
            render, split_shards = Render(cell, split, limit, max_tokens), shards[cell.data][split]
            name = f"render-{render.key(shards[cell.data], tokenizer, code)}"
            places[split] = cache / cell.task / f"{split_shards.setting}-{split}" / name
            wanted.setdefault((cell.data, split), {}).setdefault(places[split], render)
        groups.add(tuple(sorted(places.values())))
        result[grid_cell.key] = places

    def done(directory: Path) -> bool:
        return directory.is_dir() or bool(remote) and is_published(join(remote, directory.relative_to(cache)))

    todo = {(data, split): missing for (data, split), renders in wanted.items()
            if (missing := {d: r for d, r in renders.items() if not done(d)})}
    unrendered = {d for renders in todo.values() for d in renders}
    rendered = sum(any(d in unrendered for d in group) for group in groups)
    if todo:
        ensure_ray(address, log)
        examples = sum(min(render.limit or rows, rows) for (data, split), renders in todo.items()
                       for rows in [pq.read_metadata(open_input(shards[data][split].examples)).num_rows]
                       for render in renders.values())
        with tqdm(total=examples, unit="example", desc=f"render {rendered} cell(s)") as progress:
            write_renders(todo, shards, model, workers or default_workers(), progress, log)
    log(f"render: {rendered} cell(s) rendered, {len(groups) - rendered} cached")

    def located(directory: Path) -> Rendered:
        where = published(directory, cache, remote, log) if remote else str(directory)
        return Rendered(where, json.loads(open_input(join(where, "stats.json")).read()))

    return {key: {split: located(d) for split, d in places.items()} for key, places in result.items()}
