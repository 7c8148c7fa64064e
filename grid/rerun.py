"""`rerun RUN_ID`: one cell run again from its MLflow record, into a new run nested
under a parent named for the old one, and the two compared: their dev metrics and
predictions, and what differs in the code and the environment they ran in.

A cell run records what it takes to run it again: its axes and training settings
(params), the data and resources (`lamp_grid.*` tags), the code (`git_commit`,
`lamp_grid.code_diff`) and the environment its worker saw (`env.*` tags,
grid/environment.py). The rerun uses this checkout's code; a recorded commit
that differs from it is named among the differences.
"""

import json
import subprocess

from grid import tracking
from grid.environment import ROOT, describe_differences, recorded
from grid.report import per_example
from grid.run import run_grid
from grid.spec import AXES, GridCell, GridSpec, Resources
from lamp.errors import LampError

RECORD = ("lamp_grid.data", "lamp_grid.tasks", "lamp_grid.resources", "git_commit")


def cell_record(client, run_id: str, uri: str):
    """(the run, a GridSpec of its cell and its grid's tasks, its Resources), or a
    one-line LampError for a run that is unknown, not a cell, or not from this
    repository. (A `tiny` model's tokenizer is trained on the grid's tasks.)"""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise LampError(f"no run {run_id!r} in {uri}") from None
    tags = run.data.tags
    if tags.get("lamp_grid.role") != "cell":
        raise LampError(f"run {run_id} is not a lamp-grid cell (it is {run.info.run_name!r}); rerun a cell's "
                        "run, one of a grid run's children")
    missing = [name for name in RECORD if name not in tags]
    if missing:
        raise LampError(f"run {run_id} does not record {', '.join(missing)} (it predates run records): run its "
                        "grid again instead")
    commit = tags["git_commit"]
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
    if known.returncode:
        raise LampError(f"run {run_id} was made at commit {commit}, which is not in this repository ({ROOT}); "
                        "fetch it, or rerun from a clone that has it")
    grid_cell = GridCell.from_params(run.data.params, f"run {run_id}")
    cell = grid_cell.cell
    spec = GridSpec(name=client.get_experiment(run.info.experiment_id).name,
                    tasks=tuple(tags["lamp_grid.tasks"].split(",")),
                    axes=({name: (getattr(cell, name),) for name in AXES},), model=grid_cell.model,
                    data=tags["lamp_grid.data"], seeds=(cell.seed,), training=grid_cell.training, recipe=cell.recipe)
    return run, spec, Resources(**json.loads(tags["lamp_grid.resources"]))


def rerun(run_id: str, uri: str, workdir, address: str | None = None, verbose: bool = False, log=print) -> int:
    """Runs the cell of `run_id` again and prints how the new run compares; 0 when it finished."""
    client = tracking.connect(uri)
    old, spec, resources = cell_record(client, run_id, uri)
    (result,) = run_grid(spec, spec.data, workdir, tracking_uri=uri, address=address, resources=resources,
                         verbose=verbose, command=f"python experiments.py rerun {run_id}", rerun_of=run_id,
                         only=old.data.tags["cell_key"], log=log)
    if result.status != "FINISHED":
        log(f"rerun of {run_id}: the new run {result.run_id} ended {result.status}")
        return 1
    new = client.get_run(result.run_id)
    before, after = (per_example(client, r.info.run_id) for r in (old, new))
    lines = comparison(old, new, before, after)
    client.set_tag(new.data.tags["mlflow.parentRunId"], tracking.NOTE, "\n".join(lines))
    log("\n".join(lines))
    return 0


def comparison(old, new, before: dict, after: dict) -> list:
    """Lines saying how a rerun compares with the recorded run: each dev metric, the
    predictions (id -> (gold, prediction) of each), and the recorded environments."""
    names = sorted(k for k in set(old.data.metrics) | set(new.data.metrics) if k.startswith("dev_"))
    width = max(len(n) for n in names)
    lines = [f"rerun of {old.info.run_id} ({old.data.tags['cell_key']}): new run {new.info.run_id}, "
             f"under the parent \"rerun of {old.info.run_id}\"", f"  {'':<{width}}  recorded    rerun"]
    changes = {}
    for name in names:
        a, b = old.data.metrics.get(name), new.data.metrics.get(name)
        if a != b:
            changes[name] = None if a is None or b is None else b - a
        shown = ["   missing" if v is None else f"{v:9.4f}" for v in (a, b)]
        verdict = "identical" if a == b else ("missing" if changes[name] is None else f"{changes[name]:+.6g}")
        lines.append(f"  {name:<{width}}  {shown[0]}  {shown[1]}  {verdict}")
    ids = set(before) | set(after)
    differing = sum(before.get(i) != after.get(i) for i in ids)
    lines.append(f"  predictions: {len(ids) - differing} of {len(ids)} identical")
    if not changes and not differing:
        lines.append("identical: the same dev metrics and predictions as the recorded run")
    else:
        moved = [f"{n} by {d:+.6g}" if d is not None else f"{n} (missing in one)" for n, d in changes.items()]
        lines.append(f"differs: {', '.join(moved) or 'no dev metric'}; {differing} prediction(s)")
    environment = describe_differences(recorded(old.data.tags), recorded(new.data.tags))
    if environment:
        lines += ["the environment differs from the recorded one:"] + [f"  {line}" for line in environment]
    else:
        lines.append("the environment is the recorded one: code, packages, hardware, threads and CPU kernels")
    return lines
