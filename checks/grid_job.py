"""A grid submitted to the two-node cluster as a Ray job, and the checks on what it left
in MLflow, in Tune's storage and in its log."""

import re
import secrets
import shlex

import yaml

from harness import BIN, ROOT, HarnessError, log, sh, tail, wait_for
from two_node_cluster import Cluster

# Six short epochs (a second each here): phase B's kill lands between the first
# train_loss and the trial's end with seconds to spare.
TRAINING = {"epochs": 6, "lr": 3e-3, "batch_size": 8, "beams": 1, "max_prompt_tokens": 96}


def grid_spec(name: str, retrievers: list) -> dict:
    return {"name": name, "tasks": ["LaMP_2"], "model": "tiny", "axes": [{"retriever": retrievers, "k": [2]}],
            "training": TRAINING}


class Checks:
    """Each check's verdict, printed as it is recorded."""

    def __init__(self):
        self.results = []

    def record(self, name: str, passed: bool, detail: str = "") -> bool:
        self.results.append((name, bool(passed)))
        log(f"{'PASS' if passed else 'FAIL'}: {name}" + (f" ({detail})" if detail and not passed else ""))
        return bool(passed)

    @property
    def ok(self) -> bool:
        return bool(self.results) and all(passed for _, passed in self.results)

    def summary(self) -> str:
        failed = [name for name, passed in self.results if not passed]
        return (f"{len(self.results) - len(failed)} of {len(self.results)} checks passed"
                + "".join(f"\n  FAILED: {name}" for name in failed))


class GridJob:
    """One `run` of a grid, submitted to the head with `ray job submit --working-dir .`."""

    def __init__(self, cluster: Cluster, name: str, retrievers: list, retries: int | None):
        self.cluster, self.name, self.cells = cluster, name, len(retrievers)
        self.id = f"{name}-{secrets.token_hex(3)}"
        spec = cluster.layout.head / f"{name}.yaml"
        spec.write_text(yaml.safe_dump(grid_spec(name, retrievers)))
        layout = cluster.layout
        self.command = ["python", "experiments.py", "run", str(spec), "--data", str(layout.data),
                        "--workdir", str(layout.workdir), "--cache", str(layout.cache),
                        "--storage", str(layout.storage), "--tracking-uri", cluster.tracking_uri,
                        "--address", cluster.address, "--resources-per-worker", '{"trial_node": 1}',
                        # --verbose: the workers' output, whose prefixes say which node ran each trial.
                        "--max-concurrent", "1", "--verbose"] + ([] if retries is None else ["--retries", str(retries)])
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(cluster.tracking_uri)

    def submit(self) -> None:
        submit = [BIN / "ray", "job", "submit", f"--address={self.cluster.dashboard_url}", "--working-dir", ROOT,
                  "--no-wait", "--submission-id", self.id, "--", *self.command]
        tries = []

        def submitted() -> bool:
            tries.append(sh(submit, self.cluster.head_env, check=False))
            return tries[-1].returncode == 0

        try:  # the head's job agent takes a while to come up after `ray start` returns
            wait_for("the job agent", submitted, 300, every=3)
        except TimeoutError:
            raise HarnessError(f"ray job submit failed {len(tries)} times; last:\n"
                               f"{tail(tries[-1].stderr, 20)}") from None
        log(f"submitted {self.id}: ray job submit --working-dir . -- {shlex.join(self.command)}")

    def status(self) -> str | None:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or None while it runs."""
        from ray.job_submission import JobSubmissionClient

        try:
            status = JobSubmissionClient(self.cluster.dashboard_url).get_job_status(self.id)
        except Exception as error:  # a busy dashboard: no answer this time, ask again
            log(f"(the dashboard did not say how job {self.id} is: {str(error).splitlines()[0][:200]})")
            return None
        return status.value if status.is_terminal() else None

    def wait(self, timeout: float) -> str:
        try:
            return wait_for(f"job {self.id}", self.status, timeout, every=5)
        except TimeoutError:
            log(f"job {self.id} still running after {timeout:.0f} s: stopping it")
            sh([BIN / "ray", "job", "stop", f"--address={self.cluster.dashboard_url}", self.id],
               self.cluster.head_env, check=False)
            return "TIMED OUT"

    def logs(self) -> str:
        done = sh([BIN / "ray", "job", "logs", f"--address={self.cluster.dashboard_url}", self.id],
                  self.cluster.head_env, check=False)
        (self.cluster.layout.base / f"{self.id}.log").write_text(done.stdout)
        return done.stdout

    def experiment(self):
        return self.client.get_experiment_by_name(self.name)

    def runs(self, role: str) -> list:
        experiment = self.experiment()
        if experiment is None:
            return []
        return [r for r in self.client.search_runs([experiment.experiment_id])
                if r.data.tags.get("lamp_grid.role") == role]

    def training_cell(self, epochs: int):
        """A RUNNING cell that has logged the training loss of `epochs` epochs, or None."""
        for run in self.runs("cell"):
            if run.info.status == "RUNNING" and len(self.client.get_metric_history(run.info.run_id,
                                                                                    "train_loss")) >= epochs:
                return run
        return None

    def first_epoch_after(self, run_id: str, moment: float) -> int | None:
        """The first epoch a cell logged a training loss for after `moment`: where its retry began."""
        later = sorted((m.timestamp, m.step) for m in self.client.get_metric_history(run_id, "train_loss")
                       if m.timestamp >= moment * 1000)
        return later[0][1] if later else None

    def trial_errors(self) -> list:
        """(file, text) of every error Tune stored for this grid's trials (on the shared storage)."""
        return [(p, p.read_text(errors="replace")) for p in sorted(self.cluster.layout.storage.glob(
            f"{self.name}-*/**/error.txt"))]

    def check(self, phase: str, status: str, logs: str, checks: Checks) -> None:
        cells, parents = self.runs("cell"), self.runs("grid")
        keys = [r.data.tags.get("cell_key") for r in cells]
        for run in cells:
            log(f"  {run.data.tags.get('cell_key')}: {run.info.status}")
        finished = [r for r in cells if r.info.status == "FINISHED"]
        without_artifacts = [r.data.tags.get("cell_key") for r in finished
                             if "predictions.json" not in {a.path for a in self.client.list_artifacts(r.info.run_id)}]
        checks.record(f"{phase}: the job SUCCEEDED", status == "SUCCEEDED", status)
        checks.record(f"{phase}: {self.cells} cell(s), one run each", len(keys) == self.cells == len(set(keys)),
                      f"runs of {keys}")
        checks.record(f"{phase}: every cell FINISHED", len(cells) == self.cells == len(finished),
                      ", ".join(f"{r.data.tags.get('cell_key')} {r.info.status}" for r in cells) or "no cell runs")
        open_runs = [r for r in cells + parents if r.info.status in ("RUNNING", "SCHEDULED")]
        checks.record(f"{phase}: nothing RUNNING or SCHEDULED", not open_runs, f"{len(open_runs)} open run(s)")
        checks.record(f"{phase}: the parent run FINISHED", len(parents) == 1 and parents[0].info.status == "FINISHED",
                      ", ".join(r.info.status for r in parents) or "no parent run")
        checks.record(f"{phase}: every finished cell's artifacts reached the server",
                      finished and not without_artifacts, f"none from {without_artifacts or 'any cell'}")
        # Ray prefixes a remote actor's output with its node's address (none: the driver's own node).
        where = {ip or "the head" for ip in re.findall(
            r"\((?:run_trial|TrainController|RayTrainWorker) pid=\d+(?:, ip=([\d.]+))?\)", logs)}
        checks.record(f"{phase}: the trials ran on the worker node", where == {self.cluster.link.worker_ip},
                      f"they ran on {sorted(where) or 'no node'}")

    def prelude(self, logs: str) -> str:
        """What the grid's driver said before its first trial (where it put the model, the URI trials use)."""
        lines = logs.split("Running entrypoint", 1)[-1].split("Trial status:", 1)[0].splitlines()[1:]
        return "\n".join(line for line in lines if line.strip() and "Writing model shards" not in line
                         and not line.startswith(("╭", "│", "├", "╰")))  # Tune's configuration table

    def explain(self, logs: str) -> None:
        """What went wrong, for whoever reads the output: the job's log and the trials' errors."""
        log(f"job {self.id}'s log ends:\n{tail(logs, 40)}")
        shown = set()
        for path, text in self.trial_errors():
            where, last = path.relative_to(self.cluster.layout.base), tail(text, 1)
            log(f"trial error {where}:\n" + (f"(as above) {last}" if last in shown else tail(text, 25)))
            shown.add(last)
