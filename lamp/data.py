"""Finding, streaming and validating LaMP data files (docs/design.md §1).

Questions files are streamed one example at a time (LaMP_3's train file is
about 3 GB), so memory holds one example plus the set of ids seen. Golds are
joined to questions by id, never by position. Every problem is a LampError on
one line that names the file, and the example id and field where known.
"""

import ast
import codecs
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import ijson

from lamp.errors import LampError, data_error
from lamp.tasks import get_task

SPLITS = ("train", "dev", "test")
SETTINGS = ("user", "time")
TIME_DIRS = {"time", "time-based"}
SETTING_DIRS = TIME_DIRS | {"user-based"}
TASK_DIR = re.compile(r"LaMP_\d+")
QUESTIONS_FILE = re.compile(r"(train|dev|test)_questions\.jsonl?")
# How many of the missing or extra ids an error message lists.
IDS_SHOWN = 5
# Stands for an absent key, so that errors can tell it from an explicit null.
MISSING = object()
JSON_TYPE_NAMES = {str: "a string", int: "a number", float: "a number", bool: "a boolean",
                   list: "an array", dict: "an object", type(None): "null"}


@dataclass(frozen=True)
class SplitFiles:
    task: str
    split: str
    setting: str
    questions: Path
    outputs: Path | None  # None only for a test split, which has no public outputs


@dataclass(frozen=True, slots=True)
class Example:
    id: str
    # `user_id` where the file has one (time-based files); otherwise the id,
    # since user-based LaMP has one question per user.
    user: str
    input: str
    profile: list  # the file's profile items, with "id" as a string
    output: str | None  # the gold, joined by id; None for a test split


@dataclass(frozen=True)
class SplitSummary:
    examples: int
    users: int
    mean_profile: float
    max_profile: int


# --- finding the files -------------------------------------------------------


def find_splits(data_dir, tasks=None) -> list[SplitFiles]:
    """Every LaMP split under data_dir, in any layout of docs/design.md §1, sorted by
    (task, setting, split); `tasks` keeps only those tasks."""
    wanted = None if tasks is None else {get_task(name).name for name in tasks}
    root = Path(data_dir)
    if not root.is_dir():
        raise data_error(root, "no such directory" if not root.exists() else "not a directory")

    found = {}
    # Follow links: a data directory often links to task folders kept elsewhere.
    for directory, subdirs, names in os.walk(root, followlinks=True):
        subdirs.sort()
        for name in sorted(names):
            match = QUESTIONS_FILE.fullmatch(name)
            if match is None:
                continue
            questions = Path(directory) / name
            split = _split_files(questions, match.group(1), wanted)
            if split is None:
                continue
            key = (split.task, split.setting, split.split)
            if key in found:
                raise data_error(questions, f"{split.task} {split.setting}-based {split.split} "
                                            f"is also in {found[key].questions}; keep one")
            found[key] = split

    if not found:
        what = "no LaMP task" if wanted is None else "none of " + ", ".join(sorted(wanted))
        raise data_error(root, f"{what} found: expected LaMP_k/<split>/<split>_questions.json "
                               "or LaMP_k/<split>_questions.json")
    return sorted(found.values(), key=lambda s: (s.task, SETTINGS.index(s.setting),
                                                  SPLITS.index(s.split)))


def _split_files(questions: Path, split: str, wanted) -> SplitFiles | None:
    """The split a questions file belongs to, or None when it is outside any
    LaMP_k directory or its task is not wanted."""
    # abspath, not resolve: a symlinked task directory keeps its LaMP_k name.
    parts = Path(os.path.abspath(questions.parent)).parts[::-1]  # nearest first
    task_dir = next((part for part in parts if TASK_DIR.fullmatch(part)), None)
    if task_dir is None or (wanted is not None and task_dir not in wanted):
        return None
    try:
        task = get_task(task_dir).name
    except LampError as error:
        raise data_error(questions.parent, str(error)) from None
    setting_dir = next((part for part in parts if part in SETTING_DIRS), None)
    setting = "time" if setting_dir in TIME_DIRS else "user"

    outputs = questions.with_name(f"{split}_outputs.json")
    if not outputs.is_file():
        if split != "test":
            raise data_error(questions, f"no outputs file {outputs.name} beside it "
                                        f"(only the test split may lack one)")
        outputs = None
    return SplitFiles(task=task, split=split, setting=setting, questions=questions,
                      outputs=outputs)


# --- outputs (golds or predictions) ------------------------------------------


def read_outputs(path, task=None) -> dict[str, str]:
    """id -> output from a `{"task", "golds": [{"id", "output"}]}` file; when
    `task` is given the file must say that task."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = json.load(f)  # outputs files are small: one short string per example
    except OSError as error:
        raise data_error(path, f"cannot read: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise data_error(path, f"malformed JSON at line {error.lineno} column {error.colno}: "
                               f"{error.msg}") from None
    except UnicodeDecodeError:
        raise data_error(path, "not UTF-8 text") from None

    if not isinstance(data, dict):
        raise data_error(path, f'expected an object {{"task", "golds"}}, got {_json_type(data)}')
    if task is not None and data.get("task") != task:
        found = f"says {data['task']!r}" if "task" in data else "is missing"
        raise data_error(path, f"{found}, expected {task!r}", field="task")
    golds = data.get("golds")
    if not isinstance(golds, list):
        raise data_error(path, f"expected an array, got {_json_type(golds)}", field="golds")

    outputs = {}
    for index, entry in enumerate(golds):
        field = f"golds[{index}]"
        if not isinstance(entry, dict):
            raise data_error(path, f"expected an object, got {_json_type(entry)}", field=field)
        entry_id = _as_id(entry.get("id", MISSING))
        if entry_id is None:
            raise data_error(path, _not_an_id(entry.get("id", MISSING)), field=f"{field}.id")
        output = entry.get("output", MISSING)
        # LaMP_3 golds are strings like "4", but some copies write the number.
        if _is_number(output):
            output = str(output)
        elif not isinstance(output, str):
            raise data_error(path, f"expected a string, got {_json_type(output)}",
                             example_id=entry_id, field=f"{field}.output")
        if entry_id in outputs:
            raise data_error(path, "duplicate id", example_id=entry_id, field=f"{field}.id")
        outputs[entry_id] = output
    return outputs


# --- questions, streamed -----------------------------------------------------


def read_examples(split: SplitFiles) -> Iterator[Example]:
    """The split's examples, streamed with their golds joined by id. Checks
    every question as it goes; ids without a gold, or golds without a
    question, are reported together once the stream ends."""
    spec = get_task(split.task)
    golds = None if split.outputs is None else read_outputs(split.outputs, split.task)
    seen = set()
    # Questions without a gold are not yielded; count them, keep a few to name.
    missing, missing_count = [], 0
    for where, obj in _stream_questions(split.questions):
        example = _example(obj, spec, split.questions, where)
        if example.id in seen:
            raise data_error(split.questions, f"duplicate id (at {where})",
                             example_id=example.id, field="id")
        seen.add(example.id)
        if golds is None:
            yield example
        elif example.id in golds:
            yield replace(example, output=golds[example.id])
        else:
            missing_count += 1
            if len(missing) < IDS_SHOWN:
                missing.append(example.id)

    extra = [] if golds is None else [i for i in golds if i not in seen]
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"{missing_count} question id(s) have no gold in "
                            f"{split.outputs}: {_some(missing, missing_count)}")
        if extra:
            problems.append(f"{len(extra)} extra id(s) in {split.outputs} have no question: "
                            f"{_some(extra, len(extra))}")
        raise data_error(split.questions, "; ".join(problems))


def summarize_split(split: SplitFiles) -> SplitSummary:
    """Counts over a split, read in one streaming pass."""
    examples = total = largest = 0
    users = set()
    for example in read_examples(split):
        examples += 1
        users.add(example.user)
        total += len(example.profile)
        largest = max(largest, len(example.profile))
    return SplitSummary(examples=examples, users=len(users),
                        mean_profile=total / examples if examples else 0.0,
                        max_profile=largest)


def _stream_questions(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed question) pairs from a JSON array or JSON Lines file,
    told apart by the first non-blank byte; `where` locates it for errors."""
    try:
        with open(path, "rb") as f:
            first = _skip_to_content(f)
            if first == b"[":
                yield from _stream_array(f, path)
            elif first == b"{":
                f.seek(0)  # line numbers count from the top of the file
                yield from _stream_lines(f, path)
            elif first == b"":
                raise data_error(path, "the file is empty: expected a JSON array or JSON Lines")
            else:
                raise data_error(path, f"starts with {first!r}: expected a JSON array ('[') "
                                       "or JSON Lines ('{')")
    except OSError as error:
        raise data_error(path, f"cannot read: {error.strerror}") from None


def _skip_to_content(f) -> bytes:
    """Skips a UTF-8 byte order mark and leading whitespace, leaving `f` at
    the first byte of content, which it returns (b"" for a blank file)."""
    if f.read(3) != codecs.BOM_UTF8:
        f.seek(0)
    while (byte := f.read(1)) in (b" ", b"\t", b"\r", b"\n"):
        pass
    f.seek(-len(byte), os.SEEK_CUR)
    return byte


def _stream_lines(f, path: Path) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as error:
            raise data_error(path, f"line {number} column {error.colno}: malformed JSON: "
                                   f"{error.msg}") from None
        except UnicodeDecodeError:
            raise data_error(path, f"line {number}: not UTF-8 text") from None


def _stream_array(f, path: Path) -> Iterator[tuple[str, object]]:
    reader = _CountingReader(f)
    try:
        for index, obj in enumerate(ijson.items(reader, "item", use_float=True)):
            yield f"array item {index}", obj
    except ijson.JSONError as error:
        raise data_error(path, _describe_parse_error(reader, str(error))) from None


class _CountingReader:
    """A binary file that remembers the last chunk it handed out and where it
    started, because yajl's errors give a position only within that chunk."""

    def __init__(self, f):
        self._f = f
        self.consumed = f.tell()
        self.chunk_start = self.consumed
        self.chunk = b""

    def read(self, size=-1) -> bytes:
        data = self._f.read(size)
        if data:  # keep the last real chunk when the end of file is reached
            self.chunk_start, self.chunk = self.consumed, data
            self.consumed += len(data)
        return data


# yajl prints its error as three lines: the reason, up to 30 bytes of the chunk
# before the error and 30 after (newlines shown as spaces), indented so that
# the byte just past the offending one sits at this column, then an arrow.
YAJL_ARROW_COLUMN = 40


def _describe_parse_error(reader: _CountingReader, message: str) -> str:
    """One line saying what yajl found wrong and at which byte of the file."""
    reason, _, rest = _yajl_bytes(message).partition(b"\n")
    reason = " ".join(reason.decode("utf-8", "replace").split()).rstrip(".")
    if "premature EOF" in reason:
        return (f"malformed JSON: {reason}: the file ends after {reader.consumed} bytes, "
                "before the array is complete (truncated?)")
    context_line = rest.partition(b"\n")[0]
    context = context_line.lstrip(b" ")
    context_start = _find_context(reader.chunk, context)
    if context_start is None:  # not found as printed: give the chunk's range
        where = f"between bytes {reader.chunk_start} and {reader.consumed}"
    else:
        past_error = context_start + YAJL_ARROW_COLUMN - (len(context_line) - len(context))
        where = f"at byte offset {reader.chunk_start + past_error - 1}"
    near = " ".join(context.decode("utf-8", "replace").split())
    return f"malformed JSON {where}: {reason}" + (f", near: {near}" if near else "")


def _yajl_bytes(message: str) -> bytes:
    """yajl's message as bytes: ijson passes it as text, or as the repr of
    its bytes when the quoted context cuts a multi-byte character in two."""
    if message[:2] in ("b'", 'b"'):
        return ast.literal_eval(message)
    return message.encode("utf-8")


def _find_context(chunk: bytes, context: bytes) -> int | None:
    """Where yajl's context text starts in the chunk (first match), or None."""
    if not context.strip():
        return None
    start = chunk.replace(b"\n", b" ").replace(b"\r", b" ").find(context)
    return None if start < 0 else start


# --- checking one question ---------------------------------------------------


def _example(obj, spec, path: Path, where: str) -> Example:
    """The question as an Example (no gold yet), or an error naming its field."""
    if not isinstance(obj, dict):
        raise data_error(path, f"expected a question object, got {_json_type(obj)} "
                               f"(at {where})")
    example_id = _as_id(obj.get("id", MISSING))

    def fail(field, message):
        return data_error(path, f"{message} (at {where})", example_id=example_id, field=field)

    if example_id is None:
        raise fail("id", _not_an_id(obj.get("id", MISSING)))
    text = obj.get("input", MISSING)
    if not isinstance(text, str):
        raise fail("input", f"expected a string, got {_json_type(text)}")
    user = _as_id(obj.get("user_id", example_id))
    if user is None:
        raise fail("user_id", _not_an_id(obj["user_id"]))
    profile = obj.get("profile", MISSING)
    if not isinstance(profile, list):
        raise fail("profile", f"expected an array, got {_json_type(profile)}")

    for index, item in enumerate(profile):
        field = f"profile[{index}]"
        if not isinstance(item, dict):
            raise fail(field, f"expected an object, got {_json_type(item)}")
        for key, allowed in spec.item_fields.items():
            if key not in item:
                raise fail(f"{field}.{key}", f"missing (a {spec.name} profile item has "
                                             f"{', '.join(spec.item_fields)})")
            if not _has_type(item[key], allowed):
                raise fail(f"{field}.{key}", f"expected {_type_names(allowed)}, "
                                             f"got {_json_type(item[key])}")
        if "date" in item and not isinstance(item["date"], str):
            raise fail(f"{field}.date", f"expected a string, got {_json_type(item['date'])}")
        item["id"] = str(item["id"])
    return Example(id=example_id, user=user, input=text, profile=profile, output=None)


def _as_id(value) -> str | None:
    """An id (a string, or a whole number written without quotes) as a
    string; None when the value cannot be an id."""
    if isinstance(value, str) or _has_type(value, int):
        return str(value)
    return None


def _not_an_id(value) -> str:
    return f"expected a string or integer id, got {_json_type(value)}"


def _has_type(value, allowed) -> bool:
    # bool is an int in Python, but true/false is not a number in JSON.
    return isinstance(value, allowed) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _has_type(value, (int, float))


def _type_names(allowed) -> str:
    types = allowed if isinstance(allowed, tuple) else (allowed,)
    return " or ".join(dict.fromkeys(JSON_TYPE_NAMES[t] for t in types))


def _json_type(value) -> str:
    """How JSON would name the value's type, for error messages."""
    if value is MISSING:
        return "nothing (the key is missing)"
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _some(ids: list, count: int) -> str:
    """The first few of `count` ids, for a one-line message."""
    shown = ", ".join(repr(i) for i in ids[:IDS_SHOWN])
    return shown + (", ..." if count > IDS_SHOWN else "")
