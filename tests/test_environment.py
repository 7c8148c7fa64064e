"""The environment the numbers come from (grid/environment.py): the installed packages
are the locked ones, and the CPU kernels are pinned so that a CPU model does not
change what training computes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grid.environment import CPU_KERNELS, describe_differences, lock_differences, read_lock
from tests.cli import ROOT


def test_the_installed_packages_are_the_locked_ones():
    differences = lock_differences()
    assert not differences, ("this environment is not requirements.lock's (install it with README.md's set-up "
                             "command, or update the lock: `bash .ci/lock`):\n" + "\n".join(differences))


def test_a_package_off_the_lock_is_named(tmp_path):
    locked = read_lock()
    assert locked["torch"] == "2.13.0" and "transformers" in locked  # torch by its public version
    numpy = locked.pop("numpy")
    lines = [f"{name}=={version}" for name, version in locked.items()]
    lines += ["numpy==1.0.0" if numpy != "1.0.0" else "numpy==1.0.1", "no-such-package==1.2.3"]
    lock = tmp_path / "requirements.lock"
    lock.write_text("# a lock that the environment is not\n" + "\n".join(lines) + "\n")
    differences = lock_differences(lock)
    assert f"numpy: locked 1.0.0, installed {numpy}" in differences
    assert "no-such-package: locked 1.2.3, not installed" in differences
    lock.write_text("\n".join(line for line in lines if not line.startswith("pyarrow==")) + "\n")
    assert any(line.startswith("pyarrow: installed ") and line.endswith("not in the lock")
               for line in lock_differences(lock))


def test_differences_between_two_records_are_listed_one_per_line():
    before = {"env.transformers": "5.24.0", "env.cpu": "AMD EPYC x2", "git_commit": "abc"}
    after = {"env.transformers": "5.25.0", "env.cpu": "AMD EPYC x2", "git_commit": "abc", "env.gpu": "none"}
    assert describe_differences(before, after) == ["gpu: unrecorded -> none", "transformers: 5.24.0 -> 5.25.0"]
    assert describe_differences(after, after) == []


# A few AdamW steps of a small T5 on fixed data: its weights' digest is what the CPU computed.
PROBE = """
import hashlib, torch
from transformers import T5Config, T5ForConditionalGeneration
torch.set_num_threads(1)
torch.manual_seed(0)
model = T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=64, d_ff=128, d_kv=16, num_layers=1,
                                            num_heads=4, decoder_start_token_id=0, pad_token_id=0))
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
inputs, labels = torch.randint(2, 300, (16, 40)), torch.randint(2, 300, (16, 8))
for _ in range(5):
    model(input_ids=inputs, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
print(hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
"""
# What a CPU without AVX-512 would dispatch to, on this one: MKL and torch's kernels at AVX2.
AVX2_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def weights_digest(env: dict) -> str:
    base = {k: v for k, v in os.environ.items() if k not in (*CPU_KERNELS, *AVX2_CPU)}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT,
                          env={**base, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def has_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512f" in cpuinfo.read_text()


@pytest.mark.slow  # tens of seconds waiting on other processes: out of the quick loop
def test_with_the_kernels_pinned_another_cpu_model_computes_the_same_weights():
    # The pins win over what the CPU offers, so an AVX-512 CPU and an AVX2 one train alike.
    assert weights_digest(CPU_KERNELS) == weights_digest({**AVX2_CPU, **CPU_KERNELS})
    if not has_avx512():
        pytest.skip("this CPU has no AVX-512: unpinned, it already dispatches as an AVX2 CPU does, so the "
                    "difference the pins remove cannot show here")
    assert weights_digest({}) != weights_digest(AVX2_CPU)  # unpinned, they do not
