"""Running lamp-grid's command line as a user would: in a subprocess, or called in
this process where a subprocess would prove nothing more (the verbs that start no
Ray cluster, and `run` beside the session's cluster, the fixture ray_local, which it
joins)."""

import contextlib
import io
import subprocess
import sys
from pathlib import Path

from grid.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """Its output as a terminal gets it: decoded here, not in text mode, which would
    turn every \\r of a redrawn progress bar into a new line."""
    done = subprocess.run([sys.executable, str(ROOT / "experiments.py"), *map(str, args)], capture_output=True,
                          cwd=ROOT, **kwargs)
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                       done.stderr.decode(errors="replace"))


def call_cli(*args) -> subprocess.CompletedProcess:
    """The command line's main() called in this process: its exit status and what it
    printed, as run_cli gives them."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit:  # argparse's refusals
            code = exit.code
    return subprocess.CompletedProcess(["lamp-grid", *map(str, args)], code, out.getvalue(), err.getvalue())
