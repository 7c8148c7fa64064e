"""grid/storage.py: content hashing, atomic builds and writes, the cleanup of dead
builds; data and shard caches at URIs, through pyarrow's filesystems.

The URIs here are `file://` ones: the same code path as `s3://` and `gs://`
(pyarrow resolves the filesystem from the URI), on a store this machine has.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from grid.render import cell_table
from grid.run import Workdir, run_grid
from grid.shards import prepare
from grid.spec import parse_grid
from grid.storage import (
    COMPLETE,
    build_atomically,
    digest,
    file_digest,
    local_data,
    remove_dead_builds,
    write_atomically,
)
from lamp.cell import Cell
from lamp.errors import LampError
from lamp.synth import write_synthetic
from tests.cli import ROOT


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


def test_a_digest_is_of_the_content_only(tmp_path):
    assert digest("a", 1, [2]) == digest("a", 1, [2]) != digest("a", 1, [3])
    assert digest("ab", "c") != digest("a", "bc")  # parts are kept apart
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(b"x" * 1000)
    two.write_bytes(b"x" * 1000)
    assert file_digest(one) == file_digest(two)
    two.write_bytes(b"x" * 999 + b"y")
    assert file_digest(one) != file_digest(two)


def hidden(directory) -> list:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_build_that_fails_leaves_nothing_and_a_built_one_is_not_built_again(tmp_path):
    final = tmp_path / "cache" / "entry"

    def fail(tmp):
        (tmp / "half.parquet").write_bytes(b"half")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError):
        build_atomically(final, fail)
    assert not final.exists() and not hidden(final.parent)
    assert build_atomically(final, lambda tmp: (tmp / "whole").write_text("whole"))
    assert (final / "whole").read_text() == "whole" and not hidden(final.parent)
    assert not build_atomically(final, fail)  # there already: build is not called


KILLED_BUILD = """
import sys, time
from pathlib import Path
from grid.storage import build_atomically

def build(tmp):
    (tmp / "half").write_text("half")
    time.sleep(60)

build_atomically(Path(sys.argv[1]), build)
"""


def test_a_killed_build_leaves_no_result_and_the_next_build_removes_its_temporary(tmp_path):
    final = tmp_path / "entry"
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(final)], cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not any((p / "half").exists() for p in tmp_path.iterdir()):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (dead,) = hidden(tmp_path)
    assert dead.startswith(f".entry.tmp-{socket.gethostname()}-{process.pid}-") and not final.exists()
    assert build_atomically(final, lambda tmp: (tmp / "whole").write_text("whole"))
    assert (final / "whole").read_text() == "whole" and not hidden(tmp_path)


def test_only_dead_processes_temporaries_on_this_host_are_removed(tmp_path):
    alive = tmp_path / f".a.tmp-{socket.gethostname()}-{os.getpid()}-x1"
    elsewhere = tmp_path / ".b.tmp-another-host-1-x2"
    unnamed = tmp_path / ".c.tmp-x3"  # no host or process in its name: whose it is cannot be told
    for path in (alive, elsewhere, unnamed):
        path.mkdir()
    remove_dead_builds(tmp_path)
    assert hidden(tmp_path) == [alive.name, elsewhere.name, unnamed.name]


def test_a_file_written_atomically_is_replaced_whole(tmp_path):
    path = tmp_path / "report.md"
    write_atomically(path, b"first")
    write_atomically(path, b"second")
    assert path.read_bytes() == b"second" and [p.name for p in tmp_path.iterdir()] == ["report.md"]
