"""The trainer's default loss: the fused cross-entropy (no logits) gives the same loss and
gradients as the materialized path, and the switch turns it off."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tuner import tiny
from mlx_tuner.ops import cross_entropy as ce_mod
from mlx_tuner.trainer import default_loss
from mlx_tuner.utils import linear_to_lora_layers


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "4bit"])
def test_fused_default_loss_equals_materialized(quantize, monkeypatch):
    model = tiny.build_model(tiny.model_config(300, hidden_size=64), seed=1)
    if quantize:
        nn.quantize(model, group_size=32, bits=4)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 4.0, "dropout": 0.0})
    assert ce_mod.model_head(model) is not None  # the tied embedding is a known head
    batch = mx.random.randint(0, 300, (3, 12))
    lengths = mx.array([[0, 12], [2, 9], [1, 5]])

    calls = []
    real = ce_mod.linear_cross_entropy
    monkeypatch.setattr(ce_mod, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    (v, n), g = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    assert calls, "the fused loss was not used"
    (rv, rn), rg = nn.value_and_grad(model, lambda m, b, l: default_loss(m, b, l, fused=False))(
        model, batch, lengths)
    assert n.item() == rn.item()
    assert abs(v.item() - rv.item()) < 1e-4 * max(1.0, abs(rv.item()))
    for (k, a), (_, r) in zip(tree_flatten(g), tree_flatten(rg)):
        np.testing.assert_allclose(np.array(a), np.array(r), atol=3e-5, rtol=1e-3, err_msg=k)


def test_switch_off_by_environment(monkeypatch):
    model = tiny.build_model(tiny.model_config(100, hidden_size=32), seed=0)
    monkeypatch.setenv("MLX_TUNER_FUSED_CE", "0")
    monkeypatch.setattr(ce_mod, "linear_cross_entropy", lambda *a, **k: pytest.fail("fused loss used"))
    batch = mx.random.randint(0, 100, (2, 6))
    v, n = default_loss(model, batch, mx.array([[0, 6], [0, 4]]))
    assert n.item() == 5 + 3 and np.isfinite(v.item())
