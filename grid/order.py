"""A cell's training order, by construction: which train rows each optimizer step
of each epoch reads, and which worker reads which of them.

Each epoch is a seeded permutation of the train rows, drawn anew every epoch (as
the study's Hugging Face Trainer reshuffles), grouped by length as HF's
`group_by_length` does: the permutation is cut into mega-batches of up to 50
batches, each sorted longest first, so that a batch's rows have similar lengths
and pad little. The mega-batches are cut into global batches (the grid's
batch_size), the one holding the longest row first (a batch too big for memory
fails at the first step, not hours in), and each global batch is dealt to the
trial's workers by rank, in contiguous shares.

So the order is a function of (seed, epoch) and the rows alone: the sequence of
global batches is the same for any number of workers, and neither Ray Data's
block order nor its timing changes it (TrainRows puts the rows in row order
first, however they arrived).
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lamp.seeding import example_rng

MEGA_BATCHES = 50  # HF's mega-batch multiplier, at most


def global_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list:
    """The epoch's global batches, each an array of row positions, longest rows first."""
    n = len(lengths)
    order = example_rng(seed, f"epoch-{epoch}", "train order").permutation(n)
    # HF's size: 50 batches, fewer where the data holds less than 4 mega-batches' worth.
    mega = max(1, min(n // (batch_size * 4), MEGA_BATCHES)) * batch_size
    batches = []
    for start in range(0, n, mega):
        group = order[start:start + mega]
        group = group[np.argsort(-lengths[group], kind="stable")]
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    if batches:
        longest = int(np.argmax([lengths[b[0]] for b in batches]))
        batches.insert(0, batches.pop(longest))
    return batches


def worker_share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """The rows of a global batch that worker `rank` of `world` reads: contiguous
    shares, as equal as they can be (a last, smaller batch may leave a worker none)."""
    return np.array_split(batch, world)[rank]


def pad(sequences, value: int, left: bool = False):
    """A (batch, longest) tensor: dynamic padding, to the longest in the batch only."""
    import torch

    longest = max(len(s) for s in sequences)
    rows = [[value] * (longest - len(s)) + list(s) if left else list(s) + [value] * (longest - len(s))
            for s in sequences]
    return torch.tensor(rows, dtype=torch.long)


class TrainRows:
    """A cell's train rows, as every worker of its trial holds them: all of them (any
    worker may read any row), in row order, whatever order Ray Data's blocks came in.
    Token ids stay Arrow lists; a batch becomes tensors when it is read."""

    def __init__(self, tables: list):
        table = pa.concat_tables(tables).sort_by("row")
        self.ids = table.column("id").to_pylist()
        self.input_ids = table.column("input_ids").combine_chunks()
        self.labels = table.column("labels").combine_chunks()
        self.lengths = pc.list_value_length(self.input_ids).to_numpy(zero_copy_only=False)
        # Per row, the label tokens the loss is taken over (-100 marks the others).
        scored = np.cumsum(np.concatenate([[0], pc.not_equal(self.labels.values, -100).to_numpy(
            zero_copy_only=False)]))
        offsets = self.labels.offsets.to_numpy()
        self.scored = scored[offsets[1:]] - scored[offsets[:-1]]

    @classmethod
    def read(cls, shard) -> "TrainRows":
        """All rows of a Ray Data iterator (a Train worker's dataset shard)."""
        return cls(list(shard.iter_batches(batch_size=None, batch_format="pyarrow")))

    def __len__(self) -> int:
        return len(self.ids)

    def tensors(self, rows: np.ndarray, pad_id: int) -> dict:
        """The rows as a padded batch (to its own longest row): what the model reads."""
        inputs = self.input_ids.take(rows).to_pylist()
        return {"input_ids": pad(inputs, pad_id), "attention_mask": pad([[1] * len(s) for s in inputs], 0),
                "labels": pad(self.labels.take(rows).to_pylist(), -100)}
