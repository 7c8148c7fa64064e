"""Grid specs: the axes of an experiment, expanded into cells and checked up front.

A grid is a YAML file: a named one (grid/named/NAME.yaml, run by its name) or
a user's, both read by `load_grid`:

    name: my-grid
    tasks: [LaMP_2, LaMP_4]
    model: google/flan-t5-base      # a hub id, a local folder, `tiny` or `vote`
    retriever_model: facebook/contriever  # Contriever's encoder: a hub id or a local folder (the default)
    recipe: lamp                     # every block's default recipe: lamp (the default) or study
    data: LaMP                       # a LaMP directory, or `synthetic` (the default)
    seeds: [0, 1, 2]
    axes:                            # blocks; each block is a cross product
      - retriever: [none, Full_Random, RanBM25, Random, BM25]
        k: [4]
      - retriever: [BM25]
        ablation: [both, only_output]
        order: [start, end, middle]
        k: [0.1, 0.3]
      - retriever: [Mixed]
        input_retriever: [BM25]
        output_retriever: [Random, Full_Random]
        k: [4]
      - recipe: [study]               # the study's code reproduced (docs/design.md §7a); default lamp
        retriever: [BM25]
        k: [1, 80]
      - setting: [user, time]         # LaMP's user-based or time-based files; default user
        retriever: [Recency, BM25]
        use_date: [false, true]       # BM25 over texts with the items' dates (LaMP's --use_date)
        k: [1]
    training: {epochs: 2}            # overrides of the study's defaults (docs/design.md §8)
    predict_test: true               # also decode each cell's test split (LaMP's submission format)
    published:                       # what the study reports, drawn beside ours by `report`
      source: Wu et al. 2024 (arXiv 2406.17803), its headline figure, panel (b)
      LaMP_2:                        # per task: a change against `none` per retriever,
        curves:                      # or a curve per line of a figure, k -> metric
          only_output: {1: 0.580, 2: 0.577}

Axes left out of a block take their default (recipe lamp, k 0, ablation both,
order start, rank_offset 0, setting user, use_date false). `none` ignores k,
ablation, order and use_date, so it is one cell per recipe and setting. A cell
whose setting and use_date are their defaults has the key and MLflow params it
had before those axes were (QUIET_DEFAULTS).
"""

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from grid.embed import DEFAULT_RETRIEVER_MODEL
from grid.model import TINY, ModelRef
from grid.tiny import TINY_TRAINING
from lamp.cell import Cell
from lamp.errors import LampError
from lamp.retrieval import DENSE
from lamp.tasks import get_task

AXES = ("recipe", "retriever", "k", "ablation", "order", "rank_offset", "input_retriever", "output_retriever",
        "setting", "use_date")
# Axes a cell's key and params name only away from these defaults, so that the
# cells from before them keep their keys, params and MLflow runs.
QUIET_DEFAULTS = {"setting": "user", "use_date": False}
# The recipe's default is the grid's own (GridSpec.recipe).
AXIS_DEFAULTS = {"retriever": "none", "k": 0, "ablation": "both", "order": "start", "rank_offset": 0,
                 "input_retriever": None, "output_retriever": None, **QUIET_DEFAULTS}
NAMED = Path(__file__).parent / "named"
# The named grids, in the order `list` shows them: the demo, then the study's analyses.
NAMED_GRIDS = ("demo", "paper-fig-a", "paper-fig-b", "paper-fig-b-recipes", "paper-fig-c", "paper-ablation",
               "paper-mixed", "paper-zero-shot", "paper-zero-shot-xxl", "lamp-baselines")


def varying_axes(cells: list) -> dict:
    """Each axis (and the model and seed) that takes more than one value over the cells: name -> how many."""
    counts = {name: len({c.params().get(name) for c in cells}) for name in ("task", *AXES, "model", "seed")}
    return {name: n for name, n in counts.items() if n > 1}


# docs/design.md §5 and §6 in a few words each: a run's description in the MLflow UI.
ABLATION_TEXT = {"both": "whole items shown", "only_output": "output halves shown",
                 "decouple": "output halves shown, ranked by their input halves",
                 "only_input": "input halves shown"}
ORDER_TEXT = {"start": "most relevant first", "end": "most relevant last, next to the task input",
              "middle": "most relevant in the middle", "random": "in a random order"}


@dataclass(frozen=True)
class Training:
    """Training and evaluation settings; defaults are the study's (docs/design.md §8)."""
    lr: float = 5e-5
    weight_decay: float = 1e-3
    warmup: float = 0.05  # share of steps
    batch_size: int = 6
    epochs: int | None = None  # None: the task's default (10, or 20 for generation)
    beams: int = 4
    eval_batch_size: int = 32  # decoding: its own batch, of prompts of similar length
    repetition_penalty: float = 1.0  # in generation; 1 is none (the study's)
    max_prompt_tokens: int = 512
    selection_share: float = 0.1  # users of train held out for model selection
    checkpoint_every: int = 1  # epochs between saved training states (what a retry resumes from)
    limit_train: int | None = None  # examples, for quick looks
    limit_dev: int | None = None
    deterministic: bool = True  # torch's deterministic kernels (and cuBLAS's workspace) on the GPU: grid/trial/hardware.py

    def epochs_for(self, task: str) -> int:
        return get_task(task).epochs if self.epochs is None else self.epochs


@dataclass(frozen=True)
class Resources:
    workers_per_trial: int = 1
    gpus_per_worker: float = 0
    zero_stage: int = 2
    cpus_per_worker: float = 0.5
    custom_per_worker: dict = field(default_factory=dict)  # e.g. {"trial_node": 1}: trials run where it is

    def threads(self) -> int:
        """A worker's CPU threads: its share of CPUs, at least one."""
        return max(1, int(self.cpus_per_worker))

    def per_worker(self) -> dict:
        """What each Train worker of a trial asks Ray for."""
        return {"CPU": self.cpus_per_worker, **({"GPU": self.gpus_per_worker} if self.gpus_per_worker else {}),
                **self.custom_per_worker}


@dataclass(frozen=True)
class GridCell:
    """One trial: a lamp Cell, the model it fine-tunes, and how."""
    cell: Cell
    model: str
    training: Training = field(default_factory=Training)
    retriever_model: str | None = None  # the encoder of a dense retriever's cell (Contriever); None for the others

    @property
    def key(self) -> str:
        """Names the cell in MLflow and in resume checks: every axis, and the model."""
        return self.name(with_seed=True)

    @property
    def arm(self) -> str:
        """The cell's name without its seed: an arm of the grid (docs/design.md), what a
        report averages over seeds."""
        return self.name(with_seed=False)

    def name(self, with_seed: bool) -> str:
        c = self.cell
        seed = [f"seed={c.seed}"] if with_seed else []
        task = [c.task] + [c.setting] * (c.setting != QUIET_DEFAULTS["setting"])
        if c.retriever == "none":
            return "/".join([*task, c.recipe, "none", *seed, self.model])
        retriever = (f"Mixed({c.input_retriever}>{c.output_retriever})" if c.retriever == "Mixed"
                     else c.retriever) + "+date" * c.use_date
        if self.retriever_model not in (None, DEFAULT_RETRIEVER_MODEL):  # another encoder: another cell
            retriever += f"[{self.retriever_model}]"
        return "/".join([*task, c.recipe, retriever, f"k={c.k}", c.ablation, c.order, f"offset={c.rank_offset}",
                         *seed, self.model])

    @property
    def description(self) -> str:
        """The cell in one line, for a reader of the MLflow UI."""
        c = self.cell
        setting = "" if c.setting == QUIET_DEFAULTS["setting"] else f" ({c.setting}-based)"
        what = f"{c.task}{setting}, recipe {c.recipe}, model {self.model}, seed {c.seed}"
        if c.retriever == "none":
            return f"{what}: no profile items (the non-personalized baseline)."
        retriever = (f"{c.input_retriever} for the input halves, {c.output_retriever} for the output halves"
                     if c.retriever == "Mixed" else c.retriever) + " over texts with dates" * c.use_date
        skipped = f", skipping the first {c.rank_offset}" if c.rank_offset else ""
        return (f"{what}: k={c.k} profile item(s) by {retriever}{skipped}; {ABLATION_TEXT[c.ablation]}; "
                f"{ORDER_TEXT[c.order]}.")

    @property
    def settings_hash(self) -> str:
        return hashlib.blake2b(json.dumps(asdict(self.training), sort_keys=True).encode(),
                               digest_size=6).hexdigest()

    def params(self) -> dict:
        """Every axis and setting, flat, as MLflow params (a QUIET_DEFAULTS axis only away from its default)."""
        axes = {f.name: getattr(self.cell, f.name) for f in fields(self.cell) if f.name != "task"}
        return {"task": self.cell.task, "model": self.model,
                **({"retriever_model": self.retriever_model} if self.retriever_model else {}),
                **{name: v for name, v in axes.items() if name not in QUIET_DEFAULTS or v != QUIET_DEFAULTS[name]},
                **{f"train.{k}": v for k, v in asdict(self.training).items()}}

    @classmethod
    def from_params(cls, params: dict, where: str) -> "GridCell":
        """The cell a run's MLflow params describe (as `params` wrote them, text)."""
        def value(name, text):
            if text == "None":
                return None
            if name in ("k", "rank_offset"):
                return float(text) if "." in text else int(text)
            if name == "use_date":
                return text == "True"
            return int(text) if name == "seed" else text

        cell = Cell(**{f.name: value(f.name, params[f.name]) for f in fields(Cell) if f.name in params})
        training = {f.name: training_value(f.name, value(f.name, params[f"train.{f.name}"]), where)
                    for f in fields(Training) if f"train.{f.name}" in params}
        return cls(cell, params["model"], Training(**training), params.get("retriever_model"))


@dataclass(frozen=True)
class GridSpec:
    name: str
    tasks: tuple
    axes: tuple
    model: str = TINY  # as the user gave it (grid/model.py reads it)
    data: str = "synthetic"  # a LaMP directory, or `synthetic`
    seeds: tuple = (0,)
    training: Training = field(default_factory=Training)
    recipe: str = "lamp"  # the default of blocks that do not name one
    published: dict = field(default_factory=dict)  # task -> the study's values (`report` draws them beside ours)
    # Each cell also writes its test predictions. Not a training setting: it changes no
    # cell's key, params or settings hash, only what a finished cell leaves behind.
    predict_test: bool = False
    retriever_model: str = DEFAULT_RETRIEVER_MODEL  # the encoder Contriever cells rank with (grid/embed.py)

    def cells(self) -> list:
        """Every cell, checked, in a stable order; duplicates (e.g. `none` x ablations) once."""
        cells = {}
        for task, block, seed in itertools.product(self.tasks, self.axes, self.seeds):
            names = list(block)
            for values in itertools.product(*(block[n] for n in names)):
                axes = {**AXIS_DEFAULTS, "recipe": self.recipe, **dict(zip(names, values))}
                if axes["retriever"] == "none":
                    axes.update(k=0, ablation="both", order="start", rank_offset=0, use_date=False)
                cell = Cell(task=task, seed=seed, **axes)
                try:
                    cell.check()
                except LampError as error:
                    raise LampError(f"grid {self.name!r}: cell {GridCell(cell, self.model).key}: {error}") from None
                grid_cell = GridCell(cell, self.model, self.training,
                                     self.retriever_model if cell.retriever in DENSE else None)
                cells.setdefault(grid_cell.key, grid_cell)
        return list(cells.values())


def parse_grid(raw: dict, where: str) -> GridSpec:
    """A GridSpec from a dict, or a clear error naming what is wrong."""
    if not isinstance(raw, dict):
        raise LampError(f"{where}: a grid is a mapping with name, tasks and axes")
    known = {"name", "tasks", "axes", "model", "data", "seeds", "training", "recipe", "published", "predict_test",
             "retriever_model"}
    unknown = set(raw) - known
    if unknown:
        raise LampError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(known))}")
    for key in ("name", "tasks", "axes"):
        if key not in raw:
            raise LampError(f"{where}: missing {key!r}")
    tasks = tuple(get_task(t).name for t in raw["tasks"])
    axes = raw["axes"]
    if not isinstance(axes, list) or not axes:
        raise LampError(f"{where}: 'axes' must be a non-empty list of blocks")
    blocks = []
    for i, block in enumerate(axes):
        if not isinstance(block, dict):
            raise LampError(f"{where}: axes[{i}] must be a mapping of axis -> list of values")
        bad = set(block) - set(AXES)
        if bad:
            raise LampError(f"{where}: axes[{i}]: unknown axis {sorted(bad)[0]!r}; valid: {', '.join(AXES)}")
        blocks.append({n: tuple(v if isinstance(v, list) else [v]) for n, v in block.items()})
    training = raw.get("training") or {}
    valid = {f.name for f in fields(Training)}
    bad = set(training) - valid
    if bad:
        raise LampError(f"{where}: training: unknown setting {sorted(bad)[0]!r}; valid: {', '.join(sorted(valid))}")
    seeds = raw.get("seeds", [0])
    predict_test = raw.get("predict_test", False)
    if not isinstance(predict_test, bool):
        raise LampError(f"{where}: predict_test must be true or false, got {predict_test!r}")
    return GridSpec(name=str(raw["name"]), tasks=tasks, axes=tuple(blocks), model=str(raw.get("model", TINY)),
                    data=str(raw.get("data", "synthetic")), recipe=str(raw.get("recipe", "lamp")),
                    seeds=tuple(int(s) for s in (seeds if isinstance(seeds, list) else [seeds])),
                    training=Training(**{k: training_value(k, v, where) for k, v in training.items()}),
                    published=read_published(raw.get("published", {}), where), predict_test=predict_test,
                    retriever_model=str(raw.get("retriever_model", DEFAULT_RETRIEVER_MODEL)))


def read_published(published: dict, where: str) -> dict:
    """The study's values per task, their source read and set aside: a published
    number without one is refused, as a reader could not check it."""
    if not isinstance(published, dict) or published and not isinstance(published.get("source"), str):
        raise LampError(f"{where}: published: a mapping with a source (where the values come from) and, "
                        "per task, the values")
    for task, values in published.items():
        if task != "source" and not (isinstance(values, dict) and set(values) <= {"change", "curves"}):
            raise LampError(f"{where}: published: {task}: a mapping of change and/or curves")
    return {get_task(task).name: values for task, values in published.items() if task != "source"}


def training_value(name: str, value, where: str):
    """A training setting as its field's type. (YAML reads `1e-3` as a string; MLflow
    keeps a param as text.)"""
    declared = {f.name: f.type for f in fields(Training)}[name]
    if declared is bool:
        if isinstance(value, bool) or str(value).lower() in ("true", "false"):
            return str(value).lower() == "true"
        raise LampError(f"{where}: training: {name} must be true or false, got {value!r}")
    kind = float if declared is float else int
    if value is None and declared is not kind:  # `int | None`: None means the default
        return None
    try:
        number = float(value)
        if kind is int and number != int(number):
            raise ValueError
        return kind(number)
    except (TypeError, ValueError):
        raise LampError(f"{where}: training: {name} must be a {'whole ' if kind is int else ''}number, "
                        f"got {value!r}") from None


def load_grid(name_or_path: str) -> GridSpec:
    """A named grid (grid/named/NAME.yaml), or a user's YAML file of the same schema."""
    path = NAMED / f"{name_or_path}.yaml" if name_or_path in NAMED_GRIDS else Path(name_or_path)
    if not path.is_file():
        raise LampError(f"unknown grid {name_or_path!r}: not a named grid ({', '.join(NAMED_GRIDS)}) "
                        "and no such YAML file")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise LampError(f"{path}: malformed YAML: {' '.join(str(error).split())}") from None
    return parse_grid(raw, str(path))


def with_overrides(spec: GridSpec, model=None, seeds=None, recipe=None, tasks=None, setting=None, predict_test=None,
                   retriever_model=None, **training) -> GridSpec:
    """The grid with command-line overrides applied. A grid made for a real model
    run with `--model tiny` (a quick look) takes the tiny model's schedule: the
    study's would teach it nothing. Tasks given keep only those of the grid's; a
    recipe or setting given replaces every block's; predict_test given (True or
    False) replaces the grid's."""
    if tasks is not None:
        unknown = [task for task in tasks if task not in spec.tasks]
        if unknown:
            raise LampError(f"--tasks: {', '.join(unknown)} not among the tasks of grid {spec.name!r} "
                            f"({', '.join(spec.tasks)})")
        spec = replace(spec, tasks=tuple(task for task in spec.tasks if task in tasks))
    if recipe is not None:
        spec = replace(spec, recipe=recipe, axes=tuple({n: v for n, v in block.items() if n != "recipe"}
                                                       for block in spec.axes))
    if setting is not None:
        spec = replace(spec, axes=tuple({**block, "setting": (setting,)} for block in spec.axes))
    base = spec.training
    if model and ModelRef.named(model).kind == TINY and ModelRef.named(spec.model).kind != TINY:
        base = replace(base, **{**TINY_TRAINING, "epochs": 0 if base.epochs == 0 else TINY_TRAINING["epochs"]})
    changes = {k: v for k, v in training.items() if v is not None}
    return replace(spec, model=model or spec.model, seeds=tuple(seeds) if seeds else spec.seeds,
                   training=replace(base, **changes), retriever_model=retriever_model or spec.retriever_model,
                   predict_test=spec.predict_test if predict_test is None else predict_test)
