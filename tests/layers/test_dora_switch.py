"""DoRASwitchLinear (mlx-tuner's own: mlx-lm has no DoRA for MoE switch layers) against
the adapted experts written out in full: outputs, gradients (m included), fuse, a fresh
layer, mx.compile, quantized bases, and that no experts x out x in array is made."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from mlx_tuner.dora import DoRASwitchLinear

E, IN, OUT, R, S = 4, 64, 48, 4, 2.0


def make(bias=False, quant=None, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    base = SwitchLinear(IN, OUT, E, bias=bias)
    base.weight = (base.weight * 4).astype(dtype)
    if bias:
        base.bias = (mx.random.normal(base.bias.shape) * 0.1).astype(dtype)
    if quant is not None:
        base = base.to_quantized(group_size=quant[0], bits=quant[1])
    layer = DoRASwitchLinear.from_base(base, r=R, scale=S)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.1
    layer.m = layer.m * mx.random.uniform(0.5, 1.5, layer.m.shape)
    # SwitchGLU's layout: x (B, L, 1, 1, in), indices (B, L, k)
    x = mx.random.normal((2, 5, 1, 1, IN)).astype(dtype)
    idx = mx.random.randint(0, E, (2, 5, 2))
    return layer, x, idx


def reference(layer, x, idx, lora_a, lora_b, m):
    """The adapted experts in full: (m / ||W + s B A||) (W + s B A), norms constant."""
    base = layer.linear
    if isinstance(base, QuantizedSwitchLinear):
        w = mx.dequantize(base.weight, base.scales, base.biases, group_size=base.group_size,
                          bits=base.bits)
    else:
        w = base.weight
    w = w.astype(mx.float32)
    adapted = w + S * (lora_b @ lora_a)
    n = mx.stop_gradient(mx.linalg.norm(adapted, axis=-1))
    y = mx.gather_mm(x.astype(mx.float32), adapted.swapaxes(-1, -2), rhs_indices=idx)
    y = mx.expand_dims((m / n)[idx], -2) * y
    if "bias" in base:
        y = y + mx.expand_dims(base.bias[idx], -2).astype(mx.float32)
    return y


QUANTS = [None, (64, 4), (32, 8)]
QID = lambda q: "dense" if q is None else f"q{q[1]}g{q[0]}"  # noqa: E731


@pytest.mark.parametrize("quant", QUANTS, ids=QID)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_the_full_adapted_experts(quant, bias):
    layer, x, idx = make(bias, quant)

    def ours(x, a, b, m):
        layer.lora_a, layer.lora_b, layer.m = a, b, m
        return layer(x, idx)

    def ref(x, a, b, m):
        return reference(layer, x, idx, a, b, m)

    args = [x, layer.lora_a, layer.lora_b, layer.m]
    dy = mx.random.normal(ours(*args).shape)
    y1, g1 = mx.vjp(ours, args, [dy])
    y0, g0 = mx.vjp(ref, args, [dy])
    scale = float(mx.abs(y0[0]).max())
    assert float(mx.abs(y1[0] - y0[0]).max()) <= 1e-4 * scale
    for name, a, b in zip(["x", "lora_a", "lora_b", "m"], g1, g0):
        err = float(mx.abs(a - b).max())
        assert err <= 1e-4 * max(1.0, float(mx.abs(b).max())), f"d{name}: {err}"


def test_bfloat16_activations():
    layer, x, idx = make(bias=True, dtype=mx.bfloat16)
    y = layer(x, idx)
    assert y.dtype == mx.bfloat16
    y0 = reference(layer, x, idx, layer.lora_a, layer.lora_b, layer.m)
    assert float(mx.abs(y.astype(mx.float32) - y0).max()) <= 2e-2 * float(mx.abs(y0).max())


@pytest.mark.parametrize("quant", QUANTS, ids=QID)
def test_fresh_layer_equals_its_base(quant):
    mx.random.seed(3)
    base = SwitchLinear(IN, OUT, E, bias=True)
    if quant is not None:
        base = base.to_quantized(group_size=quant[0], bits=quant[1])
    layer = DoRASwitchLinear.from_base(base, r=R, scale=S)
    x = mx.random.normal((3, 1, 1, IN))
    idx = mx.random.randint(0, E, (3, 2))
    assert mx.allclose(layer(x, idx), base(x, idx), atol=1e-5)


@pytest.mark.parametrize("quant", QUANTS, ids=QID)
def test_fuse(quant):
    layer, x, idx = make(bias=True, quant=quant)
    y = layer(x, idx)
    dense = layer.fuse(dequantize=True)
    assert type(dense) is SwitchLinear
    assert mx.allclose(dense(x, idx), y, atol=1e-4)
    fused = layer.fuse()
    assert type(fused) is (SwitchLinear if quant is None else QuantizedSwitchLinear)
    if quant is not None:  # re-quantized: its rounding, not ours
        assert fused.bits == quant[1] and fused.group_size == quant[0]
        assert float(mx.abs(fused(x, idx) - y).max()) <= 0.1 * float(mx.abs(y).max())


def test_sorted_indices_path():
    layer, x, idx = make()
    flat = idx.reshape(-1)
    order = mx.argsort(flat)
    xs = mx.broadcast_to(x, (*idx.shape, 1, IN)).reshape(-1, 1, IN)[order]
    ys = layer(xs, flat[order], sorted_indices=True)
    want = layer(x, idx).reshape(-1, 1, OUT)[order]
    assert mx.allclose(ys, want, atol=1e-5)


def test_compiled_training_step():
    layer, x, idx = make(bias=True)
    target = mx.random.normal(layer(x, idx).shape)
    layer.freeze()
    layer.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)

    def loss(params):
        layer.update(params)
        return ((layer(x, idx) - target) ** 2).mean()

    params = layer.trainable_parameters()
    step = mx.compile(mx.value_and_grad(loss))
    v_c, g_c = step(params)
    v_e, g_e = mx.value_and_grad(loss)(params)
    assert mx.allclose(v_c, v_e, atol=1e-6)
    for k in ("lora_a", "lora_b", "m"):
        assert mx.allclose(g_c[k], g_e[k], atol=1e-5), k
    assert sorted(k for k, _ in tree_flatten(g_e)) == ["lora_a", "lora_b", "m"]


def test_no_experts_by_out_by_in_array():
    """The norms come from the low-rank identity: a call's extra memory stays far below
    one float32 copy of the adapted experts (which the full form above builds)."""
    mx.random.seed(5)
    e, din, dout = 16, 512, 256
    base = SwitchLinear(din, dout, e)
    layer = DoRASwitchLinear.from_base(base, r=R, scale=S)
    x = mx.random.normal((4, 1, 1, din))
    idx = mx.random.randint(0, e, (4, 2))
    mx.eval(layer.parameters(), x, idx, layer(x, idx))  # the ||W||^2 cache filled
    full = e * dout * din * 4
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    mx.eval(layer(x, idx))
    assert mx.get_peak_memory() - start < full / 4


def test_set_linear_checks_its_argument():
    layer, _, _ = make()
    with pytest.raises(TypeError, match="linear must be a SwitchLinear"):
        layer.set_linear(np.zeros(3))
    # Experts with a global scale (nvfp4): the fused op and the norms would drop it.
    nv = QuantizedSwitchLinear(IN, OUT, E, bias=False, group_size=16, bits=4, mode="nvfp4",
                               global_scale=True)
    with pytest.raises(ValueError, match="global scale"):
        DoRASwitchLinear.from_base(nv, r=R)
