"""Running lamp-grid's command line as a user would, in a subprocess."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "experiments.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, **kwargs)
