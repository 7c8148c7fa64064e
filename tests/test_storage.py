"""Data and shard caches at URIs, through pyarrow's filesystems.

The URIs here are `file://` ones: the same code path as `s3://` and `gs://`
(pyarrow resolves the filesystem from the URI), on a store this machine has.
"""

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from grid.render import cell_table
from grid.run import Workdir, run_grid
from grid.shards import prepare
from grid.spec import parse_grid
from grid.storage import COMPLETE, local_data
from lamp.cell import Cell
from lamp.errors import LampError
from lamp.synth import write_synthetic


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("remote") / "LaMP"
    write_synthetic(out, tasks=["LaMP_2"], users=40, seed=3)
    return out


def test_data_at_a_uri_is_copied_once_per_version(data, tmp_path):
    messages = []
    first = local_data(data.as_uri(), tmp_path, messages.append)
    assert (first / "LaMP_2" / "dev" / "dev_questions.json").read_bytes() == \
        (data / "LaMP_2" / "dev" / "dev_questions.json").read_bytes()
    assert local_data(data.as_uri(), tmp_path, messages.append) == first and len(messages) == 1
    assert local_data(str(data), tmp_path) == data  # a local path stays itself
    with pytest.raises(LampError, match="nothing: cannot list it"):
        local_data((tmp_path / "nothing").as_uri(), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LampError, match="empty: no files there"):
        local_data((tmp_path / "empty").as_uri(), tmp_path)


def test_a_cache_at_a_uri_is_published_complete_and_renders_the_same(data, tmp_path, ray_local):
    remote = (tmp_path / "bucket" / "cache").as_uri()
    local = prepare(data, tmp_path / "local", retrievers=["BM25", "Random"], log=lambda _: None)
    messages = []
    published = prepare(data, remote, retrievers=["BM25", "Random"], stage_dir=tmp_path / "stage",
                        log=messages.append)
    assert sum("published" in m for m in messages) == 2 * 4  # 2 splits x (examples, BM25, BM25_input, Random)
    for shards in published:
        assert shards.examples.startswith("file://")
        for uri in [shards.examples.rsplit("/", 1)[0], *shards.rankings.values()]:
            assert (tmp_path / "bucket" / "cache" / uri.split("/cache/", 1)[1] / COMPLETE).is_file()
    cell = Cell("LaMP_2", "BM25", 2, "both", "end")
    for mine, theirs in zip(published, local):
        assert cell_table(mine, cell).to_pylist() == cell_table(theirs, cell).to_pylist()
    # A second prepare publishes nothing; an upload killed before its marker is published again.
    again = []
    prepare(data, remote, retrievers=["BM25", "Random"], stage_dir=tmp_path / "stage", log=again.append)
    assert not any("published" in m for m in again)
    ranking = published[0].rankings[("BM25", None)]
    marker = tmp_path / "bucket" / "cache" / ranking.split("/cache/", 1)[1] / COMPLETE
    marker.unlink()
    redo = []
    prepare(data, remote, retrievers=["BM25", "Random"], stage_dir=tmp_path / "stage", log=redo.append)
    assert sum("published" in m for m in redo) == 1 and marker.is_file()
    assert pq.read_table(ranking).sort_by("row").equals(pq.read_table(local[0].rankings[("BM25", None)])
                                                        .sort_by("row"))


def test_a_grid_reads_data_and_writes_shards_and_checkpoints_at_uris(data, tmp_path, ray_local):
    spec = parse_grid({"name": "uris", "tasks": ["LaMP_2"], "model": "vote",
                       "axes": [{"retriever": ["none", "BM25"], "k": [2]}]}, "uris")
    rows = run_grid(spec, data.as_uri(), tmp_path / "work", cache=(tmp_path / "bucket" / "cache").as_uri(),
                    storage=(tmp_path / "bucket" / "ray").as_uri(), log=lambda _: None)
    assert [r.status for r in rows] == ["FINISHED", "FINISHED"]
    assert list((tmp_path / "work" / "mirror").iterdir())  # the data, copied once
    assert any((tmp_path / "bucket" / "cache" / "LaMP_2").rglob(COMPLETE))
    assert any((tmp_path / "bucket" / "ray").iterdir())  # Tune's state, in the storage URI
    client = MlflowClient(Workdir(tmp_path / "work").tracking_uri)
    assert rows[1].metrics["dev_accuracy"] == client.get_run(rows[1].run_id).data.metrics["dev_accuracy"]
