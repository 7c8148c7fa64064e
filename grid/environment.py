"""What a cell's numbers depend on besides its data and settings: the code, the
packages and the hardware.

Every cell's MLflow run records them: the code (commit, and a digest of what is
not committed) from the driver, the rest as `env.*` tags from the worker that
trained it. `rerun` and `report` compare them, and a test holds the installed
packages to requirements.lock, the environment README's numbers come from.

CPU_KERNELS pins the kernels that CPU math dispatches to, on every Ray worker.
MKL and torch's own kernels choose their code by CPU model (AVX-512 or AVX2, say),
and a sum taken in another order rounds differently; through training, that
moved a demo cell's dev F1 from 0.1738 to 0.1916 between two CPU models.
"""

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sysconfig
from contextlib import contextmanager
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements.lock"
RECORDED = ("torch", "transformers", "deepspeed", "ray", "mlflow", "tokenizers", "numpy", "pyarrow")
CPU_KERNELS = {
    "MKL_CBWR": "COMPATIBLE",  # MKL's one code path that Intel says gives the same results on any x86-64 CPU
    "ATEN_CPU_CAPABILITY": "avx2",  # torch's own kernels at AVX2, which every x86-64 CPU of this kind has
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's (a few torch ops on the CPU), the same
}
NOT_RUN = {"pip", "lamp-grid"}  # installed, but not what runs: the installer, and this project


@contextmanager
def environ_with(values: dict):
    """This process's environment with `values` set while the block runs, then as it was
    (what the block starts, a process of its own, keeps them)."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def code_state() -> dict:
    """The code the driver runs: its git commit, and a digest of the changes not committed
    (the diff against it and the names of new files), or `none`."""
    def git(*args) -> bytes:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").decode().strip()
        changes = git("diff", "HEAD", "--binary") + git("ls-files", "--others", "--exclude-standard")
    except (OSError, subprocess.CalledProcessError):
        return {"git_commit": "unknown", "lamp_grid.code_diff": "unknown"}
    return {"git_commit": commit,
            "lamp_grid.code_diff": hashlib.blake2b(changes, digest_size=8).hexdigest() if changes else "none"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_tags(device) -> dict:
    """The `env.*` tags of a run, read where it runs: versions, hardware, threads and
    CPU kernels, and whether the packages are the locked ones. device: the torch device
    the cell ran on (None: no model, the `vote` cells)."""
    import torch

    tags = {f"env.{name}": importlib.metadata.version(name) for name in RECORDED}
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if (
        device is not None and device.type == "cuda") else []
    differences = lock_differences()
    tags.update({
        "env.python": platform.python_version(),
        "env.cpu": f"{cpu_model()} x{os.cpu_count()}",
        "env.gpu": ", ".join(f"{name} x{gpus.count(name)}" for name in dict.fromkeys(gpus)) or "none",
        "env.torch_threads": str(torch.get_num_threads()),
        "env.cpu_kernels": " ".join(f"{name}={os.environ.get(name, 'unset')}" for name in CPU_KERNELS),
        "env.lock": ("the lock's" if not differences else
                     f"not the lock's, {len(differences)} package(s): {'; '.join(differences)}"[:5000]),
    })
    return tags


def read_lock(path: Path = LOCK_FILE) -> dict:
    """name -> version, from a lock file of `name==version` lines."""
    locked = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            locked[canonicalize_name(name)] = version.strip()
    return locked


def lock_differences(path: Path = LOCK_FILE) -> list:
    """How the installed packages differ from the lock, a line per package; none where
    they match. A build's local label (torch's +cpu or +cu128) is not a difference, nor
    the packages a CUDA build of torch brings (its own requirements)."""
    if not path.exists():
        return [f"no lock file at {path}"]
    locked = read_lock(path)
    # The environment's own site-packages: a Ray worker's path also holds setuptools' vendored packages.
    site = {sysconfig.get_paths()[kind] for kind in ("purelib", "platlib")}
    installed = {canonicalize_name(d.metadata["Name"]): d.version
                 for d in importlib.metadata.distributions(path=sorted(site))}
    torch_brings = {canonicalize_name(Requirement(r).name) for r in importlib.metadata.requires("torch") or []}
    lines = [f"{name}: locked {version}, " + (f"installed {installed[name]}" if name in installed else "not installed")
             for name, version in sorted(locked.items())
             if name not in installed or Version(installed[name]).public != version]
    lines += [f"{name}: installed {installed[name]}, not in the lock"
              for name in sorted(set(installed) - set(locked) - NOT_RUN - torch_brings)]
    return lines


def recorded(tags: dict) -> dict:
    """What a run's tags say of its code and environment: what `rerun` and `report` compare."""
    return {k: v for k, v in tags.items() if k.startswith("env.") or k in ("git_commit", "lamp_grid.code_diff")}


def describe_differences(before: dict, after: dict) -> list:
    """A line per recorded value that differs between two runs' records."""
    return [f"{name.removeprefix('env.')}: {before.get(name, 'unrecorded')} -> {after.get(name, 'unrecorded')}"
            for name in sorted(set(before) | set(after)) if before.get(name) != after.get(name)]
