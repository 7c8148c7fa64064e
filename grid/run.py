"""`run`: a grid from spec to MLflow, in three steps, each a function.

- preflight: everything that can be wrong is checked before any trial starts:
  the grid, the tracking store, the Ray cluster and whether a cell fits.
- plan: the data, the model and the rankings are prepared (a no-op when cached),
  the pending cells rendered, their MLflow runs made, and the Tune trials set up.
- execute: Ray Tune runs one trial per cell that is not already FINISHED, and
  every run ends with a status, whatever stops it.
"""

import json
import pickle
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from grid import tracking
from grid.cluster import check_fits, ensure_ray, for_other_nodes, gpu_memory, spans_other_nodes, trials_that_fit
from grid.embed import resolve_encoder
from grid.environment import code_state, environ_with
from grid.memory import count_parameters, estimate_memory
from grid.model import ModelRef
from grid.render import render_grid
from grid.shards import prepare
from grid.spec import GridSpec, Resources, varying_axes
from grid.storage import digest, is_uri, local_data
from grid.tracking import summarize
from lamp.data import SETTINGS, find_splits
from lamp.errors import LampError
from lamp.recipes import get_recipe
from lamp.retrieval import DENSE
from lamp.synth import synthetic_dir, write_synthetic
from lamp.tasks import get_task

SYNTHETIC_USERS = 1500  # per task: enough for the tiny model to learn the demo's signal


@dataclass
class RunPlan:
    """What every trial needs; handed to trials through the object store."""
    cells: list
    run_ids: list
    shards: dict  # (task, setting) -> {"train": SplitShards, "dev": SplitShards}
    renders: dict  # cell key -> {"dev": Rendered, "train": Rendered}: what the trials read
    model: ModelRef  # resolved, as trials on every node load it
    tracking_uri: str
    storage: str
    resources: Resources
    log_model: bool = False  # log each cell's best model as an MLflow `transformers` model
    predict_test: bool = False  # each cell also decodes its task's test split, where there is one


@dataclass
class Workdir:
    """lamp-grid's work directory: synthetic data, shard cache, tiny model, tracking store."""
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def models(self) -> Path:
        """Models built here: the tiny model of each set of tasks and data."""
        return self.root / "models"

    @property
    def mirror(self) -> Path:
        """Local copies of data directories given as URIs."""
        return self.root / "mirror"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"

    @property
    def artifacts(self) -> str:
        return (self.root / "mlartifacts").resolve().as_uri()

    @property
    def storage(self) -> str:
        return str((self.root / "ray_results").resolve())

    def plan_file(self, grid: str) -> Path:
        return self.root / "runs" / f"{grid}.pkl"


def resolve_data(data: str, cells: list, workdir: Workdir, users: int, log) -> Path:
    """The data directory; `synthetic` is written once into the work directory, in the
    layout of each setting the cells read."""
    wanted = sorted({c.cell.data for c in cells}, key=lambda d: (d[0], SETTINGS.index(d[1])))
    if data == "synthetic":
        for setting in dict.fromkeys(s for _, s in wanted):
            folder = synthetic_dir(workdir.data, setting)
            missing = [t for t, s in wanted if s == setting and not (folder / t / "dev" / "dev_outputs.json").exists()]
            if missing:
                layout = "" if setting == "user" else f"{setting}-based "
                log(f"writing synthetic {layout}data for {', '.join(missing)} into {workdir.data}")
                write_synthetic(workdir.data, missing, users=users, seed=0, setting=setting)
        return workdir.data
    local = local_data(data, workdir.mirror, log)  # a URI (s3://...) is copied here once
    found = {(s.task, s.setting, s.split) for s in find_splits(local, sorted({t for t, _ in wanted}))}
    for task, setting in wanted:
        for split in ("train", "dev"):
            if (task, setting, split) not in found:
                raise LampError(f"{data}: no {task} {setting}-based {split} split (run `validate --data {data}`)")
    return local


def check_batches(cells: list, model: ModelRef, resources: Resources) -> None:
    """A cell's batch is the global batch, split evenly over its trial's workers."""
    for cell in cells:
        if model.has_weights and cell.training.batch_size % resources.workers_per_trial:
            raise LampError(f"{cell.key}: batch_size {cell.training.batch_size} cannot be split evenly over "
                            f"{resources.workers_per_trial} workers per trial; the batch is the global one, so "
                            "choose a worker count that divides it")


def check_gpu_share(resources: Resources) -> None:
    """A trial's workers each need GPUs of their own: with a fraction of a GPU each,
    Ray may put two of them on one GPU, which NCCL refuses ("Duplicate GPU detected"),
    and DeepSpeed's ZeRO-3 would place them by local rank. A single worker may share
    a GPU with another trial's."""
    gpus = resources.gpus_per_worker
    if resources.workers_per_trial > 1 and gpus and gpus != int(gpus):
        raise LampError(f"--gpus-per-worker {gpus:g} with {resources.workers_per_trial} workers per trial: Ray may "
                        "put two of a trial's workers on one GPU, which NCCL refuses; give each worker whole GPUs "
                        "(--gpus-per-worker 1), or run one worker per trial")


def memory_estimates(cells: list, model: ModelRef, resources: Resources) -> dict:
    """cell key -> MemoryEstimate of one of its GPUs (ZeRO stage, batch and prompt
    length as the cell asks; bf16, as on the GPUs that have it natively). Empty where
    the model's config cannot be read (`vote`; a hub id with no network; a folder
    that is not there yet)."""
    try:
        config = model.config()
    except LampError:
        config = None
    if config is None:
        return {}
    params, estimates = count_parameters(config), {}
    for cell in cells:
        shared = dict(prompt_tokens=cell.training.max_prompt_tokens, beams=cell.training.beams,
                      output_tokens=get_task(cell.cell.task).max_new_tokens, workers=resources.workers_per_trial,
                      gpus_per_worker=resources.gpus_per_worker, zero_stage=resources.zero_stage, bf16=True)
        decoding = estimate_memory(config, params, micro_batch=cell.training.eval_batch_size, training=False,
                                   **shared)
        if cell.training.epochs_for(cell.cell.task) == 0:
            estimates[cell.key] = decoding
            continue
        training = estimate_memory(config, params, training=True,
                                   micro_batch=cell.training.batch_size // resources.workers_per_trial, **shared)
        # A trial decodes dev with its training state still on the GPU.
        estimates[cell.key] = replace(training, activations=max(training.activations, decoding.activations))
    return estimates


def check_memory(cells: list, model: ModelRef, resources: Resources, log) -> None:
    """Refuse a cell whose estimated memory is more than the GPUs it asks for hold."""
    if not resources.gpus_per_worker:
        return
    memory = gpu_memory(log)
    if memory is None:
        return
    room = memory * min(1.0, resources.gpus_per_worker)  # a fraction of a GPU shares it
    for key, estimate in memory_estimates(cells, model, resources).items():
        if estimate.total > room:
            raise LampError(f"{key} needs about {estimate.describe()}, more than the {room / 1e9:.1f} GB each "
                            f"worker gets ({resources.gpus_per_worker:g} of a {memory / 1e9:.1f} GB GPU): use a "
                            "higher --zero-stage, more --workers-per-trial, a smaller batch or shorter prompts")


def describe(spec: GridSpec, cells: list, model: ModelRef, resources: Resources) -> str:
    asks = ", ".join(f"{amount:g} {name}" for name, amount in resources.per_worker().items())
    per_trial = f"{resources.workers_per_trial} worker(s) x ({asks}), DeepSpeed ZeRO-{resources.zero_stage}"
    estimates = memory_estimates(cells, model, resources) if resources.gpus_per_worker else {}
    lines = [f"grid {spec.name}: {len(cells)} cell(s), model {spec.model}"]
    for cell in cells:
        if not model.has_weights:
            needs = "no training (vote)"
        elif cell.training.epochs_for(cell.cell.task) == 0:
            needs = f"zero-shot, no optimizer: {resources.workers_per_trial} worker(s) x ({asks})"
        else:
            needs = per_trial
        if cell.key in estimates:
            needs += f"; GPU memory about {estimates[cell.key].describe()}"
        elif resources.gpus_per_worker and model.has_weights:
            needs += "; GPU memory unknown (the model's config cannot be read)"
        lines.append(f"  {cell.key}: {needs}")
    return "\n".join(lines)


def check_retriever_model(spec: GridSpec, cells: list, log=print) -> None:
    """Refuses a grid with Contriever cells whose encoder is missing or no encoder, before any work."""
    if any(c.cell.retriever in DENSE for c in cells):
        resolve_encoder(spec.retriever_model, log)


def prepare_grid(spec: GridSpec, cells: list, data: str, work: Workdir, cache: str, address: str | None = None,
                 users: int = SYNTHETIC_USERS, log=print) -> tuple:
    """The data, the model and the rankings of a grid's cells, computed once. Returns
    (data directory, the model resolved (a ModelRef), (task, setting) -> {split: SplitShards}).
    Its callers have checked the retriever model (check_retriever_model), before any work."""
    data_dir = resolve_data(data, cells, work, users, log).resolve()
    model = ModelRef.named(spec.model).resolved(data_dir, spec.tasks, work.models, log)
    model = model.for_nodes(cache, spans_other_nodes(), log)
    # Rankings for the cells whose recipe reads them (`lamp`): `study` retrieves as the study did, when it renders.
    # Each setting's splits get the rankings its own cells read: Recency on undated files would be refused.
    settings = dict.fromkeys(c.cell.setting for c in cells)
    shard_list = []
    for setting in settings:
        ranked = [c.cell for c in cells if get_recipe(c.cell.recipe).reads_rankings and c.cell.setting == setting]
        shard_list += prepare(data_dir, cache, tasks=sorted({c.cell.task for c in cells if c.cell.setting == setting}),
                              retrievers=sorted({c.retriever for c in ranked} - {"none"}), seeds=list(spec.seeds),
                              address=address, log=log, by_input=any(c.ablation == "decouple" for c in ranked),
                              stage_dir=work.cache, use_date=any(c.use_date for c in ranked), settings=[setting],
                              retriever_model=spec.retriever_model)
    return data_dir, model, splits_by_data(shard_list)


def splits_by_data(shard_list) -> dict:
    """(task, setting) -> {split: SplitShards}: what a cell reads (lamp.cell.Cell.data)."""
    shards = {}
    for s in shard_list:
        shards.setdefault((s.task, s.setting), {})[s.split] = s
    return shards


def render_cells(cells: list, shards: dict, model: ModelRef, work: Workdir, cache: str, address: str | None = None,
                 workers: int | None = None, predict_test: bool = False, log=print) -> dict:
    """Every cell's rendered splits (cell key -> {split: Rendered}), rendered where the
    cache lacks them: what the trials read. `vote` cells render nothing."""
    if not model.has_weights:
        return {}
    remote = cache if is_uri(cache) else None
    return render_grid(cells, shards, model, work.cache if remote else Path(cache).resolve(), remote, address,
                       workers, predict_test, log)


def data_predicting_test(spec: GridSpec, cells: list, data_dir: Path, log=print) -> set:
    """The (task, setting) pairs whose cells write test predictions: with predict_test,
    those whose data has a test split; one without is named, and its cells still run."""
    if not spec.predict_test:
        return set()
    found = {(s.task, s.setting) for s in find_splits(data_dir, spec.tasks) if s.split == "test"}
    for task, setting in sorted({c.cell.data for c in cells} - found):
        layout = "" if setting == "user" else f"{setting}-based "
        log(f"--predict-test: {task} has no {layout}test split in {data_dir}; its cells write no test predictions")
    return found


@dataclass
class Session:
    """Where a run reads and writes, checked before any work: the work directory, the
    MLflow store and the grid's experiment there, and the paths trials reach on any node."""
    work: Workdir
    client: object  # an MlflowClient of tracking_uri
    tracking_uri: str
    experiment: str  # its id
    trial_tracking_uri: str  # the store as every node reaches it
    cache: str
    storage: str


def run_grid(spec: GridSpec, data: str, workdir: Path, tracking_uri: str | None = None,
             storage: str | None = None, cache: str | None = None, address: str | None = None,
             resources: Resources = Resources(),
             max_concurrent: int | None = None, resume: bool = False, dry_run: bool = False,
             retries: int = 2, users: int = SYNTHETIC_USERS, log_model: bool = False, verbose: bool = False,
             command: str | None = None, rerun_of: str | None = None, only: str | None = None,
             log=print) -> list:
    """Runs the grid; logs its results table and returns a CellResult per cell.
    `command` is how to run it again (the experiment's description says it).
    rerun_of: a run id; the cells run again, FINISHED or not, under a parent named
    for that run, and the table is left to `rerun`. only: a cell key, the one cell
    of the grid to run (the grid's tasks still make its `tiny` model)."""
    cells = [c for c in spec.cells() if only in (None, c.key)]
    model = ModelRef.named(spec.model)
    check_batches(cells, model, resources)
    check_gpu_share(resources)
    if dry_run:
        log(describe(spec, cells, model, resources))
        return []
    command = command or f"python experiments.py run {spec.name}"
    check_retriever_model(spec, cells, log)
    session = preflight(spec, cells, model, workdir, tracking_uri, storage, cache, address, resources, command,
                        rerun_of, verbose, log)
    data_dir, model, shards = prepare_grid(spec, cells, data, session.work, session.cache, address, users, log)
    fingerprints = {data: digest(parts["train"].examples, parts["dev"].examples) for data, parts in shards.items()}
    test_data = data_predicting_test(spec, cells, data_dir, log)
    if resume:
        plan, parent, tuner = restore(session.work.plan_file(spec.name), session.client, spec, log)
    else:
        by_key = tracking.cell_runs(session.client, session.experiment)
        pending = pending_cells(cells, by_key, fingerprints, rerun_of, session.tracking_uri, log, test_data)
        if not pending:
            results = summarize(by_key, cells, fingerprints)
            results_table(session.client, results, None, log)
            return results
        record = {"lamp_grid.command": command, "lamp_grid.data": str(data_dir),
                  "lamp_grid.tasks": ",".join(spec.tasks),
                  "lamp_grid.resources": json.dumps(asdict(resources), sort_keys=True), **code_state()}
        plan, parent, tuner = plan_trials(spec, pending, session, shards, model, fingerprints, record, address,
                                          resources, max_concurrent, retries, log_model, rerun_of, verbose, log)
    execute(tuner, session.client, plan, parent, verbose)
    if rerun_of:
        return summarize({c.key: [session.client.get_run(r)] for c, r in zip(plan.cells, plan.run_ids)}, cells)
    results = summarize(tracking.cell_runs(session.client, session.experiment), cells, fingerprints)
    results_table(session.client, results, parent, log)
    return results


def preflight(spec: GridSpec, cells: list, model: ModelRef, workdir: Path, tracking_uri: str | None,
              storage: str | None, cache: str | None, address: str | None, resources: Resources, command: str,
              rerun_of: str | None, verbose: bool, log) -> Session:
    """Everything that can be refused before any work: the tracking store and the
    grid's experiment, the Ray cluster, and whether a cell fits it."""
    # Absolute paths: trials run in Ray workers whose working directory is not ours.
    work = Workdir(Path(workdir).resolve())
    work.root.mkdir(parents=True, exist_ok=True)
    tracking_uri = tracking_uri or work.tracking_uri
    client = tracking.connect(tracking_uri)
    # A rerun's one cell says nothing of the grid: the experiment's description and view stay the grid's.
    experiment = tracking.experiment_id(client, spec.name,
                                        work.artifacts if tracking_uri.startswith("sqlite") else None,
                                        "" if rerun_of else grid_description(spec, cells, command))
    if not rerun_of:
        tracking.share_cells_view(client, experiment, cells)
    tracking.close_dead_runs(client, experiment, log)
    ensure_ray(address, log, verbose)
    check_fits(resources, log)
    check_memory(cells, model, resources, log)
    cache = cache or str(work.cache)
    storage = storage if storage is None or is_uri(storage) else str(Path(storage).resolve())
    storage = storage or work.storage
    trial_tracking_uri = for_other_nodes(tracking_uri, client.get_experiment(experiment).artifact_location,
                                         cache, storage, log)
    return Session(work, client, tracking_uri, experiment, trial_tracking_uri, cache, storage)


def pending_cells(cells: list, by_key: dict, fingerprints: dict, rerun_of: str | None, tracking_uri: str,
                  log, test_data: set = frozenset()) -> list:
    """The cells to run: those without a FINISHED run on the same data and settings
    (every cell, for a rerun). A cell whose (task, setting) is in test_data also
    needs that run to have written its test predictions."""
    if rerun_of:
        return cells
    done = {(key, run.data.tags.get("data_fingerprint"), run.data.tags.get("settings_hash"),
             tracking.TEST_PREDICTIONS in run.data.tags)
            for key, runs in by_key.items() for run in runs if run.info.status == "FINISHED"}
    pending = [c for c in cells if not any((c.key, fingerprints[c.cell.data], c.settings_hash, tested) in done
                                           for tested in ([True] if c.cell.data in test_data else [True, False]))]
    log(f"{len(cells) - len(pending)} of {len(cells)} cell(s) already FINISHED in {tracking_uri}; "
        f"running {len(pending)}")
    return pending


def plan_trials(spec: GridSpec, pending: list, session: Session, shards: dict, model: ModelRef,
                fingerprints: dict, record: dict, address: str | None, resources: Resources,
                max_concurrent: int | None, retries: int, log_model: bool, rerun_of: str | None, verbose: bool,
                log) -> tuple:
    """(RunPlan, parent run id, Tune tuner) for the pending cells: their renders, their
    MLflow runs, and the plan that --resume picks up after an interruption."""
    from grid.progress import CellProgress  # heavy: it imports Ray Tune
    from grid.trial.driver import run_trial  # heavy: its metrics import rouge_score and nltk (seconds)

    client, experiment = session.client, session.experiment
    renders = render_cells(pending, shards, model, session.work, session.cache, address,
                           predict_test=spec.predict_test, log=log)
    parent = tracking.start_parent(client, experiment, spec.name, record, rerun_of)
    run_ids = [tracking.create_child(client, experiment, parent, c, fingerprints[c.cell.data], spec.name,
                                     renders.get(c.key, {}), record, rerun_of) for c in pending]
    plan = RunPlan(pending, run_ids, shards, renders, model, session.trial_tracking_uri, session.storage, resources,
                   log_model, spec.predict_test)
    name = f"{spec.name}-{parent[:8]}"
    path = f"{plan.storage.rstrip('/')}/{name}"  # a local path or a URI (s3://...): no Path() here
    tuner = new_tuner(trainable(run_trial, plan=plan), [c.key for c in pending], name, plan.storage,
                      max_concurrent or trials_that_fit(resources), retries,
                      [] if verbose else [CellProgress(pending, log)], verbose)
    plan_file = session.work.plan_file(spec.name)
    plan_file.parent.mkdir(parents=True, exist_ok=True)
    plan_file.write_bytes(pickle.dumps({"plan": plan, "parent": parent, "tune_path": path}))
    return plan, parent, tuner


def execute(tuner, client, plan: RunPlan, parent: str, verbose: bool) -> None:
    """Runs the trials; whatever ends them (done, failed, Ctrl-C), leaves no MLflow
    run RUNNING: each cell's run and the parent get their final status."""
    # Tune's newer console output prints its experiment's settings and paths at any
    # verbosity; the older one is silent at 0. Set for fit() alone: a process (and its
    # children, a Ray head among them) keeps its environment.
    quiet = {} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}
    status = "KILLED"  # unless fit() returns: Ctrl-C twice, or the driver dies
    try:
        with environ_with(quiet), tracking.heartbeat(client, parent):
            grid = tuner.fit()
        # A trial with neither result nor error was stopped by Ctrl-C (Tune stops gracefully).
        stopped = any(not r.metrics and r.error is None for r in grid)
        status = "KILLED" if stopped else ("FAILED" if grid.errors else "FINISHED")
    finally:
        tracking.close_open_runs(client, plan.run_ids, "KILLED" if status == "KILLED" else "FAILED")
        finished = all(client.get_run(r).info.status == "FINISHED" for r in plan.run_ids)
        client.set_terminated(parent, "FINISHED" if finished else ("KILLED" if status == "KILLED" else "FAILED"))


def grid_description(spec: GridSpec, cells: list, command: str) -> str:
    """The experiment's description in the MLflow UI (Markdown)."""
    axes = ", ".join(f"{name} ({n})" for name, n in varying_axes(cells).items())
    return (f"**lamp-grid grid `{spec.name}`**: {len(cells)} cell(s) of {', '.join(spec.tasks)} "
            f"with model `{spec.model}`{f', varying {axes}' if axes else ''}. Each `run` is a parent run; "
            "each cell is a child run named by its cell key, with every axis a param (filter with, e.g., "
            "`params.retriever = 'BM25'`), its dev metrics, its data as dataset inputs and a description. "
            f"The parent's description holds the results table.\n\nRun it again (FINISHED cells are kept): "
            f"`{command}`")


def results_table(client, results: list, parent: str | None, log) -> None:
    """The grid's results table: logged, and, with a parent run, its description."""
    from grid.report import (  # heavy: its metrics import rouge_score and nltk (seconds)
        compare_cells,
        environment_note,
        format_table,
        results_markdown,
    )

    rows = compare_cells(client, results)
    note = environment_note(results)
    log("\n" + format_table(rows) + (f"\n{note}" if note else ""))
    if parent:
        client.set_tag(parent, tracking.NOTE, results_markdown(rows) + (f"\n\n{note}" if note else ""))


def trainable(function, **parameters):
    """A Tune trainable: a driver with a sliver of CPU (its Train workers hold the real resources)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(function, **parameters), {"CPU": 0.01})


def new_tuner(trial, names: list, name: str, storage: str, max_concurrent: int | None, retries: int,
              callbacks: list = (), verbose: bool = False):
    """The Tune run of a grid's trials, `trial` (a trainable) once per cell index,
    each trial named by its cell key (`names`). Tune's own reporter is silent
    unless verbose: it prints every trial's config and results as tables."""
    from ray import tune

    return tune.Tuner(
        trial,
        param_space={"cell": tune.grid_search(list(range(len(names))))},
        # Reused trial drivers: a new process per cell costs seconds of start-up and imports.
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True,
                                    trial_name_creator=lambda t: names[t.config["cell"]],
                                    trial_dirname_creator=lambda t: f"cell-{t.config['cell']}-{t.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage, verbose=2 if verbose else 0,
                                  failure_config=tune.FailureConfig(max_failures=retries), callbacks=list(callbacks)),
    )


def restore(plan_file: Path, client, spec: GridSpec, log):
    """The interrupted Tune experiment of this grid, its plan, and its MLflow runs reopened."""
    from ray import tune

    from grid.trial.driver import run_trial  # heavy: its metrics import rouge_score and nltk (seconds)

    if not plan_file.exists():
        raise LampError(f"--resume: no interrupted run of grid {spec.name!r} in {plan_file.parent}")
    saved = pickle.loads(plan_file.read_bytes())
    plan, parent, path = saved["plan"], saved["parent"], saved["tune_path"]
    if not tune.Tuner.can_restore(path):
        raise LampError(f"--resume: no Tune experiment to restore at {path}")
    client.update_run(parent, status="RUNNING")
    for run_id in plan.run_ids:
        if client.get_run(run_id).info.status != "FINISHED":
            client.update_run(run_id, status="SCHEDULED")
    log(f"resuming grid {spec.name} from {path}")
    return plan, parent, tune.Tuner.restore(path, trainable=trainable(run_trial, plan=plan), resume_errored=True)
