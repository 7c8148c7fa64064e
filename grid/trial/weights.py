"""A fine-tuned cell's weights and training state: the best epoch's weights (in
memory for the final decoding, in the trial's storage for a retry), and the
training state saved every checkpoint_every epochs that a retry resumes from,
each worker's random generators included, so that a retry ends as if never
stopped. Also how a model's config is saved so that it loads alike everywhere."""

import io
import json
import random
import tempfile
from pathlib import Path

from grid.storage import filesystem

LAST = "last_epoch"  # DeepSpeed's tag of the training state saved


def full_state(engine, zero_stage: int) -> dict:
    """A CPU copy of the model's full weights (gathered first under ZeRO-3)."""
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def load_state(engine, state: dict, zero_stage: int) -> None:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero_stage == 3):
        engine.module.load_state_dict(state)


class BestWeights:
    """The best epoch's weights, in the trial's storage beside Ray's checkpoints:
    written only when the selection metric improves (not with every training
    state), read back by a retry. A file per epoch, so that the one the last saved
    training state points to is never overwritten before a newer state points
    elsewhere. `directory` is a local (shared) path or a URI."""

    def __init__(self, directory: str):
        self.fs, self.root = filesystem(directory)

    def path(self, epoch: int) -> str:
        return f"{self.root}/epoch-{epoch}.pt"

    def save(self, state: dict, epoch: int) -> None:
        import torch

        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.path(epoch)}.tmp") as out:
            out.write(buffer.getvalue())
        self.fs.move(f"{self.path(epoch)}.tmp", self.path(epoch))

    def load(self, epoch: int):
        import torch

        if epoch < 0:
            return None
        with self.fs.open_input_file(self.path(epoch)) as f:
            return torch.load(io.BytesIO(f.read()))

    def keep_only(self, epochs: set) -> None:
        """Removes every other epoch's file: those the saved training states no longer point to."""
        from pyarrow import fs

        keep = {f"epoch-{epoch}.pt" for epoch in epochs}
        for info in self.fs.get_file_info(fs.FileSelector(self.root, allow_not_found=True)):
            if info.base_name.startswith("epoch-") and info.base_name not in keep:
                self.fs.delete_file(info.path)


class BestEpoch:
    """The best epoch so far by the selection metric: its metric, its epoch (-1 before
    any) and its weights, a CPU copy for the final decoding and a file (BestWeights,
    written by rank 0) for a retry. `saved` is the best epoch the newest saved
    training state points to: its file stays until a newer state points elsewhere."""

    def __init__(self, directory: str, higher_is_better: bool):
        self.files = BestWeights(directory)
        self.sign = 1 if higher_is_better else -1
        self.metric, self.epoch, self.state, self.saved = None, -1, None, -1

    def as_saved(self) -> dict:
        """What a training state records of it."""
        return {"metric": self.metric, "epoch": self.epoch}

    def resume(self, saved: dict) -> None:
        """As the training state a retry resumes from recorded it, its weights read back."""
        self.metric, self.epoch = saved["metric"], saved["epoch"]
        self.state, self.saved = self.files.load(self.epoch), self.epoch

    def offer(self, metric: float, epoch: int, engine, zero_stage: int, rank: int) -> None:
        """Takes the epoch's weights if its metric beats the best so far."""
        if self.metric is None or self.sign * metric > self.sign * self.metric:
            self.metric, self.epoch, self.state = metric, epoch, full_state(engine, zero_stage)
            if rank == 0:
                self.files.save(self.state, epoch)

    def checkpointed(self, rank: int) -> None:
        """A new training state was saved: the files neither it nor the one before it
        (which may still be the newest committed) points to go."""
        if rank == 0:
            self.files.keep_only({self.saved, self.epoch})
        self.saved = self.epoch


def random_state(device) -> dict:
    """This worker's random generators: what its next draws (dropout) depend on."""
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_random_state(state: dict, device) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_training_state(engine, device, rank: int, epoch: int, best: BestEpoch) -> str:
    """The training state after `epoch`, in a new local directory for Ray to upload
    (and delete): DeepSpeed's engine, each worker's random state (dropout), and the
    epoch and best epoch. The data needs no place: the next epoch's order is a
    function of (seed, epoch)."""
    import torch

    directory = tempfile.mkdtemp(prefix="lamp-grid-checkpoint-")
    engine.save_checkpoint(directory, tag=LAST)
    torch.save(random_state(device), Path(directory) / f"random-state-{rank}.pt")
    if rank == 0:
        (Path(directory) / "state.json").write_text(json.dumps({"epoch": epoch, "best": best.as_saved()}))
    return directory


def resume_training_state(engine, device, rank: int, checkpoint, best: BestEpoch) -> int:
    """Restores the training state of a Ray checkpoint; the epoch to start at."""
    import torch

    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag=LAST)
        state = json.loads((Path(directory) / "state.json").read_text())
        set_random_state(torch.load(Path(directory) / f"random-state-{rank}.pt", weights_only=False), device)
    best.resume(state["best"])
    return state["epoch"] + 1


def portable_config(model) -> None:
    """Makes the model's config say whether its output embedding is its input
    embedding, as its weights have it, so that it loads alike under transformers 4
    and 5. transformers 5 sets T5's `tie_word_embeddings` to True whatever the
    checkpoint (and unties a head the checkpoint holds apart); transformers 4 reads
    True as: tie the head, and scale the decoder's outputs. A T5 whose head is its
    own (Flan-T5) is saved with False, which both read as untied and unscaled."""
    output = model.get_output_embeddings()
    model.config.tie_word_embeddings = output is not None and output.weight is model.get_input_embeddings().weight
