"""The training order by construction (grid/order.py): a function of (seed, epoch)
and the rows alone, the same global batches for any number of workers, whatever
order Ray Data delivers the rows in."""

import numpy as np
import pyarrow as pa
import pytest

from grid.order import TrainRows, global_batches, worker_share


def lengths_of(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(5, 200, size=n)


def test_an_epoch_reads_every_row_once_in_batches_of_similar_length_longest_first():
    lengths = lengths_of(1000)
    batches = global_batches(lengths, 16, seed=0, epoch=0)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    assert [len(b) for b in batches] == [16] * 62 + [8]  # 8: the last mega-batch's rest, wherever it lands
    assert lengths[batches[0]].max() == lengths.max()  # the batch that needs the most memory comes first
    assert all((np.diff(lengths[b]) <= 0).all() for b in batches)
    # Grouped by length: far less padding than batches of the permutation as it is.
    def padding(cut):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in cut)
    shuffled = np.random.default_rng(1).permutation(1000)
    assert padding(batches) < padding([shuffled[i:i + 16] for i in range(0, 1000, 16)]) / 4


def test_the_order_is_a_function_of_seed_and_epoch():
    lengths = lengths_of(300)
    first = [b.tolist() for b in global_batches(lengths, 6, seed=0, epoch=0)]
    assert first == [b.tolist() for b in global_batches(lengths, 6, seed=0, epoch=0)]
    assert first != [b.tolist() for b in global_batches(lengths, 6, seed=0, epoch=1)]  # reshuffled every epoch
    assert first != [b.tolist() for b in global_batches(lengths, 6, seed=1, epoch=0)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_workers_split_each_global_batch_in_rank_order(world):
    for batch in global_batches(lengths_of(100), 6, seed=0, epoch=0):  # the last batch holds 4 rows
        shares = [worker_share(batch, rank, world) for rank in range(world)]
        assert np.concatenate(shares).tolist() == batch.tolist()
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_last_batch_smaller_than_the_workers_leaves_a_worker_none():
    batch = np.array([7, 3])
    assert [worker_share(batch, rank, 3).tolist() for rank in range(3)] == [[7], [3], []]


def rows_table(n: int, decoder_only: bool = False) -> pa.Table:
    inputs = [list(range(1, 2 + i % 7)) for i in range(n)]
    labels = [[-100] * len(x) + [5, 1] if decoder_only else [5] * (1 + i % 3) + [1] for i, x in enumerate(inputs)]
    return pa.table({"row": list(range(n)), "id": [f"q{i}" for i in range(n)], "input_ids": inputs,
                     "labels": labels})


def test_train_rows_are_in_row_order_whatever_order_the_blocks_came_in():
    table = rows_table(20)
    blocks = [table.slice(i, 5) for i in range(0, 20, 5)]
    in_order, reversed_blocks = TrainRows(blocks), TrainRows(blocks[::-1])
    assert in_order.ids == reversed_blocks.ids == [f"q{i}" for i in range(20)]
    assert in_order.lengths.tolist() == [1 + i % 7 for i in range(20)]
    assert in_order.scored.tolist() == [2 + i % 3 for i in range(20)]  # label tokens, </s> included


def test_a_decoder_only_models_prompt_is_not_scored_and_batches_pad_to_their_longest():
    rows = TrainRows([rows_table(6, decoder_only=True)])
    assert rows.scored.tolist() == [2] * 6
    batch = rows.tensors(np.array([5, 0]), pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6], [1, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 0, 0, 0, 0, 0]]
    assert batch["labels"][1].tolist() == [-100, 5, 1, -100, -100, -100, -100, -100]


def test_ray_data_block_order_does_not_change_the_rows(ray_local):
    import ray.data

    table = rows_table(40)
    blocks = [table.slice(i, 8) for i in range(0, 40, 8)]
    orders = []
    for arrangement in (blocks, blocks[::-1], blocks[2:] + blocks[:2]):
        rows = TrainRows.read(ray.data.from_arrow(arrangement).iterator())
        orders.append([rows.ids[i] for b in global_batches(rows.lengths, 6, seed=3, epoch=2) for i in b])
    assert orders[0] == orders[1] == orders[2]
