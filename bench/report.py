"""Where a benchmark's result goes: printed, and written as JSON for BENCHMARKS.md."""

import json
from pathlib import Path


def write_result(result: dict, out: str) -> None:
    print(json.dumps(result, indent=1))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
