"""checks/gpu_check.py end to end on CPU (--cpu: tiny shapes, a cell a model): every cell of its
grids finishes through run_grid, and the trial's throughput metrics reach MLflow."""

import json
import subprocess
import sys

import pytest

from tests.cli import ROOT

TRAINING = ["train_s", "train_examples_per_s", "train_tokens_per_s", "checkpoint_s", "checkpoint_share"]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "checks" / "gpu_check.py"), "--cpu",
                           "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["mode"] == "cpu" and result["machine"]["gpu"] == "CPU"
    cells = result["cells"]
    assert [c["status"] for c in cells] == ["FINISHED"] * 4, [(c["cell"], c["error"]) for c in cells]

    trained = [c for c in cells if c["trains"]]
    assert sorted(c["model"] for c in trained) == ["gpt2-small", "t5-base", "t5-base nondeterministic"]
    for cell in trained:
        metrics = cell["metrics"]
        missing = [m for m in ["n_params", "decode_examples_per_s", *TRAINING] if m not in metrics]
        assert not missing, f"{cell['cell']}: the trial logged no {', '.join(missing)}"
        assert metrics["n_params"] == cell["params_built"]
        assert metrics["train_tokens_per_s"] > 0 and metrics["train_examples_per_s"] > 0
        assert 0 < metrics["checkpoint_share"] < 1
        # CPU: no MFU, no GPU memory.
        assert cell["mfu"] is None and metrics.get("peak_gpu_memory_gb") in (None, 0)

    (zero_shot,) = [c for c in cells if not c["trains"]]
    assert zero_shot["model"] == "t5-xl-3b"
    # Decoding only: its dev metrics and model size, and no training metrics expected.
    assert "dev_f1" in zero_shot["metrics"] and zero_shot["metrics"]["n_params"] == zero_shot["params_built"]
    assert zero_shot["missing_metrics"] == []
    assert result["missing_metrics"] == []
    # What torch's deterministic kernels cost: the same cell with and without them.
    cost = result["deterministic_cost"]
    assert cost["on_examples_per_s"] > 0 and cost["off_examples_per_s"] > 0 and cost["ratio_on_to_off"] > 0


def test_a_failed_trials_error_is_found_by_its_cell_index(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "checks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    # As run names a grid's Tune folder and its trials' (grid.run.new_tuner).
    trial = tmp_path / "gpu-check-t5-base-20261205-120000-1a2b3c4d" / "cell-1-5f0e2_00001"
    trial.mkdir(parents=True)
    (trial / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory\n")
    assert gpu_check.trial_errors(str(tmp_path), "gpu-check-t5-base-20261205-120000") == {
        1: "RuntimeError: CUDA out of memory"}
