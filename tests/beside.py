"""A check that runs beside the other tests: started with the session (tests/conftest.py,
the `beside` marker), read back by its test at the end."""

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.cli import ROOT


class Check:
    """A check running as a process group of its own, its output (stderr too) in a
    file of its folder: a pipe nobody reads for minutes would stop it when full."""

    def __init__(self, args: list, folder: Path | None = None, env: dict | None = None):
        self.folder = folder or Path(tempfile.mkdtemp(prefix="lamp-check-"))
        self.output = self.folder / "output.txt"
        with open(self.output, "w") as out:
            self.process = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                            env=env, start_new_session=True)

    def wait(self, timeout: float) -> tuple:
        """(exit status, output); on a timeout, the check is stopped and the test fails."""
        try:
            status = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"{self.process.args[:3]} ran past {timeout} s; its output ends:\n"
                        + "\n".join(self.output.read_text().splitlines()[-80:]))
        return status, self.output.read_text()

    def stop(self) -> None:
        """SIGTERM (a check cleans up on it), then SIGKILL to what is left; its folder goes."""
        for sig, grace in ((signal.SIGTERM, 120), (signal.SIGKILL, 30)):
            if self.process.poll() is None:
                os.killpg(self.process.pid, sig)
                try:
                    self.process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    continue
        shutil.rmtree(self.folder, ignore_errors=True)
