"""Running lamp-grid's command line as a user would, in a subprocess."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """Its output as a terminal gets it: decoded here, not in text mode, which would
    turn every \\r of a redrawn progress bar into a new line."""
    done = subprocess.run([sys.executable, str(ROOT / "experiments.py"), *map(str, args)], capture_output=True,
                          cwd=ROOT, **kwargs)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))
