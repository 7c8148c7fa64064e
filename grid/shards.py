"""Precomputed profile shards: the expensive part of a grid, done once.

The study re-ranked, re-rendered and re-tokenized inside every training run,
so a sweep over ablation x order x k redid the same ranking dozens of times.
`prepare` instead

1. converts each task and split to Parquet once (streamed, bounded memory);
2. ranks every example's candidate pool once per (ranking, seed), as a Ray Data
   pipeline (read_parquet -> map_batches -> write_parquet): BM25 over full items
   and over input halves (for `decouple`), the Random permutation, and the
   other-user pools of Full_Random and RanBM25.

A ranking shard holds, per example row, references (row, position) to the
candidate items in rank order, and their scores. Everything a cell varies after
that (k, fractions, rank_offset, ablation, order, Mixed pairing) is derived by
rendering alone: `cell_dataset` hands a cell its prompts as a Ray Dataset.

The cache is content-addressed: a directory's name is a hash of what it was
computed from (the input files' bytes, the parameters, the source of the
ranking code). It is written under a temporary name and renamed when complete,
so a killed `prepare` leaves nothing that looks complete, and a second
`prepare` finds everything and does nothing.
"""

import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import lamp.cell
import lamp.retrieval
import lamp.seeding
from grid.storage import is_uri, join, publish
from lamp.data import Example, SplitFiles, find_splits, read_examples
from lamp.errors import LampError
from lamp.prompts import (
    MAX_PROMPT_TOKENS,
    Prompt,
    TokenizerTokens,
    WhitespaceTokens,
    render_prompt,
)
from lamp.retrieval import MIXED_SIDES, ItemPool, rank, ranked_sides, select
from lamp.study import Replay, study_prompt
from lamp.tasks import get_task

CACHE_FORMAT = "1"
ROWS_PER_WRITE = 256  # examples per Parquet row group while converting (LaMP_3 items are long)
RANKING_SCHEMA = pa.schema([("row", pa.int64()), ("cand_row", pa.list_(pa.int64())),
                            ("cand_pos", pa.list_(pa.int32())), ("score", pa.list_(pa.float64()))])
# Rankings that draw random numbers, and so are stored once per seed.
SEEDED = {"Random", "Full_Random", "RanBM25", "RanBM25_input"}
POOLED = {"Full_Random", "RanBM25"}


def ranking_name(retriever: str, by_input: bool) -> str:
    """BM25 and RanBM25 rank by input halves alone for `decouple`: a ranking of its own."""
    return f"{retriever}_input" if by_input and retriever in ("BM25", "RanBM25") else retriever


def rankings_for(task: str, retrievers, by_input: bool = True) -> list:
    """The rankings a task needs so that cells with these retrievers can render;
    by_input: also those over input halves, which only `decouple` reads."""
    has_input = by_input and get_task(task).input_half is not None
    names = []
    for retriever in retrievers:
        sides = MIXED_SIDES if retriever == "Mixed" else ranked_sides(retriever)
        for side in sides:
            names.append(ranking_name(side, False))
            if has_input:
                names.append(ranking_name(side, True))
    return list(dict.fromkeys(names))


def digest(*parts) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(str(part).encode() + b"\x1f")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    """The ranking code's own source: a change to it invalidates stored rankings."""
    return digest(*(Path(module.__file__).read_bytes() for module in (lamp.retrieval, lamp.seeding)),
                  Path(__file__).read_bytes())


@dataclass(frozen=True)
class SplitShards:
    task: str
    setting: str
    split: str
    examples: Path | str  # examples.parquet; a URI in a cache at one
    rankings: dict = field(default_factory=dict)  # (ranking name, seed or None) -> directory (or URI)

    def ranking(self, name: str, seed: int) -> Path:
        key = (name, seed if name in SEEDED else None)
        if key not in self.rankings:
            raise LampError(f"{self.task} {self.split}: no {name} ranking"
                            + (f" for seed {seed}" if name in SEEDED else "")
                            + " in the shard cache; run `prepare` with that retriever and seed")
        return self.rankings[key]


# --- 1. LaMP files to Parquet ------------------------------------------------------


def examples_schema(task: str) -> pa.Schema:
    spec = get_task(task)
    item = pa.struct([(name, pa.string()) for name in spec.item_fields] + [("date", pa.string())])
    return pa.schema([("row", pa.int64()), ("id", pa.string()), ("user", pa.string()),
                      ("input", pa.string()), ("output", pa.string()), ("profile", pa.list_(item))])


def example_record(row: int, example: Example, fields) -> dict:
    # Every item field is stored as text: LaMP_3 scores may be numbers in the
    # file, and str() is how rendering and BM25 read them anyway.
    profile = [{**{name: str(item[name]) for name in fields}, "date": item.get("date")}
               for item in example.profile]
    return {"row": row, "id": example.id, "user": example.user, "input": example.input,
            "output": example.output, "profile": profile}


def write_examples(split: SplitFiles, path: Path) -> int:
    """Streams a split into one Parquet file, a row group at a time; returns its rows."""
    schema = examples_schema(split.task)
    fields = list(get_task(split.task).item_fields)
    rows, n = [], 0
    with pq.ParquetWriter(path, schema) as writer:
        for example in read_examples(split):
            rows.append(example_record(n, example, fields))
            n += 1
            if len(rows) == ROWS_PER_WRITE:
                writer.write_table(pa.Table.from_pylist(rows, schema))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema))
    return n


def to_example(record: dict) -> Example:
    profile = [{k: v for k, v in item.items() if v is not None} for item in record["profile"]]
    return Example(id=record["id"], user=record["user"], input=record["input"], profile=profile,
                   output=record["output"])


def load_examples(path) -> list:
    return [to_example(record) for record in pq.read_table(path).to_pylist()]


# --- 2. Rankings, as a Ray Data pipeline ------------------------------------------


class RankExamples:
    """map_batches callable: every wanted (ranking, seed) of each example in a batch."""

    def __init__(self, task: str, examples_path: str, wanted: list):
        self.task, self.wanted = task, wanted
        self.examples = self.pool = None
        if any(name.removesuffix("_input") in POOLED for name, _ in wanted):
            # Other users' items: the whole split is needed.
            self.examples = load_examples(examples_path)  # a path or a URI
            self.pool = ItemPool(self.examples)
            # Items are referenced by identity: the pool hands out the very dicts.
            self.pool_refs = {id(item): (row, pos) for row, example in enumerate(self.examples)
                              for pos, item in enumerate(example.profile)}

    def __call__(self, batch: pa.Table) -> dict:
        records = batch.to_pylist()
        out = {"row": [record["row"] for record in records]}
        for name, seed in self.wanted:
            ranked = [self.rank(record, name, seed or 0) for record in records]
            for column in ("cand_row", "cand_pos", "score"):
                out[f"{name}/{seed}/{column}"] = [r[column] for r in ranked]
        return out

    def rank(self, record: dict, name: str, seed: int) -> dict:
        row = record["row"]
        example = self.examples[row] if self.examples else to_example(record)
        ranking = rank(self.task, example, name.removesuffix("_input"), by_input=name.endswith("_input"),
                       seed=seed, pool=self.pool)
        own = {id(item): (row, pos) for pos, item in enumerate(example.profile)}
        refs = [own.get(id(item)) or self.pool_refs[id(item)] for item in ranking.items]
        return {"cand_row": [r for r, _ in refs], "cand_pos": [p for _, p in refs],
                "score": None if ranking.scores is None else ranking.scores.tolist()}


def write_rankings(task: str, examples: str, wanted: dict, workers: int) -> None:
    """Computes the wanted rankings ((name, seed) -> final directory) in one Ray Data
    pass over the split, streaming each into its own Parquet file, then publishes
    each directory atomically."""
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    # Several blocks per worker, so that every worker gets a share of the split.
    # Rankers reserve a sliver of CPU; their number bounds what they use. Ray
    # Data's own tasks (listing and reading files) each need a whole free CPU on
    # one node, and rankers holding a share of every node's CPUs would starve
    # them: a hang. The sliver keeps them off nodes with no CPU for work (a head
    # started with --num-cpus=0).
    ds = ray.data.read_parquet(str(examples), override_num_blocks=4 * workers).map_batches(
        RankExamples, batch_size=64, batch_format="pyarrow", num_cpus=0.01,
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs=dict(task=task, examples_path=str(examples), wanted=list(wanted)))
    tmp = {key: Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
           for key, final in wanted.items()}
    writers = {key: pq.ParquetWriter(tmp[key] / "ranking.parquet", RANKING_SCHEMA) for key in wanted}
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for (name, seed), writer in writers.items():
                columns = [batch.column("row")] + [batch.column(f"{name}/{seed}/{c}") for c in
                                                   ("cand_row", "cand_pos", "score")]
                writer.write_table(pa.Table.from_arrays(columns, schema=RANKING_SCHEMA))
        for key, writer in writers.items():
            writer.close()
            os.replace(tmp[key], wanted[key])
    finally:
        for key in wanted:
            writers[key].close()
            shutil.rmtree(tmp[key], ignore_errors=True)


# --- the cache -----------------------------------------------------------------------


def build_atomically(final: Path, build) -> bool:
    """Runs build(tmp_dir) and renames tmp_dir to `final`; False if `final` exists."""
    if final.is_dir():
        return False
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            return False  # another process (a worker on the same node) built it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def default_workers() -> int:
    """A ranker per CPU of the cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def prepare(data_dir, cache_dir, tasks=None, retrievers=("BM25", "Random", "Full_Random", "RanBM25"),
            seeds=(0,), workers: int | None = None, address: str | None = None, by_input: bool = True,
            log=print, stage_dir=None) -> list:
    """Converts and ranks every split under data_dir into the cache; returns its SplitShards.
    by_input=False leaves out the rankings over input halves (`decouple` only).
    cache_dir may be a URI (s3://...): the shards are then computed in stage_dir, a
    local directory, and published there, and the SplitShards name the published copies."""
    from grid.cluster import check_nodes_reach, ensure_ray

    unknown = [r for r in retrievers if r not in lamp.retrieval.RETRIEVERS]
    if unknown:
        raise LampError(f"unknown retriever {unknown[0]!r}; valid: {', '.join(lamp.retrieval.RETRIEVERS)}")
    remote = str(cache_dir) if is_uri(cache_dir) else None
    if remote and stage_dir is None:
        raise LampError(f"a shard cache at {cache_dir} needs a local staging directory")
    # Absolute: Ray's workers read these paths from their own working directory.
    cache_dir, version = Path(stage_dir if remote else cache_dir).resolve(), code_version()
    result, computed, cached = [], 0, 0
    for split in find_splits(data_dir, tasks):
        fingerprint = digest(CACHE_FORMAT, file_digest(split.questions),
                             split.outputs and file_digest(split.outputs))
        where = cache_dir / split.task / f"{split.setting}-{split.split}"
        examples_dir = where / f"examples-{fingerprint}"
        label = f"{split.task} {split.setting}-based {split.split}"
        if build_atomically(examples_dir, lambda tmp: write_examples(split, tmp / "examples.parquet")):
            computed += 1
            log(f"converted {label} -> {examples_dir}")
        else:
            cached += 1
        examples = examples_dir / "examples.parquet"
        # Rankers may run on any node of the cluster: they read the cache's copy.
        source = join(published(examples_dir, cache_dir, remote, log), examples.name) if remote else str(examples)
        rankings = {}
        for name in rankings_for(split.task, retrievers, by_input):
            for seed in (seeds if name in SEEDED else [None]):
                key = digest(fingerprint, name, seed, version)
                rankings[(name, seed)] = where / f"{name}{'' if seed is None else f'-seed{seed}'}-{key}"
        missing = {key: path for key, path in rankings.items() if not path.is_dir()}
        cached += len(rankings) - len(missing)
        if missing:
            ensure_ray(address, log)
            if not remote:
                check_nodes_reach({"--cache": cache_dir}, {})
            write_rankings(split.task, source, missing, workers or default_workers())
            computed += len(missing)
            log(f"ranked {label}: " + ", ".join(f"{n}" + ("" if s is None else f" seed {s}")
                                                 for n, s in missing))
        result.append(SplitShards(split.task, split.setting, split.split, examples, rankings))
    log(f"prepare: {computed} shard(s) computed, {cached} already cached in {cache_dir}"
        + (" (nothing to do)" if computed == 0 else ""))
    if remote:
        result = [publish_split(s, cache_dir, remote, log) for s in result]
    return result


def published(directory: Path, local_root: Path, uri: str, log) -> str:
    """A staged cache directory's URI in the cache at `uri`, copied there if it is not yet."""
    target = join(uri, directory.relative_to(local_root).as_posix())
    if publish(directory, target):
        log(f"published {directory.relative_to(local_root)} to {target}")
    return target


def publish_split(shards: SplitShards, local_root: Path, uri: str, log) -> SplitShards:
    """The split's shards in the cache at `uri` (copied there if they are not yet), named there."""
    return replace(shards, examples=join(published(shards.examples.parent, local_root, uri, log),
                                         shards.examples.name),
                   rankings={key: published(directory, local_root, uri, log)
                             for key, directory in shards.rankings.items()})


# --- 3. Rendering a cell from the shards -------------------------------------------


@functools.lru_cache(maxsize=16)
def load_ranking(path: Path) -> list:
    """Per example row, its candidates as (row, position) pairs in rank order.

    Remembered: a ranking directory never changes (its name is its content's
    hash), and the cells of a grid read the same few rankings over and over."""
    table = pq.read_table(path, columns=["row", "cand_row", "cand_pos"]).sort_by("row")
    return [list(zip(rows, positions)) for rows, positions in
            zip(table.column("cand_row").to_pylist(), table.column("cand_pos").to_pylist())]


class CellPrompts:
    """A split's examples and what one cell retrieves for them, ready to render it:
    `lamp` reads the stored rankings; `study` replays the study's draws over the
    split (splits: the task's SplitShards by name, whose examples its other-user
    retrievers draw from)."""

    def __init__(self, shards: SplitShards, cell, examples=None, splits: dict | None = None):
        self.cell = cell
        self.spec = get_task(cell.task)
        self.examples = examples if examples is not None else load_examples(shards.examples)
        if cell.recipe == "study":
            users = {}
            if cell.needs_pool:
                if splits is None:
                    raise LampError(f"recipe study's {cell.retriever} draws users of train and dev: "
                                    "it needs both splits' shards")
                users = {name: load_examples(split.examples) for name, split in splits.items()}
            self.study_items = Replay(cell, users.get("train", ()), users.get("dev", ())).split(self.examples)
            return
        by_input = cell.ablation == "decouple"
        self.sides = ranked_sides(cell.retriever, cell.input_retriever, cell.output_retriever)
        self.rankings = {side: load_ranking(shards.ranking(ranking_name(side, by_input), cell.seed))
                         for side in self.sides}

    def retrieved(self, row: int) -> list:
        """The items the cell retrieves for the example at `row`: `lamp` most relevant
        first, `study` in its prompt order."""
        cell, example = self.cell, self.examples[row]
        if cell.recipe == "study":
            return self.study_items[row]
        # Only the ranks the window can reach are looked up: a ranking holds the whole pool.
        reach = lamp.retrieval.reach(cell.retriever, cell.k, cell.rank_offset, len(example.profile))
        ranked = {side: [self.examples[r].profile[p] for r, p in self.rankings[side][row][:reach]]
                  for side in self.sides}
        return select(cell.task, cell.retriever, ranked, cell.k, cell.rank_offset, len(example.profile),
                      cell.input_retriever, cell.output_retriever)

    def render(self, row: int, tokens, max_tokens: int = MAX_PROMPT_TOKENS) -> Prompt:
        """The prompt for the example at `row`: what Cell.render_split gives."""
        cell, example = self.cell, self.examples[row]
        if cell.recipe == "study":
            return study_prompt(cell.task, example.input, self.study_items[row], cell.ablation,
                                lamp.cell.study_tokenizer(tokens), max_tokens)
        return render_prompt(self.spec, example.input, self.retrieved(row), cell.ablation, cell.order,
                             cell.seed, example.id, tokens, max_tokens)


class RenderCell:
    """map_batches callable: rendered prompts of a cell and, given a model, token ids.

    prompt_ids feed generation; input_ids and labels feed training. A decoder-only
    model reads prompt and output as one sequence and learns only the output.
    """

    def __init__(self, shards: SplitShards, cell, model: str | None, max_tokens: int = MAX_PROMPT_TOKENS,
                 splits: dict | None = None):
        self.prompts, self.max_tokens = CellPrompts(shards, cell, splits=splits), max_tokens
        self.tokenizer = self.decoder_only = None
        if model is not None:
            from transformers import AutoConfig, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.decoder_only = not AutoConfig.from_pretrained(model).is_encoder_decoder
            self.max_tokens = lamp.cell.prompt_tokens(cell.recipe, self.decoder_only, max_tokens)
        self.tokens = TokenizerTokens(self.tokenizer) if self.tokenizer else WhitespaceTokens()

    def __call__(self, batch: pa.Table) -> dict:
        rows = batch.column("row").to_pylist()
        rendered = [self.prompts.render(row, self.tokens, self.max_tokens) for row in rows]
        examples = [self.prompts.examples[row] for row in rows]
        out = {"row": rows, "id": [e.id for e in examples], "user": [e.user for e in examples],
               "prompt": [prompt.text for prompt in rendered],
               "output": [e.output or "" for e in examples],
               "retrieved": [[item["id"] for item in prompt.items] for prompt in rendered],
               "input_cut": [prompt.input_cut for prompt in rendered]}
        if self.tokenizer is not None:
            cell = self.prompts.cell
            out["prompt"], prompt_ids = lamp.cell.model_inputs(self.tokenizer, cell.task, cell.recipe, out["prompt"],
                                                               self.max_tokens, self.decoder_only)
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


def cell_table(shards: SplitShards, cell, model: str | None = None, limit: int | None = None,
               max_tokens: int = MAX_PROMPT_TOKENS, splits: dict | None = None) -> pa.Table:
    """The cell's rendered examples (and token ids, given a model) as an Arrow table."""
    render = RenderCell(shards, cell, model, max_tokens, splits)
    rows = list(range(len(render.prompts.examples)))[:limit]
    return pa.concat_tables([pa.table(render(pa.table({"row": rows[i:i + 1024]})))
                             for i in range(0, len(rows), 1024)] or [pa.table(render(pa.table({"row": []})))])


def cell_dataset(shards: SplitShards, cell, model: str | None = None, limit: int | None = None):
    """The cell's examples as a Ray Dataset of rendered prompts, and token ids given a model.

    Rendering is cheap next to training, so it happens here, in the caller's
    process, from the shards; Ray Data then only hands rows to the workers. (A
    rendering pipeline of its own inside a Tune trial competes with the trial's
    workers for CPUs and can stall on a small machine.)
    """
    import ray

    return ray.data.from_arrow(cell_table(shards, cell, model, limit))
