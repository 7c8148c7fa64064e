"""What `run` prints while its trials run: a line per cell as it starts, is retried,
fails or finishes, named by its cell key (its axes) with its task's main dev metric.

Tune's own reporter prints every trial's config and result as tables of their
own, a screenful per cell; `run --verbose` brings it back.
"""

import time

from ray import tune

from lamp.tasks import get_task


def last_line(error) -> str:
    """An error's last line: in a trial's, the exception it ended with."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip()[:300] if lines else type(error).__name__


class CellProgress(tune.Callback):
    def __init__(self, cells: list, log=print):
        self.cells, self.log = cells, log
        self.finished, self.start = 0, time.time()

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment (for --resume). The log function
        # stays behind: print cannot be pickled once Ray Train has replaced it in the driver.
        return {**self.__dict__, "log": None}

    def say(self, trial, verb: str, detail: str = "") -> None:
        elapsed = int(time.time() - self.start)
        key = self.cells[trial.config["cell"]].key
        (self.log or print)(f"[{elapsed // 60:02d}:{elapsed % 60:02d}] {verb:<8} {key}{detail}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.say(trial, "started")

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.say(trial, "retrying", f" after: {last_line(trial.get_error())}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(trial, "FAILED", f": {last_line(trial.get_error())}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished += 1
        metric = get_task(self.cells[trial.config["cell"]].cell.task).main_metric
        value = (trial.last_result or {}).get(f"dev_{metric}")
        score = f"dev {metric} {value:.4f}" if isinstance(value, (int, float)) else "no dev metric"
        self.say(trial, "finished", f": {score} ({self.finished} of {len(self.cells)} done)")
