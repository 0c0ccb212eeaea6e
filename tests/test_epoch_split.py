"""Exact epochs: a permuted epoch cut into equal reader shares, at the 72B recipes' shape."""

from __future__ import annotations

import numpy as np
import pytest

from tvc_lightning.data.epochs import EpochSplit

# TVC's 345,088 samples in 1,000-sample shards, the last one shorter; 32 ranks x 8 workers.
SIZES_72B = [1000] * 345 + [88]
RANKS, WORKERS = 32, 8


def _shares(split: EpochSplit) -> list[np.ndarray]:
    return [split.sample_ids(r) for r in range(split.readers)]


def _check_epoch(split: EpochSplit) -> np.ndarray:
    """Asserts the epoch's invariants; returns its sample ids in reader order."""
    shares = _shares(split)
    ids = np.concatenate(shares)
    assert len(ids) == split.kept == split.total - split.dropped
    assert len(np.unique(ids)) == split.kept  # every kept sample exactly once
    assert ids.min() >= 0 and ids.max() < split.total
    per_rank = [sum(len(s) for s in shares[r * WORKERS:(r + 1) * WORKERS]) for r in range(RANKS)]
    assert set(per_rank) == {WORKERS * split.per_reader}  # equal steps on every rank
    for r in range(split.readers):  # whole shards plus at most two partial ones
        assert sum(keep is not None for _, keep in split.share(r)) <= 2
    return ids


def test_72b_shape_each_sample_once_per_epoch_in_a_new_order():
    orders = []
    for epoch in (0, 1):
        split = EpochSplit(SIZES_72B, RANKS * WORKERS, seed=0, epoch=epoch)
        assert (split.total, split.per_reader, split.dropped) == (345_088, 1348, 0)
        orders.append(_check_epoch(split))
    assert len(np.unique(orders[0])) == 345_088  # 100% of the data, each epoch
    assert not np.array_equal(orders[0], orders[1])
    # Reader 0 holds other samples in epoch 1, not the same ones reordered.
    assert len(np.intersect1d(orders[0][:1348], orders[1][:1348])) < 1348 // 2
    assert np.array_equal(_check_epoch(EpochSplit(SIZES_72B, 256, seed=0, epoch=1)), orders[1])


@pytest.mark.parametrize("multiple", [1, 4])
def test_72b_shape_with_a_damaged_shard_drops_a_stated_remainder(multiple):
    sizes = list(SIZES_72B)
    sizes[7] = 995  # a truncated shard: 5 samples fewer
    dropped = []
    for epoch in (0, 1):
        split = EpochSplit(sizes, RANKS * WORKERS, seed=5, epoch=epoch, multiple=multiple)
        assert split.per_reader == (1347 if multiple == 1 else 1344)
        assert split.dropped == 345_083 - 256 * split.per_reader
        dropped.append(np.setdiff1d(np.arange(split.total), _check_epoch(split)))
        assert len(dropped[-1]) == split.dropped
    assert not np.array_equal(dropped[0], dropped[1])  # a different remainder each epoch


def test_small_splits_and_limits():
    split = EpochSplit([3, 0, 5], readers=2, shuffle=False)  # an empty shard is passed over
    assert [s.tolist() for s in _shares(split)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [(shard, None if keep is None else keep.tolist()) for shard, keep in split.share(1)] == [
        (2, [1, 2, 3, 4])]
    many = EpochSplit([4, 4], readers=4, seed=1)  # more readers than shards: shards are shared
    assert sorted(np.concatenate(_shares(many)).tolist()) == list(range(8))
    with pytest.raises(ValueError, match="cannot give each of 4 readers"):
        EpochSplit([2, 1], readers=4)
    with pytest.raises(ValueError, match="out of range"):
        many.share(4)
