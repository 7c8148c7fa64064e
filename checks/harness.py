"""The two-node check's own plumbing: where the repository and its venv are, the
check's deadline, waiting, running a command, and the two ways its set-up can fail."""

import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv: every node's image has it
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Refused(Exception):
    """This machine will not build the namespaces (not root, no `ip netns`, no unshare)."""


class HarnessError(Exception):
    """The check's own set-up failed: no verdict on the product."""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def tail(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEADLINE = [float("inf")]  # the whole check's end (--timeout): every wait stops there


def within(timeout: float) -> float:
    """`timeout`, or less: what is left of the whole check's time."""
    return max(1.0, min(timeout, DEADLINE[0] - time.time()))


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    timeout = within(timeout)
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")


def sh(args, env=None, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=within(timeout))
    if check and done.returncode != 0:
        raise HarnessError(f"{shlex.join(args)} exited {done.returncode}:\n{tail(done.stdout + done.stderr, 20)}")
    return done
