"""Dense retrieval's embeddings (Contriever, docs/design.md §4), computed once in `prepare`.

An encoder (any Hugging Face encoder: `facebook/contriever` by default, a hub
id or a local folder) embeds each example's query and every item of its
profile, as LaMP's own Contriever ranking does: the mean of the last hidden
state over the tokens the attention mask keeps, texts cut to the tokenizer's
length. The query and item texts are the ones BM25 reads (lamp/retrieval.py:
extract_query, document_text).

Embedding is a Ray Data pass over the split's examples (grid/pipeline.py's
map_and_write) through a pool of `EmbedExamples` actors: one per GPU where the
cluster has GPUs, else one per CPU. Each actor decides its accelerator itself,
runs half precision on a GPU (bf16 where supported, else fp16) and fp32 on a
CPU, and embeds texts in batches sorted by length, so a batch pads little. The
embeddings go into the shard cache under a name that hashes the encoder's
files: a rerun embeds nothing, another encoder embeds again. Ranking then is
a dot product per example, in the rankers (grid/shards.py).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

import lamp.retrieval
from grid.examples import profile_items
from grid.model import HUB, LOCAL, ModelRef
from grid.pipeline import ACTOR_BASE, fit_actors, map_and_write
from grid.storage import digest, file_digest
from lamp.errors import LampError
from lamp.retrieval import document_text, extract_query

DEFAULT_RETRIEVER_MODEL = "facebook/contriever"
TEXTS_PER_FORWARD = 16  # LaMP's rank_profiles.py embeds 16 texts at a time
EXAMPLES_PER_BATCH = 16  # examples an actor embeds per Ray Data batch
TORCH_BASE = 600 << 20  # what importing torch and transformers adds to an actor
EMBEDDINGS_SCHEMA = pa.schema([("row", pa.int64()), ("query", pa.list_(pa.float32())),
                               ("items", pa.list_(pa.list_(pa.float32())))])
# What a hub encoder's folder needs: config, tokenizer and weights, not other formats' copies.
HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "*.bin"]


@dataclass(frozen=True)
class Encoder:
    """A checked encoder: its name as given, the folder it loads from, and a hash of that folder's files."""
    name: str
    folder: str
    files_digest: str

    @property
    def weight_bytes(self) -> int:
        return sum(f.stat().st_size for f in Path(self.folder).glob("*") if f.suffix in (".safetensors", ".bin"))


def resolve_encoder(name: str, log=print) -> Encoder:
    """The encoder a name means, checked before any work: a local folder (as
    ModelRef.named tells one) must hold an encoder's config; a hub id is fetched
    into the Hugging Face cache (once) and checked the same way."""
    model = ModelRef.named(name)
    if model.kind == LOCAL:
        if not Path(model.path).is_dir():
            raise LampError(f"retriever model {name!r}: no such folder")
        folder = Path(model.path)
    elif model.kind == HUB:
        folder = hub_folder(name, log)
    else:
        raise LampError(f"retriever model {name!r}: not an encoder (`{name}` is a language model of lamp-grid's); "
                        "give a hub id or a local encoder folder")
    check_encoder(folder, name)
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    return Encoder(name, str(folder), digest(*((f.relative_to(folder).as_posix(), file_digest(f)) for f in files)))


def hub_folder(name: str, log) -> Path:
    """A hub encoder's files, in the Hugging Face cache: downloaded the first time."""
    from huggingface_hub import snapshot_download  # heavy: only for a hub id

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
    except (OSError, ValueError):
        log(f"downloading the retriever model {name}")
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except (OSError, ValueError) as error:
        raise LampError(f"retriever model {name!r}: not a local folder, and the hub cannot give it: "
                        f"{str(error).splitlines()[0]}") from None


def check_encoder(folder: Path, name: str) -> None:
    """Refuses a folder whose config is missing or describes no text encoder, or that has no tokenizer."""
    from transformers import AutoConfig, AutoTokenizer  # heavy: only where an encoder is checked
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise LampError(f"retriever model {name!r}: no encoder config there: {str(error).splitlines()[0]}") from None
    if config.is_encoder_decoder or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise LampError(f"retriever model {name!r} is a {config.model_type} model, not a text encoder "
                        "(e.g. bert, roberta): Contriever mean-pools an encoder's token embeddings")
    try:
        AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise LampError(f"retriever model {name!r}: no tokenizer there: {str(error).splitlines()[0]}") from None


def embedding_texts(task: str, batch: pa.Table, halves: list) -> tuple[list, dict]:
    """(queries, items): each example's query, and per by_input in halves the texts of
    its profile items, per example."""
    queries = [extract_query(task, text) for text in batch.column("input").to_pylist()]
    profiles = [profile_items(profile) for profile in batch.column("profile").to_pylist()]
    return queries, {by_input: [[document_text(task, item, by_input) for item in profile] for profile in profiles]
                     for by_input in halves}


def list_arrays(vectors: np.ndarray, sizes: list) -> list:
    """Rows of vectors as Arrow lists of lists: the first sizes[0] rows, the next sizes[1], ..."""
    width = vectors.shape[1]
    each = pa.ListArray.from_arrays(pa.array(np.arange(len(vectors) + 1, dtype=np.int32) * width),
                                    pa.array(vectors.ravel()))
    offsets = np.cumsum([0, *sizes], dtype=np.int32)
    return [each.slice(start, end - start) for start, end in zip(offsets[:-1], offsets[1:])]


class EmbedExamples:
    """map_batches callable: the query's embedding and every profile item's, per example;
    the items' once per wanted by_input (whole items, input halves), in columns
    `items/<by_input>`."""

    def __init__(self, task: str, folder: str, halves: list):
        import torch  # heavy: only in embedding actors
        from transformers import AutoModel, AutoTokenizer

        self.task, self.halves, self.torch = task, halves, torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32
            torch.set_num_threads(1)  # see embedder_resources
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, dtype=dtype).to(self.device).eval()
        # The tokenizer's length, as LaMP cuts; but no longer than the encoder's positions hold
        # (a tokenizer saved without its length would otherwise run past them).
        self.max_length = min(self.tokenizer.model_max_length,
                              getattr(self.model.config, "max_position_embeddings", None) or 1 << 30)

    def embed(self, texts: list) -> np.ndarray:
        """The texts' mean-pooled embeddings (float32), embedded in batches of similar length."""
        tokens = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        order = np.argsort([len(t) for t in tokens], kind="stable")
        with self.torch.inference_mode():
            for start in range(0, len(order), TEXTS_PER_FORWARD):
                chosen = order[start:start + TEXTS_PER_FORWARD]
                padded = self.tokenizer.pad({"input_ids": [tokens[i] for i in chosen]}, return_tensors="pt")
                padded = {key: value.to(self.device) for key, value in padded.items()}
                hidden = self.model(**padded).last_hidden_state.float()
                out[chosen] = mean_pool(hidden, padded["attention_mask"]).cpu().numpy()
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:
        queries, items = embedding_texts(self.task, batch, self.halves)
        flat = [text for profiles in items.values() for profile in profiles for text in profile]
        query, *vectors = list_arrays(self.embed(queries + flat),
                                      [len(queries)] + [sum(map(len, profiles)) for profiles in items.values()])
        # Each example's items, as a list of vectors: the same profile sizes for every by_input.
        offsets = pa.array(np.cumsum([0] + [len(profile) for profile in items[self.halves[0]]], dtype=np.int32))
        return pa.table({"row": batch.column("row"), "query": query,
                         **{f"items/{by_input}": pa.ListArray.from_arrays(offsets, each)
                            for by_input, each in zip(items, vectors)}})


def mean_pool(hidden, mask):
    """The mean of each sequence's token embeddings over the tokens its mask keeps."""
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def embedder_resources(workers: int | None = None) -> tuple[int, int]:
    """(actors, GPUs each): by default one actor per GPU where the cluster has GPUs,
    else one per CPU. CPU actors ask Ray for a sliver of CPU only (ACTOR_CPUS,
    grid/pipeline.py), as the rankers do, so Ray Data's own tasks always find one;
    each runs one torch thread: the actors are the parallelism (two threads in one
    actor embedded 10x slower than one with the small encoder here, BENCHMARKS.md)."""
    import ray  # heavy: imported where Ray runs

    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return workers or gpus, 1
    return workers or max(1, int(cluster.get("CPU", 1))), 0


def write_embeddings(task: str, examples: str, wanted: dict, encoder: Encoder, workers: int | None = None,
                     log=print) -> None:
    """Embeds the split at `examples` for each wanted by_input (by_input -> final
    directory), in one Ray Data pass, each into its `embeddings.parquet`."""
    actors, gpus = embedder_resources(workers)
    # An actor holds the encoder (twice while loading) and a batch's hidden states.
    memory = ACTOR_BASE + TORCH_BASE + 2 * encoder.weight_bytes
    actors, memory = fit_actors(actors, memory, "embedder", log)

    def parts(batch: pa.Table) -> dict:
        return {by_input: pa.Table.from_arrays([batch.column("row"), batch.column("query"),
                                                batch.column(f"items/{by_input}")], schema=EMBEDDINGS_SCHEMA)
                for by_input in wanted}

    map_and_write([examples], EmbedExamples, dict(task=task, folder=encoder.folder, halves=list(wanted)),
                  wanted, parts, "embeddings.parquet", batch_size=EXAMPLES_PER_BATCH, memory=memory,
                  workers=actors, gpus=gpus)


def read_embeddings(group: pa.Table, at: int) -> tuple[np.ndarray, np.ndarray]:
    """(query, items) of the row at position `at` of a table of EMBEDDINGS_SCHEMA (one chunk
    per column): the query's vector, and a matrix of its items' vectors, one row each."""
    query = group.column("query").chunk(0)[at].values.to_numpy()
    items = group.column("items").chunk(0)[at].values
    return query, items.flatten().to_numpy().reshape(len(items), len(query))


def embed_split(task: str, examples: str, where: Path, fingerprint: str, names: list, encoder: Encoder,
                workers: int | None, label: str, log) -> dict:
    """The embeddings.parquet each dense ranking (by name) reads, embedded where the cache
    lacks them: named by the split, the halves embedded, the encoder's files and the code
    that builds and embeds the texts."""
    version = digest(Path(__file__).read_bytes(), Path(lamp.retrieval.__file__).read_bytes())
    directories = {name: where / (f"embeddings{'_input' if name.endswith('_input') else ''}-"
                                  + digest(fingerprint, name.endswith("_input"), encoder.files_digest, version))
                   for name in names}
    missing = {name.endswith("_input"): path for name, path in directories.items() if not path.is_dir()}
    if missing:
        write_embeddings(task, examples, missing, encoder, workers, log)
        log(f"embedded {label} with {encoder.name}: "
            + ", ".join("input halves" if by_input else "whole items" for by_input in missing))
    return {name: path / "embeddings.parquet" for name, path in directories.items()}
