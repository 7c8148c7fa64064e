"""A LaMP split as one Parquet file of examples (`prepare`'s first step, grid/shards.py),
streamed a row group at a time so that memory stays bounded, and read back."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lamp.data import Example, SplitFiles, read_examples
from lamp.tasks import get_task

ROWS_PER_WRITE = 256  # examples per Parquet row group while converting (LaMP_3 items are long)


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


def profile_items(items: list) -> list[dict]:
    """Stored profile items as the loader gives them: a field (the date) only where the file had it."""
    return [{k: v for k, v in item.items() if v is not None} for item in items]


def to_example(record: dict) -> Example:
    return Example(id=record["id"], user=record["user"], input=record["input"],
                   profile=profile_items(record["profile"]), output=record["output"])


def load_examples(path) -> list:
    return [to_example(record) for record in pq.read_table(path).to_pylist()]
