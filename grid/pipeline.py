"""The one Ray Data pipeline of grid/, and reading Parquet a row group at a time.

`prepare` ranks every example of a split and `render` renders every cell of a
grid the same way: Parquet files read in file and row order, mapped through a
pool of actors, and each result written, in row order, into a file of its own
that appears only when complete (`map_and_write`). What is written is read back
by position (`RowGroups`): row numbers are positions in the file.

Actors ask Ray for the memory they hold (`fit_actors`: no more than the
cluster's nodes have), so a node runs no more of them than it can hold.
"""

from contextlib import ExitStack

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from grid.storage import building, open_input, put_in_place
from lamp.errors import LampError

# Actors reserve a sliver of CPU; their number bounds what they use. Ray Data's own
# tasks (listing and reading files) each need a whole free CPU on one node, and
# actors holding a share of every node's CPUs would starve them: a hang. The
# sliver keeps them off nodes with no CPU for work (a head started with --num-cpus=0).
ACTOR_CPUS = 0.01
ACTOR_BASE = 512 << 20  # an actor's Python, numpy, pyarrow and Ray (a Ray worker is ~250 MB), and slack
PYTHON_PER_ARROW = 4  # Python objects of rows take about 4x their bytes as Arrow
REMEMBERED_ROW_GROUPS = 2  # row groups a RowGroups keeps decoded


class RowGroups:
    """A Parquet file's rows by row number, read a row group at a time (the given
    columns only); the last few row groups read are remembered. Row numbers are
    positions in the file: every file of the cache is written in row order."""

    def __init__(self, path, columns: list, remembered: int = REMEMBERED_ROW_GROUPS):
        self.file = pq.ParquetFile(open_input(path))
        self.columns, self.remembered, self.groups = columns, remembered, {}  # row group -> its table, newest last
        meta = self.file.metadata
        self.starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])

    def group_of(self, rows) -> np.ndarray:
        """The row group each row lies in."""
        return np.searchsorted(self.starts, rows, side="right") - 1

    def group(self, group: int) -> pa.Table:
        """A row group's columns, each one chunk."""
        if group in self.groups:
            self.groups[group] = self.groups.pop(group)
        else:
            if len(self.groups) >= self.remembered:
                del self.groups[next(iter(self.groups))]
            # One thread: an actor runs per CPU.
            table = self.file.read_row_group(group, columns=self.columns, use_threads=False)
            self.groups[group] = table.combine_chunks()
        return self.groups[group]

    def row(self, row: int) -> dict:
        """A row's columns as Python."""
        group = int(self.group_of(row))
        return self.group(group).slice(row - self.starts[group], 1).to_pylist()[0]


def fit_actors(workers: int, memory: int, what: str, log) -> tuple[int, int]:
    """(actors, memory each) that the cluster's nodes with CPUs can hold: an actor
    pool asking for more than fits would wait for memory forever. what: an actor's
    name, for the log."""
    import ray  # heavy: imported where Ray runs

    nodes = [node["Resources"] for node in ray.nodes()
             if node.get("Alive") and node["Resources"].get("CPU", 0) > 0]
    largest = max((node.get("memory", 0) for node in nodes), default=0)
    if largest and memory > largest:
        log(f"a {what} wants {memory / 2**30:.1f} GiB; the largest node has {largest / 2**30:.1f} GiB for Ray:"
            " asking for that")
        memory = int(largest)
    fits = sum(int(node.get("memory", 0) // memory) for node in nodes) if largest else workers
    if fits < workers:
        log(f"{workers} {what}s of {memory / 2**30:.1f} GiB do not fit the cluster's memory: running {fits}")
    return max(1, min(workers, fits)), memory


def read_in_order(groups: list):
    """Parquet row groups ({"path", "group"}, in file and row order) as a Ray Dataset in
    that order, one block per row group (so that every actor gets a share), with each
    row's file in a `path` column. Ray Data's own Parquet reader does not keep a file's
    row groups in order (seen with Ray 2.60, preserve_order set), and what is written
    from these rows is read back by position."""
    import ray.data  # heavy: imported where Ray runs

    return ray.data.from_items(groups, override_num_blocks=len(groups)).map_batches(read_row_group, batch_size=1)


def read_row_group(item: dict) -> pa.Table:
    (path,), (group,) = item["path"], item["group"]
    table = pq.ParquetFile(open_input(str(path))).read_row_group(int(group))
    return table.append_column("path", pa.array([str(path)] * table.num_rows))


def check_order(rows: pa.Array, expected: int, where) -> int:
    """The row number after this batch's; refuses rows out of order (written by position, read back so)."""
    if not pc.all(pc.equal(rows, pa.array(range(expected, expected + len(rows))))).as_py():
        raise LampError(f"{where}: rows arrived out of order from Ray Data (expected rows from {expected} on)")
    return expected + len(rows)


def map_and_write(paths: list, mapper, arguments: dict, finals: dict, parts, name: str, *, batch_size: int,
                  memory: int, workers: int, gpus: int = 0, finish=None, progress=None) -> None:
    """Maps the rows of the Parquet files at `paths`, in order, through at most `workers`
    actors of the class `mapper` (built with `arguments`; each asks Ray for `memory`
    bytes), and writes what they give, in order, into outputs: parts(batch) is
    {key: that output's rows of the batch}, numbered from 0 in a `row` column, and
    appended to the Parquet file `name` in a temporary directory for finals[key].
    When all rows are written (every output has some), finish(key, directory,
    rows) may add to each; then each directory is renamed to its final place.
    progress: a bar (tqdm) counting the rows written, in place of Ray Data's own.
    gpus: the GPUs each actor asks for (an encoder's, grid/embed.py)."""
    import ray  # heavy: imported where Ray runs

    # An actor is given whole blocks (row groups), batch_size rows at a time: one beyond
    # the blocks or the batches would start (Ray, a tokenizer, an encoder) for no work,
    # as on a small split.
    metadata = [(str(path), pq.read_metadata(open_input(str(path)))) for path in paths]
    groups = [{"path": path, "group": group} for path, meta in metadata for group in range(meta.num_row_groups)]
    total = sum(meta.num_rows for _, meta in metadata)
    workers = max(1, min(workers, len(groups), -(-total // batch_size)))
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows stay in file order
    if progress is not None:
        context.enable_progress_bars = False
    ds = read_in_order(groups).map_batches(
        mapper, batch_size=batch_size, batch_format="pyarrow", num_cpus=ACTOR_CPUS, num_gpus=gpus, memory=memory,
        compute=ray.data.ActorPoolStrategy(size=workers), fn_constructor_kwargs=arguments)
    with ExitStack() as cleanup:
        tmp = {key: cleanup.enter_context(building(final)) for key, final in finals.items()}
        writers = {}
        cleanup.callback(lambda: [writer.close() for writer in writers.values()])
        rows = dict.fromkeys(finals, 0)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for key, part in parts(batch).items():
                rows[key] = check_order(part.column("row"), rows[key], finals[key])
                if key not in writers:
                    writers[key] = pq.ParquetWriter(tmp[key] / name, part.schema)
                writers[key].write_table(part)
                if progress is not None:
                    progress.update(part.num_rows)
        empty = [final for key, final in finals.items() if key not in writers]
        if empty:
            raise LampError(f"{empty[0]}: no rows to write")
        for key, final in finals.items():
            writers.pop(key).close()
            if finish is not None:
                finish(key, tmp[key], rows[key])
            put_in_place(tmp[key], final)
