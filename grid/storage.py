"""Paths that may be URIs: `s3://`, `gs://` (or `file://`) go through pyarrow's
filesystems, so the same commands run on one machine and on a cluster.

- LaMP data at a URI is mirrored into the work directory once, keyed by its
  listing (names, sizes, modification times), then read like a local folder:
  the streaming JSON reader seeks in local files.
- A shard cache at a URI is computed in a local staging cache, then each
  finished shard directory is published: copied up, and only then marked
  complete. Object stores have no rename, so the marker is what makes a shard
  directory count; one without it (a killed upload) is published again.
- Ray's storage path takes URIs itself.
"""

import re
from pathlib import Path

from lamp.errors import LampError

COMPLETE = "_COMPLETE"
_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


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

    from grid.shards import build_atomically, digest

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
