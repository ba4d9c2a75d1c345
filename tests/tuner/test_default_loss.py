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


def _recording(monkeypatch):
    """Records the grad_in_forward of every fused call, then runs the real op."""
    seen, real = [], ce_mod.linear_cross_entropy

    def rec(*a, **k):
        seen.append(k.get("grad_in_forward", False))
        return real(*a, **k)

    monkeypatch.setattr(ce_mod, "linear_cross_entropy", rec)
    return seen


@pytest.mark.parametrize("frozen_head", [True, False], ids=["lora", "full"])
def test_grad_in_forward_same_values_and_only_for_a_frozen_head(frozen_head, monkeypatch):
    model = tiny.build_model(tiny.model_config(300, hidden_size=64), seed=1)
    if frozen_head:
        model.freeze()
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 4.0, "dropout": 0.0})
    batch = mx.random.randint(0, 300, (3, 12))
    lengths = mx.array([[0, 12], [2, 9], [1, 5]])
    seen = _recording(monkeypatch)
    hinted = lambda m, b, l: default_loss(m, b, l, grad_in_forward=True)  # noqa: E731
    (v, n), g = nn.value_and_grad(model, hinted)(model, batch, lengths)
    # A trained head needs the recomputed logits for its own gradient: no hint then.
    assert seen == [frozen_head]
    (rv, rn), rg = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    assert seen == [frozen_head, False]
    assert n.item() == rn.item() and abs(v.item() - rv.item()) < 1e-6 * max(1.0, abs(rv.item()))
    for (k, a), (_, r) in zip(tree_flatten(g), tree_flatten(rg)):
        np.testing.assert_allclose(np.array(a), np.array(r), atol=1e-6, rtol=1e-5, err_msg=k)


def test_train_hints_its_gradient_step_not_evaluation(tmp_path, monkeypatch):
    from mlx_tuner.trainer import TrainingArgs, evaluate, train

    class Rows:  # (tokens, offset) records of one length
        def __init__(self, n):
            self.rows = [(list(np.random.randint(1, 100, 9)), 0) for _ in range(n)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    import mlx.optimizers as optim

    model = tiny.build_model(tiny.model_config(100, hidden_size=32), seed=0)
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 2, "scale": 4.0, "dropout": 0.0})
    seen = _recording(monkeypatch)
    args = TrainingArgs(batch_size=2, iters=2, steps_per_report=1, steps_per_eval=100, val_batches=1,
                        steps_per_save=100, adapter_file=str(tmp_path / "a.safetensors"), progress=False)
    train(model, optim.SGD(learning_rate=0.1), Rows(4), Rows(2), args)
    assert True in seen and False in seen  # the compiled step (traced once) and evaluate
    seen.clear()
    evaluate(model, Rows(2), batch_size=2, num_batches=1)
    assert seen == [False]


def test_switch_off_by_environment_with_the_hint(monkeypatch):
    model = tiny.build_model(tiny.model_config(100, hidden_size=32), seed=0)
    monkeypatch.setenv("MLX_TUNER_FUSED_CE", "0")
    monkeypatch.setattr(ce_mod, "linear_cross_entropy", lambda *a, **k: pytest.fail("fused loss used"))
    batch = mx.random.randint(0, 100, (2, 6))
    (v, n), _ = nn.value_and_grad(model, lambda m, b, l: default_loss(m, b, l, grad_in_forward=True))(
        model, batch, mx.array([[0, 6], [0, 4]]))
    assert n.item() == 5 + 3 and np.isfinite(v.item())
