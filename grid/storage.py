"""Where grid/ keeps its files, and how they are written: the I/O layer at the
bottom of grid/, which imports nothing else of it.

Paths may be URIs: `s3://`, `gs://` (or `file://`) go through pyarrow's
filesystems, so the same commands run on one machine and on a cluster.

- LaMP data at a URI is mirrored into the work directory once, keyed by its
  listing (names, sizes, modification times), then read like a local folder:
  the streaming JSON reader seeks in local files.
- A shard cache at a URI is computed in a local staging cache, then each
  finished shard directory is published: copied up, and only then marked
  complete. Object stores have no rename, so the marker is what makes a shard
  directory count; one without it (a killed upload) is published again.
- Ray's storage path takes URIs itself.

Everything the cache holds is named by a hash of what it is made of (`digest`),
and written whole: built in a temporary directory beside its place and renamed
into it when complete (`build_atomically`, `write_atomically`). A killed build
leaves nothing that looks complete; its temporary directory names its host and
process, and the next build in that directory on that host removes it.
"""

import hashlib
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from lamp.errors import LampError

COMPLETE = "_COMPLETE"
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
BUILDING = ".tmp-"  # in a temporary directory's name: .<final name>.tmp-<host>-<pid>-<random>


# --- content hashing ------------------------------------------------------------------


def digest(*parts) -> str:
    """A hash of the parts' text: what the cache names an entry by."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        h.update(str(part).encode() + b"\x1f")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """A hash of a file's bytes."""
    h = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


# --- atomic builds and writes -----------------------------------------------------------


@contextmanager
def building(final: Path):
    """A temporary directory beside `final` to build it in (put_in_place renames it
    there), removed on leaving whatever happened. What killed builds left in the same
    directory on this host goes first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(final.parent)
    tmp = Path(tempfile.mkdtemp(dir=final.parent,
                                prefix=f".{final.name}{BUILDING}{socket.gethostname()}-{os.getpid()}-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def put_in_place(tmp: Path, final: Path) -> bool:
    """Renames a complete build to `final`; False if another process (a worker on the
    same node) built it first."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        return False
    return True


def build_atomically(final: Path, build) -> bool:
    """Runs build(tmp_dir) and renames tmp_dir to `final`; False if `final` exists."""
    if final.is_dir():
        return False
    with building(final) as tmp:
        build(tmp)
        return put_in_place(tmp, final)


def write_atomically(path: Path, data: bytes) -> None:
    """Writes a file whole: a reader finds the old one or the new one, never a part."""
    with building(path) as tmp:
        (tmp / path.name).write_bytes(data)
        os.replace(tmp / path.name, path)


def remove_dead_builds(directory: Path) -> None:
    """Removes the temporary directories that builds killed on this host left in
    `directory`: those whose process is gone (their names say whose they are)."""
    host = socket.gethostname()
    for path in directory.glob(f".*{BUILDING}*"):
        owner = re.fullmatch(r"(.+)-(\d+)-[^-]+", path.name.rsplit(BUILDING, 1)[1])
        if owner and owner[1] == host:
            try:
                os.kill(int(owner[2]), 0)
            except ProcessLookupError:
                shutil.rmtree(path, ignore_errors=True)


# --- paths that may be URIs -----------------------------------------------------------


def is_uri(path) -> bool:
    return bool(_URI.match(str(path)))


def filesystem(uri: str) -> tuple:
    """(pyarrow filesystem, path within it), or a clear error."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as error:
        raise LampError(f"{uri}: cannot open this location: {error}") from None


def open_input(path):
    """A file to read, at a local path or a URI: what pyarrow's readers take."""
    from pyarrow import fs

    if not is_uri(path):
        return fs.LocalFileSystem().open_input_file(str(Path(path).resolve()))
    source, where = filesystem(str(path))
    return source.open_input_file(where)


def local_data(path, into: Path, log=print) -> Path:
    """A data directory as a local path: one at a URI is copied into `into` once per version of it."""
    from pyarrow import fs

    if not is_uri(path):
        return Path(path)
    uri = str(path)
    source, root = filesystem(uri)
    try:
        infos = source.get_file_info(fs.FileSelector(root, recursive=True))
    except OSError as error:
        raise LampError(f"{uri}: cannot list it: {error}") from None
    files = sorted((i.path, i.size, i.mtime_ns) for i in infos if i.type == fs.FileType.File)
    if not files:
        raise LampError(f"{uri}: no files there")
    local = into / digest(uri, files)

    def copy(tmp: Path) -> None:
        fs.copy_files(root, str(tmp), source_filesystem=source, destination_filesystem=fs.LocalFileSystem())

    if build_atomically(local, copy):
        log(f"copied {len(files)} file(s) from {uri} into {local}")
    return local


def join(uri: str, *parts) -> str:
    return "/".join([uri.rstrip("/"), *map(str, parts)])


def is_published(uri: str) -> bool:
    from pyarrow import fs

    target, path = filesystem(uri)
    return target.get_file_info(join(path, COMPLETE)).type == fs.FileType.File


def publish(local: Path, uri: str) -> bool:
    """Copies a finished local directory to `uri`, then marks it complete; False if it already was."""
    from pyarrow import fs

    if is_published(uri):
        return False
    target, path = filesystem(uri)
    target.create_dir(path, recursive=True)  # a no-op on object stores; file systems need it
    fs.copy_files(str(local), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=target)
    with target.open_output_stream(join(path, COMPLETE)) as marker:
        marker.write(b"")
    return True
