"""Peak resident memory, from /proc (Linux): this process's, reset between phases, and
its descendants' whose command line names a marker (Ray workers), polled. Standard
library only: the benchmark's child processes import it before anything else."""

import os
import resource
import threading
from pathlib import Path


def status_kb(pid, field: str) -> int:
    """A field of /proc/PID/status in kB (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Resets this process's VmHWM to its current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_mb() -> float:
    return round(status_kb("self", "VmHWM") / 1024, 1)


def max_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: kB


def parent_pid(pid) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])  # the command may hold spaces and parentheses


def descends_from(pid, root: int, depth: int = 4) -> bool:
    """Whether `root` is among the process's first `depth` ancestors (a local Ray's
    workers are children of its raylet, a child of the driver)."""
    for _ in range(depth):
        pid = parent_pid(pid)
        if pid == root:
            return True
        if pid <= 1:
            return False
    return False


class ProcessPeaks(threading.Thread):
    """VmHWM of this process's descendants whose command line contains `marker`,
    polled: each one's highest value seen (a process exiting between polls keeps the
    last). Only descendants: other sessions on a shared machine run their own Ray."""

    def __init__(self, marker: bytes, every: float = 0.25):
        super().__init__(daemon=True)
        self.marker, self.every, self.peaks, self.done = marker, every, {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            self.done.wait(self.every)

    def poll(self) -> None:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                if self.marker in Path(f"/proc/{pid}/cmdline").read_bytes() and descends_from(pid, os.getpid()):
                    self.peaks[pid] = max(self.peaks.get(pid, 0), status_kb(pid, "VmHWM"))
            except OSError:  # gone meanwhile
                continue

    def stop(self) -> dict:
        self.poll()
        self.done.set()
        self.join()
        peaks = [kb / 1024 for kb in self.peaks.values()]
        return {"processes": len(peaks), "max_mb": round(max(peaks, default=0), 1),
                "sum_mb": round(sum(peaks), 1)}
