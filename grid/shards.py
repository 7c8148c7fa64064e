"""Precomputed profile shards: the expensive part of a grid, done once.

The study re-ranked, re-rendered and re-tokenized inside every training run,
so a sweep over ablation x order x k redid the same ranking dozens of times.
`prepare` instead

1. converts each task and split to Parquet once (streamed, bounded memory:
   grid/examples.py);
2. ranks every example's candidate pool once per (ranking, seed), as a Ray Data
   pipeline (read_parquet -> map_batches -> write_parquet): BM25 over full items
   and over input halves (for `decouple`), each also over texts with the items'
   dates (`use_date`), the Random permutation, Recency, and the other-user pools
   of Full_Random and RanBM25; Contriever by the dot product of embeddings an
   encoder gave the split before, once (grid/embed.py).

A ranking shard holds, per example row, references (row, position) to the
candidate items in rank order, and their scores. Everything a cell varies after
that (k, fractions, rank_offset, ablation, order, Mixed pairing) is derived by
rendering alone, once per grid, before its trials (grid/render.py).

The cache is content-addressed: a directory's name is a hash of what it was
computed from (the input files' bytes, the parameters, the source of the
ranking code). It is written under a temporary name and renamed when complete,
so a killed `prepare` leaves nothing that looks complete, and a second
`prepare` finds everything and does nothing.
"""

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import lamp.retrieval
import lamp.seeding
from grid.cluster import check_nodes_reach, ensure_ray
from grid.embed import DEFAULT_RETRIEVER_MODEL, embed_split, read_embeddings, resolve_encoder
from grid.examples import profile_items, to_example, write_examples
from grid.pipeline import ACTOR_BASE, PYTHON_PER_ARROW, REMEMBERED_ROW_GROUPS, RowGroups, fit_actors, map_and_write
from grid.storage import build_atomically, digest, file_digest, is_uri, join, open_input, publish
from lamp.data import Example, find_splits
from lamp.errors import LampError
from lamp.retrieval import (DENSE, MIXED_SIDES, TEXT_RANKED, ItemPool, check_dates, is_date, pool_draw, rank,
                            ranked_sides)
from lamp.tasks import get_task

CACHE_FORMAT = "1"
RANKING_SCHEMA = pa.schema([("row", pa.int64()), ("cand_row", pa.list_(pa.int64())),
                            ("cand_pos", pa.list_(pa.int32())), ("score", pa.list_(pa.float64()))])
POOLED = {"Full_Random", "RanBM25"}
CHUNK = 64  # examples a ranker turns into Python objects at a time
PREFETCH_BYTES = 256 << 20  # other users' items (as Arrow) a ranker reads for one batch


def ranking_name(retriever: str, by_input: bool, use_date: bool = False) -> str:
    """BM25, RanBM25 and the dense retrievers rank by input halves alone for
    `decouple`, and BM25 and RanBM25 over texts with the items' dates for `use_date`:
    each a ranking of its own."""
    by_input = by_input and retriever in (*TEXT_RANKED, *DENSE)
    return retriever + "_input" * by_input + "_date" * (use_date and retriever in TEXT_RANKED)


def is_dense(name: str) -> bool:
    """Whether a ranking is by an encoder's embeddings (and so is named by the encoder too)."""
    return ranking_parts(name)[0] in DENSE


def ranking_parts(name: str) -> tuple:
    """(retriever, by_input, use_date) of a ranking_name."""
    dated = name.endswith("_date")
    name = name.removesuffix("_date")
    return name.removesuffix("_input"), name.endswith("_input"), dated


def seeded(name: str) -> bool:
    """Whether a ranking draws random numbers, and so is stored once per seed."""
    return ranking_parts(name)[0] in {"Random", *POOLED}


def rankings_for(task: str, retrievers, by_input: bool = True, use_date: bool = False) -> list:
    """The rankings a task needs so that cells with these retrievers can render;
    by_input: also those over input halves, which only `decouple` reads; use_date:
    also those over texts with dates."""
    has_input = by_input and get_task(task).input_half is not None
    names = []
    for retriever in retrievers:
        sides = MIXED_SIDES if retriever == "Mixed" else ranked_sides(retriever)
        for side, dated in itertools.product(sides, (False, True) if use_date else (False,)):
            names.append(ranking_name(side, False, dated))
            if has_input:
                names.append(ranking_name(side, True, dated))
    return list(dict.fromkeys(names))


def reads_dates(name: str) -> bool:
    """Whether a ranking reads the items' dates: Recency, or a use_date one."""
    return name == "Recency" or ranking_parts(name)[2]


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
        key = (name, seed if seeded(name) else None)
        if key not in self.rankings:
            raise LampError(f"{self.task} {self.setting}-based {self.split}: no {name} ranking"
                            + (f" for seed {seed}" if seeded(name) else "")
                            + " in the shard cache; run `prepare` with that retriever and seed")
        return self.rankings[key]


# --- Rankings, as a Ray Data pipeline ------------------------------------------


class ProfileItems:
    """Profile items of examples.parquet by (row, position), read a row group at a
    time (its `profile` column only)."""

    def __init__(self, path):
        self.rows = RowGroups(path, ["profile"])

    def take(self, rows, positions) -> pa.ChunkedArray:
        """The items at (rows[i], positions[i]), rows in file order, as Arrow: a chunk
        for each row group they lie in, read once."""
        rows, positions = np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        if (rows[1:] < rows[:-1]).any():
            raise ValueError("ProfileItems.take reads rows in file order")
        groups = self.rows.group_of(rows)
        parts = []
        for group in np.unique(groups).tolist():
            wanted = groups == group
            profiles = self.rows.group(group).column("profile").chunk(0)
            at = profiles.offsets.to_numpy()[rows[wanted] - self.rows.starts[group]] + positions[wanted]
            parts.append(profiles.values.take(pa.array(at)))
        return pa.chunked_array(parts, self.rows.file.schema_arrow.field("profile").type.value_type)

    def __call__(self, rows, positions) -> list[dict]:
        """The items at (rows[i], positions[i]), in that order, as `load_examples` gives them."""
        rows, positions = np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        items = [None] * len(rows)
        for i, item in zip(order.tolist(), profile_items(self.take(rows[order], positions[order]).to_pylist())):
            items[i] = item
        return items


def take_items(items: pa.ChunkedArray, starts: np.ndarray, at: np.ndarray) -> list[dict]:
    """items[at] as Python, chunk by chunk (starts: where each chunk starts). Arrow's
    own take on a chunked array first joins its chunks: a copy of them all."""
    chunks = np.searchsorted(starts, at, side="right") - 1
    taken = [None] * len(at)
    for chunk in np.unique(chunks).tolist():
        wanted = np.flatnonzero(chunks == chunk)
        chosen = items.chunk(chunk).take(pa.array(at[wanted] - starts[chunk]))
        for i, item in zip(wanted.tolist(), profile_items(chosen.to_pylist())):
            taken[i] = item
    return taken


def profile_id_column(file: pq.ParquetFile) -> str:
    """The Parquet column path of profile item ids (profile.list.element.id)."""
    schema = file.schema
    paths = [schema.column(i).path for i in range(len(schema))]
    (path,) = [p for p in paths if p.startswith("profile.") and p.endswith(".id")]
    return path


def parquet_pool(path, items=None) -> ItemPool:
    """The ItemPool of an examples file, read from its users and item ids alone, a
    row group at a time: what `ItemPool(load_examples(path))` lays out and draws,
    at a few bytes per item. items(rows, positions) fetches drawn items (by
    default from the file, as ProfileItems reads them)."""
    file = pq.ParquetFile(open_input(path))
    column = profile_id_column(file)
    users, sizes, ids = [], [], []
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=["user", column])
        profiles = table.column("profile").combine_chunks()
        users += table.column("user").to_pylist()
        sizes.append(pc.list_value_length(profiles).fill_null(0).to_numpy())
        ids.append(profiles.flatten().field("id"))
    pool = ItemPool.from_ids(users, np.concatenate(sizes) if sizes else [], pa.chunked_array(ids, pa.string()),
                             items or ProfileItems(path))
    pa.default_memory_pool().release_unused()  # laying it out took ~15x what it keeps
    return pool


def place_keys(rows, positions) -> np.ndarray:
    """(row, pos) pairs as sortable integers."""
    return (np.asarray(rows, dtype=np.int64) << 32) | np.asarray(positions, dtype=np.int64)


def pooled_draws(wanted) -> list:
    """The distinct draws of other users' items among wanted rankings: (retriever, seed);
    a RanBM25 ranking over input halves, or with dates, draws what RanBM25 draws."""
    return sorted({(ranking_parts(name)[0], seed or 0) for name, seed in wanted if ranking_parts(name)[0] in POOLED})


class RankExamples:
    """map_batches callable: every wanted (ranking, seed) of each example in a batch.

    It holds no split: a batch's own examples come with it, and other users'
    items (Full_Random, RanBM25) are drawn from a pool of slots, (row, pos) in
    examples.parquet, and read from the file. Draws spread over the whole split,
    so a batch's draws are made first and its items read together, each row
    group once, into an Arrow store; `rank` then draws them again, the same, and
    the pool fetches them from there. Batches are turned into Python objects
    CHUNK examples at a time.
    """

    def __init__(self, task: str, examples_path: str, wanted: list, embeddings: dict | None = None):
        self.task, self.wanted = task, wanted
        # A dense ranking's embeddings.parquet (ranking name -> path), read by row as the batch's rows come.
        self.embeddings = {name: RowGroups(path, ["query", "items"]) for name, path in (embeddings or {}).items()}
        self.pool = self.file = None
        self.draws = pooled_draws(wanted)
        self.clear()
        if self.draws:
            self.file = ProfileItems(examples_path)
            self.pool = parquet_pool(examples_path, self.items)

    def clear(self) -> None:
        self.keys = np.zeros(0, dtype=np.int64)  # the batch's drawn places, sorted, and their items in `store`
        self.store, self.starts = None, None
        self.places = {}  # id(item) -> (row, pos) of the pooled items handed out

    def prefetch(self, batch: pa.Table) -> None:
        """Reads the items every pooled ranking of the batch draws."""
        sizes = pc.list_value_length(batch.column("profile")).fill_null(0).to_pylist()
        drawers = [Example(id=i, user=u, input="", profile=[None] * n, output=None)
                   for i, u, n in zip(batch.column("id").to_pylist(), batch.column("user").to_pylist(), sizes)]
        slots = np.unique(np.concatenate([pool_draw(example, retriever, self.pool, seed) for example in drawers
                                          for retriever, seed in self.draws] or [np.zeros(0, dtype=np.int64)]))
        rows, positions = self.pool.row[slots], self.pool.pos[slots]
        self.keys = place_keys(rows, positions)
        order = np.argsort(self.keys)
        self.keys = self.keys[order]
        self.store = self.file.take(rows[order], positions[order])
        self.starts = np.cumsum([0] + [len(chunk) for chunk in self.store.chunks])

    def items(self, rows, positions) -> list[dict]:
        """Pooled items by (row, pos): from the batch's store, else from the file."""
        keys = place_keys(rows, positions)
        at = np.searchsorted(self.keys, keys)
        found = at < len(self.keys)
        found[found] = self.keys[at[found]] == keys[found]
        if found.all():
            items = take_items(self.store, self.starts, at)
        else:  # a draw `prefetch` did not foresee: correct, only slower
            items = self.file(rows, positions)
        self.places.update(zip(map(id, items), zip(rows, positions)))
        return items

    def __call__(self, batch: pa.Table) -> dict:
        out = {"row": batch.column("row").to_pylist()}
        columns = {f"{name}/{seed}/{c}": [] for name, seed in self.wanted for c in ("cand_row", "cand_pos", "score")}
        try:
            if self.pool is not None:
                self.prefetch(batch)
            for start in range(0, batch.num_rows, CHUNK):
                records = batch.slice(start, CHUNK).to_pylist()
                examples = [to_example(record) for record in records]
                for name, seed in self.wanted:
                    for record, example in zip(records, examples):
                        for column, value in self.rank(record["row"], example, name, seed or 0).items():
                            columns[f"{name}/{seed}/{column}"].append(value)
                        self.places.clear()  # the items it handed out are gone
        finally:
            self.clear()
        return {**out, **columns}

    def rank(self, row: int, example: Example, name: str, seed: int) -> dict:
        retriever, by_input, use_date = ranking_parts(name)
        vectors = None
        if name in self.embeddings:
            table = self.embeddings[name]
            group = int(table.group_of(row))
            vectors = read_embeddings(table.group(group), row - int(table.starts[group]))
        ranking = rank(self.task, example, retriever, by_input=by_input, use_date=use_date, seed=seed, pool=self.pool,
                       embeddings=vectors)
        # Items are known by identity: the example's own, or pooled ones by their slot's place.
        own = {id(item): (row, pos) for pos, item in enumerate(example.profile)}
        refs = [own.get(id(item)) or self.places[id(item)] for item in ranking.items]
        return {"cand_row": [r for r, _ in refs], "cand_pos": [p for _, p in refs],
                "score": None if ranking.scores is None else ranking.scores.tolist()}


def ranker_plan(examples, wanted, workers: int) -> tuple[int, int]:
    """(examples per batch, bytes of memory a ranker asks Ray for), from the
    examples file's Parquet metadata, which gives each row group's decoded
    (uncompressed) bytes, per column, and its count of profile items.

    A ranker holds, over ACTOR_BASE: its batch as Arrow, CHUNK examples of it as
    Python objects (PYTHON_PER_ARROW times Arrow's bytes), and
    its results as Python lists and Arrow (~140 bytes a candidate). With other users' items
    it also holds the pool (12 bytes an item; laying it out peaks near 200 bytes
    an item, before any batch), the REMEMBERED_ROW_GROUPS decoded profile columns
    and the batch's drawn items as Arrow: a batch is as many examples as draw
    PREFETCH_BYTES of items (one read of the split per batch), or CHUNK if more,
    but at most a worker's share of the split.
    """
    meta = pq.read_metadata(open_input(examples))
    groups = [meta.row_group(g) for g in range(meta.num_row_groups)]
    rows = sum(g.num_rows for g in groups)
    if not rows:
        return CHUNK, ACTOR_BASE
    profile = [[c for c in range(g.num_columns) if g.column(c).path_in_schema.startswith("profile.")]
               for g in groups]
    profile_bytes = [sum(g.column(c).total_uncompressed_size for c in cs) for g, cs in zip(groups, profile)]
    items = sum(g.column(c).num_values for g, cs in zip(groups, profile)
                for c in cs if g.column(c).path_in_schema.endswith(".id"))
    row_bytes = max(g.total_byte_size / g.num_rows for g in groups if g.num_rows)
    item_bytes = sum(profile_bytes) / max(items, 1)
    mean_profile = items / rows
    draws = len(pooled_draws(wanted)) * mean_profile  # items a pooled example draws
    batch, held, build = CHUNK, 0, 0
    if draws:
        share = -(-rows // max(workers, 1))
        batch = max(1, min(share, max(CHUNK, int(PREFETCH_BYTES // max(draws * item_bytes, 1)))))
        held = 12 * items + 150 * rows + REMEMBERED_ROW_GROUPS * max(profile_bytes) + batch * draws * item_bytes
        build = 200 * items + 150 * rows
    steady = (batch * row_bytes + PYTHON_PER_ARROW * CHUNK * row_bytes
              + 140 * batch * len(wanted) * max(mean_profile, 1))
    return batch, int(ACTOR_BASE + max(build, held + steady))


def embeddings_bytes(embeddings: dict) -> int:
    """What a ranker holds of dense rankings' embeddings: REMEMBERED_ROW_GROUPS decoded row groups of each file."""
    largest = []
    for path in embeddings.values():
        meta = pq.read_metadata(open_input(path))
        largest.append(max((meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)), default=0))
    return REMEMBERED_ROW_GROUPS * sum(largest)


def write_rankings(task: str, examples: str, wanted: dict, workers: int, log=print,
                   embeddings: dict | None = None) -> None:
    """Computes the wanted rankings ((name, seed) -> final directory) in one Ray Data
    pass over the split, streaming each into its own Parquet file; each directory
    appears when complete. embeddings: a dense ranking's embeddings.parquet, by ranking name."""
    embeddings = {name: path for name, path in (embeddings or {}).items() if (name, None) in wanted}
    batch_size, memory = ranker_plan(examples, wanted, workers)
    workers, memory = fit_actors(workers, memory + embeddings_bytes(embeddings), "ranker", log)

    def rankings(batch: pa.Table) -> dict:
        return {(name, seed): pa.Table.from_arrays([batch.column("row")] + [batch.column(f"{name}/{seed}/{c}")
                                                                            for c in RANKING_SCHEMA.names[1:]],
                                                   schema=RANKING_SCHEMA)
                for name, seed in wanted}

    map_and_write([examples], RankExamples, dict(task=task, examples_path=str(examples), wanted=list(wanted),
                                                 embeddings=embeddings),
                  wanted, rankings, "ranking.parquet", batch_size=batch_size, memory=memory, workers=workers)


def check_split_dates(examples, questions, parsed: bool) -> None:
    """Refuses, before any ranking, a split whose profile items lack a date (parsed:
    or have one Recency cannot sort by), naming the LaMP file it came from
    (lamp.retrieval.check_dates). Reads the examples' ids and the items' ids and
    dates alone, a row group at a time. Dates repeat (days), so each distinct one
    is read once; only a row group that holds a bad one is read item by item, to
    name it."""
    file = pq.ParquetFile(examples)
    item_id = profile_id_column(file)
    columns = ["id", item_id, item_id.removesuffix(".id") + ".date"]
    for group in range(file.num_row_groups):
        table = file.read_row_group(group, columns=columns)
        dates = pc.unique(table.column("profile").combine_chunks().flatten().field("date")).to_pylist()
        if any(date is None or parsed and not is_date(date) for date in dates):
            for record in table.to_pylist():
                check_dates(questions, record["id"], record["profile"] or [], parsed)


# --- the cache -----------------------------------------------------------------------


def default_workers() -> int:
    """A ranker per CPU of the cluster."""
    import ray  # heavy: imported where Ray runs

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def prepare(data_dir, cache_dir, tasks=None, retrievers=("BM25", "Random", "Full_Random", "RanBM25"),
            seeds=(0,), workers: int | None = None, address: str | None = None, by_input: bool = True,
            log=print, stage_dir=None, use_date: bool = False, settings=None,
            retriever_model: str = DEFAULT_RETRIEVER_MODEL) -> list:
    """Converts and ranks every split under data_dir (of `settings` only, if given) into
    the cache; returns its SplitShards.
    by_input=False leaves out the rankings over input halves (`decouple` only);
    use_date=True adds those over texts with the items' dates.
    cache_dir may be a URI (s3://...): the shards are then computed in stage_dir, a
    local directory, and published there, and the SplitShards name the published copies.
    retriever_model: the encoder of the dense retrievers (a hub id or a local folder)."""
    unknown = [r for r in retrievers if r not in lamp.retrieval.RETRIEVERS]
    if unknown:
        raise LampError(f"unknown retriever {unknown[0]!r}; valid: {', '.join(lamp.retrieval.RETRIEVERS)}")
    encoder = resolve_encoder(retriever_model, log) if set(retrievers) & set(DENSE) else None
    remote = str(cache_dir) if is_uri(cache_dir) else None
    if remote and stage_dir is None:
        raise LampError(f"a shard cache at {cache_dir} needs a local staging directory")
    # Absolute: Ray's workers read these paths from their own working directory.
    cache_dir, version = Path(stage_dir if remote else cache_dir).resolve(), code_version()
    result, computed, cached = [], 0, 0
    for split in find_splits(data_dir, tasks):
        if settings is not None and split.setting not in settings:
            continue
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
        for name in rankings_for(split.task, retrievers, by_input, use_date):
            for seed in (seeds if seeded(name) else [None]):
                # A dense ranking is also named by its encoder's files: another encoder ranks again.
                key = digest(fingerprint, name, seed, version, *([encoder.files_digest] if is_dense(name) else []))
                rankings[(name, seed)] = where / f"{name}{'' if seed is None else f'-seed{seed}'}-{key}"
        missing = {key: path for key, path in rankings.items() if not path.is_dir()}
        cached += len(rankings) - len(missing)
        if any(reads_dates(name) for name, _ in missing):
            check_split_dates(examples, split.questions, parsed="Recency" in {name for name, _ in missing})
        if missing:
            ensure_ray(address, log)
            if not remote:
                check_nodes_reach({"--cache": cache_dir}, {})
            embeddings = embed_split(split.task, source, where, fingerprint, [n for n, _ in missing if is_dense(n)],
                                     encoder, workers, label, log)
            if remote:
                embeddings = {name: join(published(path.parent, cache_dir, remote, log), path.name)
                              for name, path in embeddings.items()}
            write_rankings(split.task, source, missing, workers or default_workers(), log, embeddings)
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
