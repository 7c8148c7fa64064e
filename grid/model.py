"""The model a grid fine-tunes, as one object: `ModelRef`.

A grid names its model with a string: a hub id (google/flan-t5-base), a local
model folder, `tiny` (a small T5 built from the grid's own data, grid/tiny.py)
or `vote` (no model: a vote over the retrieved items, lamp/vote.py). Only this
module reads that string. `ModelRef.named` tells its kind from the name alone,
which is all a dry run needs; `resolved` then locates it, once, when the grid
is planned: it builds the tiny model, checks that a folder or hub id loads,
and decides whether the model is decoder-only. `for_nodes` makes a local
folder reachable from the cluster's other nodes. The ModelRef then travels to
every renderer and trial, which load its tokenizer and weights through it.

The name stays as the user gave it: it is what MLflow records and what cell
keys end with.
"""

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from grid.storage import build_atomically, digest, is_uri, join, local_data, publish
from grid.tiny import tiny_config, tiny_model
from lamp.errors import LampError

HUB, LOCAL, TINY, VOTE = "hub", "local", "tiny", "vote"  # the kinds; `tiny` and `vote` are also their names


@dataclass(frozen=True)
class ModelRef:
    name: str  # as the grid gave it: what MLflow records
    kind: str  # HUB, LOCAL, TINY or VOTE
    path: str | None = None  # where this process loads it: a folder or hub id; None for vote, and tiny until built
    node_path: str | None = None  # where a trial on any node loads it (a folder published to the shard cache)
    decoder_only: bool | None = None  # a causal LM (True) or an encoder-decoder (False); None until resolved

    @classmethod
    def named(cls, name: str) -> "ModelRef":
        """The model a name means, not yet located: nothing is loaded, built or fetched.
        A name that is a folder here, or reads as a path, is a local folder; `tiny` and
        `vote` are always the built-in ones; anything else is a hub id."""
        if name in (TINY, VOTE):
            return cls(name, name)
        folder = Path(name).expanduser()
        if name.startswith((".", "/", "~")) or folder.exists():
            return cls(name, LOCAL, str(folder.resolve()))
        return cls(name, HUB, name)

    @property
    def has_weights(self) -> bool:
        """Whether it is a language model to load and tokenize with (all but `vote`)."""
        return self.kind != VOTE

    def resolved(self, data=None, tasks=(), models_dir=None, log=print) -> "ModelRef":
        """Located and checked, with its decoder-only decided. The tiny model is built
        (once) into models_dir from the tasks of the data directory; a folder must be
        there and a hub id must answer (the hub is asked for its config)."""
        if self.kind == VOTE:
            return self
        model = self
        if self.kind == TINY:
            model = replace(self, path=str(tiny_model(data, tasks, models_dir, log)))
        elif self.kind == LOCAL and not Path(self.path).is_dir():
            raise LampError(f"no such model folder: {self.name}")
        return replace(model, node_path=model.path, decoder_only=decoder_only(model.config(), self.name))

    def for_nodes(self, cache: str, other_nodes: bool, log=print) -> "ModelRef":
        """As trials load it where the cluster has other nodes (other_nodes): a folder
        (the tiny model, or a user's) is published into the shard cache, which every
        node reaches. A hub id is left as it is: each node downloads it."""
        if self.kind not in (LOCAL, TINY) or not other_nodes:
            return self
        return replace(self, node_path=published_folder(Path(self.path), cache, log))

    def config(self):
        """Its Hugging Face config; None for `vote`. The tiny model's, until it is
        built, is the one it will have, at its tokenizer's largest vocabulary."""
        if self.kind == VOTE:
            return None
        if self.kind == TINY and self.path is None:
            return tiny_config()
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except (OSError, ValueError) as error:
            raise LampError(f"cannot load model {self.name!r} (a local folder or hub id): "
                            f"{str(error).splitlines()[0]}") from None

    def on_this_node(self) -> str:
        """The folder or hub id this node loads: a folder at a URI (published to the
        shard cache) is copied to this node once."""
        if not is_uri(self.node_path):
            return self.node_path
        return str(local_data(self.node_path, Path(tempfile.gettempdir()) / "lamp-grid" / "models", lambda _: None))

    def tokenizer(self):
        """Its tokenizer, as saved with it."""
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.on_this_node())
        except (OSError, ValueError) as error:
            raise LampError(f"cannot load a tokenizer from {self.name!r}: {str(error).splitlines()[0]}") from None

    def load(self, **options):
        """Its weights, as a causal LM or a seq2seq model (options go to from_pretrained)."""
        return auto_class(self.decoder_only).from_pretrained(self.on_this_node(), **options)


def decoder_only(config, name: str | None = None) -> bool:
    """Whether the model a Hugging Face config describes is decoder-only (a causal LM,
    e.g. GPT-2, Llama) or an encoder-decoder (a seq2seq LM, e.g. T5): the one place
    lamp-grid decides it, from the model types transformers' Auto classes load. A
    model that is neither (an encoder such as ViT) is refused, naming it and why."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    if config.is_encoder_decoder and config.model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return False
    if not config.is_encoder_decoder and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return True
    raise LampError(f"model {name or config.name_or_path!r} is a {config.model_type} model, which transformers loads "
                    "neither as a causal LM (decoder-only) nor as a seq2seq LM (encoder-decoder): lamp-grid "
                    "fine-tunes and decodes language models of these two sorts")


def auto_class(decoder_only: bool):
    """The transformers Auto class that loads such a model."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if decoder_only else AutoModelForSeq2SeqLM


def published_folder(folder: Path, cache: str, log) -> str:
    """A model folder copied into the shard cache (a directory or URI), under a name
    from its files' names and sizes: where trials on every node load it."""
    from pyarrow import fs  # deferred: only a multi-node grid publishes a folder

    listing = sorted((f.relative_to(folder).as_posix(), f.stat().st_size) for f in folder.rglob("*") if f.is_file())
    name = f"{folder.name}-{digest(listing)}"
    if is_uri(cache):
        target = join(cache, "models", name)
        if publish(folder, target):
            log(f"published the model {folder} to {target}")
        return target
    target = Path(cache) / "models" / name

    def copy(tmp: Path) -> None:
        fs.copy_files(str(folder), str(tmp), source_filesystem=fs.LocalFileSystem(),
                      destination_filesystem=fs.LocalFileSystem())

    if build_atomically(target, copy):
        log(f"copied the model {folder} into the shard cache, {target}")
    return str(target)
