"""iterate_batches and default_loss: length-sorted batches, seeding, rank sharding, the
truncation warning and the loss mask."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.trainer import default_loss, iterate_batches


class Toy:
    """Records are token lists of given lengths (value = record id + 1)."""

    def __init__(self, lengths, offsets=None):
        self.items = [([i + 1] * n, (offsets or [0] * len(lengths))[i]) for i, n in enumerate(lengths)]

    def __getitem__(self, i):
        return self.items[i]

    def __len__(self):
        return len(self.items)


def ids(batch):
    return sorted(int(r[0]) for r in np.array(batch[0]))


def test_batches_are_length_sorted_and_cover_data():
    ds = Toy([7, 1, 5, 3, 2, 8, 4, 6])
    batches = list(iterate_batches(ds, 2, 2048, seed=1))
    seen = [ids(b) for b in batches]
    assert sorted(x for b in seen for x in b) == list(range(1, 9))
    lengths = [7, 1, 5, 3, 2, 8, 4, 6]
    for b in seen:  # neighbours in length share a batch
        ls = sorted(lengths[i - 1] for i in b)
        assert ls[1] - ls[0] == 1
    b = batches[0]
    assert b[0].shape[1] == 33 and b[1].shape == (2, 2)


def test_seed_is_honoured():
    ds = Toy(list(range(1, 21)))
    a = [ids(b) for b in iterate_batches(ds, 2, 2048, seed=3)]
    b = [ids(b) for b in iterate_batches(ds, 2, 2048, seed=3)]
    c = [ids(b) for b in iterate_batches(ds, 2, 2048, seed=4)]
    assert a == b and a != c


class Group:
    def __init__(self, rank, size):
        self._r, self._s = rank, size

    def rank(self):
        return self._r

    def size(self):
        return self._s


def test_ranks_split_each_batch():
    ds = Toy(list(range(1, 17)))
    whole = [ids(b) for b in iterate_batches(ds, 4, 2048, seed=0)]
    r0 = [ids(b) for b in iterate_batches(ds, 4, 2048, seed=0, comm_group=Group(0, 2))]
    r1 = [ids(b) for b in iterate_batches(ds, 4, 2048, seed=0, comm_group=Group(1, 2))]
    assert [sorted(a + b) for a, b in zip(r0, r1)] == whole
    with pytest.raises(ValueError, match="divisible"):
        next(iterate_batches(ds, 3, 2048, comm_group=Group(0, 2)))


def test_too_small_dataset():
    with pytest.raises(ValueError, match="at least batch_size=4"):
        next(iterate_batches(Toy([1, 2]), 4, 2048))


def test_overlong_warning_once_with_counts(capsys):
    ds = Toy([3, 40, 50, 4])
    for _ in range(3):
        batches = list(iterate_batches(ds, 2, 16, seed=0))
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1
    assert "2 of 4 sequences are longer than max_seq_length=16" in err and "longest has 50" in err
    assert max(b[0].shape[1] for b in batches) == 16
    assert max(int(b[1][:, 1].max()) for b in batches) == 16


def test_default_loss_mask_counts_real_targets_only():
    class Uniform:
        def __call__(self, x):
            return mx.zeros((*x.shape, 11))

    batch = mx.array([[1, 2, 3, 4, 0, 0], [5, 6, 7, 0, 0, 0]])
    lengths = mx.array([[0, 4], [2, 3]])
    loss, ntoks = default_loss(Uniform(), batch, lengths)
    # row 0: targets are tokens 1..3 (3 of them), row 1: token 2 only (offset 2, length 3)
    assert int(ntoks) == 4
    assert abs(float(loss) - np.log(11)) < 1e-5


def test_span_masks_from_all_turns():
    ds = Toy([6, 6])
    ds.items[0] = ([1, 2, 3, 4, 5, 6], [(1, 3), (4, 6)])
    ds.items[1] = ([1, 2, 3, 4, 5, 6], 3)
    batch = next(iterate_batches(ds, 2, 2048, seed=0))
    assert len(batch) == 3
    tokens, mask = np.array(batch[0]), np.array(batch[2])
    got = sorted(tuple(int(tokens[r, j + 1]) for j in range(mask.shape[1]) if mask[r, j]) for r in range(2))
    assert got == [(2, 3, 5, 6), (4, 5, 6)]  # spans [1,3)+[4,6) and offset 3
    loss, ntoks = default_loss(lambda x: mx.zeros((*x.shape, 8)), *batch)
    assert int(ntoks) == 7


@pytest.mark.parametrize("multiple", [32, 128])
def test_model_inputs_are_padded_to_a_multiple(monkeypatch, multiple):
    # The model reads width - 1 tokens: that count is the padded one (a row of 1025 tokens
    # is read as 1024, which CUDA's fused attention backward needs), never the full row.
    from mlx_tuner import trainer

    monkeypatch.setattr(trainer, "_input_multiple", lambda: multiple)
    for n, want in [(1, 1 + multiple), (2, 1 + multiple), (multiple + 1, multiple + 1),
                    (multiple + 2, 2 * multiple + 1), (4 * multiple + 1, 4 * multiple + 1)]:
        batch, lengths = next(iterate_batches(Toy([n, n]), 2, 4096))
        assert batch.shape == (2, want), (n, batch.shape)
        assert lengths.tolist() == [[0, n], [0, n]]
    batch, _ = next(iterate_batches(Toy([5000, 5000]), 2, 1000))  # truncated: the cap binds
    assert batch.shape == (2, 1000)
