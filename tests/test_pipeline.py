"""grid/pipeline.py: the row-group reader, the ordered Ray Data map-and-write that
prepare and render share, and the actor-memory fit."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from grid.pipeline import RowGroups, fit_actors, map_and_write
from lamp.errors import LampError


def numbered(path, rows: int, group: int) -> None:
    """A Parquet file of `rows` numbered rows, `group` rows per row group."""
    pq.write_table(pa.table({"row": list(range(rows)), "value": [f"v{i}" for i in range(rows)]}), path,
                   row_group_size=group)


def hidden(directory) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_row_groups_give_rows_by_number_remembering_a_few_groups(tmp_path):
    path = tmp_path / "rows.parquet"
    numbered(path, 25, 10)
    rows = RowGroups(path, ["value"], remembered=2)
    assert rows.group_of([0, 9, 10, 24]).tolist() == [0, 0, 1, 2]
    assert [rows.row(i)["value"] for i in (24, 3, 12, 0)] == ["v24", "v3", "v12", "v0"]
    assert list(rows.groups) == [1, 0] and rows.group(1).column_names == ["value"]


class Doubled:
    """A map_batches callable: each row twice over, as two outputs' rows. started: a
    file each actor made of it adds its process id to."""

    def __init__(self, fail_at=None, started=None):
        self.fail_at = fail_at
        if started is not None:
            with open(started, "a") as out:
                out.write(f"{os.getpid()}\n")

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.fail_at is not None and self.fail_at in batch.column("row").to_pylist():
            raise RuntimeError("a mapper failed")
        return batch.drop_columns(["path"]).append_column("twice", pa.compute.multiply(batch.column("row"), 2))


def halves(batch: pa.Table) -> dict:
    return {"rows": batch.select(["row", "value"]), "twice": batch.select(["row", "twice"])}


def test_the_ordered_map_and_write_keeps_each_files_rows_in_order(tmp_path, ray_local):
    path = tmp_path / "a.parquet"
    numbered(path, 300, 7)  # many small row groups: blocks for both actors, out of order if unordered
    finals = {"rows": tmp_path / "out" / "rows", "twice": tmp_path / "out" / "twice"}
    finished = {}

    def finish(key, directory, rows):
        finished[key] = rows
        (directory / "rows.txt").write_text(str(rows))

    map_and_write([path], Doubled, {}, finals, halves, "part.parquet", batch_size=5, memory=1 << 20,
                  workers=2, finish=finish)
    assert finished == {"rows": 300, "twice": 300}
    assert pq.read_table(finals["rows"] / "part.parquet").equals(pq.read_table(path))
    assert pq.read_table(finals["twice"] / "part.parquet").column("twice").to_pylist() == list(range(0, 600, 2))
    assert (finals["twice"] / "rows.txt").read_text() == "300" and not hidden(tmp_path / "out")


@pytest.mark.parametrize("rows, group", [(8, 3), (30, 30)])  # fewer rows than a batch; one row group
def test_no_more_actors_start_than_the_rows_make_blocks_and_batches(rows, group, tmp_path, ray_local):
    path, started = tmp_path / "a.parquet", tmp_path / "started.txt"
    numbered(path, rows, group)
    finals = {"rows": tmp_path / "out" / "rows", "twice": tmp_path / "out" / "twice"}
    map_and_write([path], Doubled, {"started": str(started)}, finals, halves, "part.parquet", batch_size=10,
                  memory=1 << 20, workers=2)
    assert len(started.read_text().splitlines()) == 1
    assert pq.read_table(finals["rows"] / "part.parquet").equals(pq.read_table(path))


def test_a_failed_map_and_write_leaves_no_output(tmp_path, ray_local):
    path = tmp_path / "a.parquet"
    numbered(path, 60, 7)
    finals = {"rows": tmp_path / "out" / "rows", "twice": tmp_path / "out" / "twice"}
    with pytest.raises(Exception, match="a mapper failed"):
        map_and_write([path], Doubled, {"fail_at": 50}, finals, halves, "part.parquet", batch_size=5,
                      memory=1 << 20, workers=1)
    assert not any(final.exists() for final in finals.values()) and not hidden(tmp_path / "out")
    with pytest.raises(LampError, match="no rows"):
        map_and_write([path], Doubled, {}, finals, lambda batch: {"rows": halves(batch)["rows"]}, "part.parquet",
                      batch_size=5, memory=1 << 20, workers=1)
    assert not any(final.exists() for final in finals.values()) and not hidden(tmp_path / "out")


def test_actors_ask_for_no_more_memory_than_a_node_has_and_only_as_many_as_fit(ray_local):
    memory = ray_local.cluster_resources()["memory"]
    said = []
    assert fit_actors(2, 1 << 20, "ranker", said.append) == (2, 1 << 20) and not said
    assert fit_actors(3, int(memory * 0.6), "renderer", said.append) == (1, int(memory * 0.6))
    assert said == [f"3 renderers of {memory * 0.6 / 2**30:.1f} GiB do not fit the cluster's memory: running 1"]
    assert fit_actors(2, int(memory * 5), "ranker", print) == (1, int(memory))
