"""mlx_tuner.losses: called exactly like mlx_lm.tuner.losses, same values; the extras."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.tuner import losses as lm_losses

from tests.conftest import DTYPES, assert_close_to_oracle
from mlx_tuner import losses, ops

NAMES = ["kl_div_loss", "js_div_loss"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_values_as_mlx_lm(device, name, dtype):
    q = (2 * mx.random.normal((3, 5, 301))).astype(dtype)
    p = (2 * mx.random.normal((3, 5, 301))).astype(dtype)
    ours = getattr(losses, name)(q, p)  # positional, like mlx-lm
    theirs = getattr(lm_losses, name)(q, p)
    assert ours.shape == theirs.shape == (3, 5)
    assert ours.dtype == dtype
    ref32 = getattr(lm_losses, name)(q.astype(mx.float32), p.astype(mx.float32))
    assert_close_to_oracle(ours, theirs, np.array(ref32), dtype)


@pytest.mark.parametrize("name", NAMES)
def test_student_gradient_matches_mlx_lm_and_teacher_gets_one(device, name):
    q = mx.random.normal((4, 129))
    p = mx.random.normal((4, 129))
    ours = mx.grad(lambda a, b: getattr(losses, name)(a, b).sum(), argnums=(0, 1))(q, p)
    theirs = mx.grad(lambda a, b: getattr(lm_losses, name)(a, b).sum())(q, p)
    np.testing.assert_allclose(np.array(ours[0]), np.array(theirs), atol=2e-6)
    assert float(mx.abs(ours[1]).max()) > 1e-4  # the true teacher gradient, not zeros


@pytest.mark.parametrize("name", NAMES)
def test_reductions_mask_temperature(device, name):
    fn = getattr(losses, name)
    op = ops.kl_div if name == "kl_div_loss" else ops.js_div
    q = mx.random.normal((2, 6, 50))
    p = mx.random.normal((2, 6, 50))
    mask = mx.random.uniform(shape=(2, 6)) < 0.6
    per_row = np.array(op(q / 2.0, p / 2.0)) * 4.0
    m = np.array(mask)
    np.testing.assert_allclose(np.array(fn(q, p, temperature=2.0)), per_row, rtol=1e-5)
    np.testing.assert_allclose(np.array(fn(q, p, temperature=2.0, mask=mask)),
                               np.where(m, per_row, 0), rtol=1e-5)
    np.testing.assert_allclose(float(fn(q, p, temperature=2.0, mask=mask, reduction="sum")),
                               per_row[m].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(fn(q, p, temperature=2.0, mask=mask, reduction="mean")),
                               per_row[m].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(fn(q, p, reduction="mean")), np.array(op(q, p)).mean(),
                               rtol=1e-5)
    w = mask.astype(mx.float32) * 0.5
    np.testing.assert_allclose(np.array(fn(q, p, mask=w)), np.array(op(q, p)) * np.array(w),
                               rtol=1e-5)


def test_masked_padding_rows_do_not_poison_the_loss(device):
    q = mx.random.normal((3, 40))
    p = mx.random.normal((3, 40))
    q = mx.concatenate([q[:2], mx.full((1, 40), -mx.inf)])  # a padding row: all -inf
    mask = mx.array([True, True, False])
    loss, g = mx.value_and_grad(lambda a: losses.kl_div_loss(a, p, mask=mask, reduction="mean"))(q)
    assert np.isfinite(float(loss))
    assert np.all(np.isfinite(np.array(g)))


@pytest.mark.parametrize("name", NAMES)
def test_errors(name):
    fn = getattr(losses, name)
    q = mx.zeros((2, 5))
    with pytest.raises(ValueError, match=rf"^\[{name}\] reduction must be one of"):
        fn(q, q, reduction="avg")
    with pytest.raises(ValueError, match=rf"^\[{name}\] temperature must be a positive float "
                                         r"but got 0"):
        fn(q, q, temperature=0)
    with pytest.raises(ValueError, match=rf"^\[{name}\] mask must be an mx.array of shape "
                                         r"\(2,\) but got \(3,\)"):
        fn(q, q, mask=mx.ones((3,)))
