"""A grid on a worker node that shares nothing with the head: checks/cluster_check.py,
which builds the two nodes in Linux namespaces on this machine (root needed; the
test is skipped, with the script's reason, where the machine refuses them). It starts
with the test session and runs beside the other tests (tests/conftest.py): most of its
minutes are spent waiting."""

import sys
from pathlib import Path

import pytest

from tests.beside import Check

SCRIPT = Path(__file__).resolve().parent.parent / "checks" / "cluster_check.py"
REFUSED = 77  # the script's exit status when the machine will not make namespaces
TIMEOUT = 1800  # the script gives itself 1500 s, then fails and cleans up
EXPECTED = [
    "setup: the worker node joined the head across the veth",
    "setup: the worker cannot see the head's directory",
    "setup: the worker's 127.0.0.1 is its own (no MLflow there)",
    "A: prepare exited 0",
    "A: prepare's rankers ran on the worker node",
    "A: the job SUCCEEDED",
    "A: every cell FINISHED",
    "A: nothing RUNNING or SCHEDULED",
    "A: the parent run FINISHED",
    "A: every finished cell's artifacts reached the server",
    "A: the trials ran on the worker node",
    "A: no trial errored (nothing was killed)",
    "B: the worker node was killed in the middle of a trial",
    "B: the job SUCCEEDED",
    "B: every cell FINISHED",
    "B: nothing RUNNING or SCHEDULED",
    "B: the trial on the killed node errored and was retried",
]


def start_check() -> Check:
    return Check([sys.executable, SCRIPT])


def tail(output: str, lines: int = 80) -> str:
    return "\n".join(output.strip().splitlines()[-lines:])


@pytest.mark.slow
@pytest.mark.beside.with_args(start_check)  # with_args: a lone callable would be decorated
def test_a_grid_runs_and_survives_losing_a_worker_node_that_shares_nothing_with_the_head(beside):
    status, output = beside.wait(TIMEOUT)
    if status == REFUSED:
        pytest.skip(output.strip().splitlines()[-1] if output.strip() else "namespaces refused")
    assert status == 0, f"cluster_check.py exited {status}; its output ends:\n{tail(output)}"
    missing = [line for line in EXPECTED if f"PASS: {line}" not in output]
    assert not missing, f"checks that did not pass: {missing}; the output ends:\n{tail(output)}"
