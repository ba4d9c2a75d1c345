"""mlx_tuner.lora against mlx_lm.tuner.lora: same outputs, gradients, fuse and API."""

from __future__ import annotations

import inspect
import io

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from layer_checks import (QUANT, adapter_pair, as_f32, assert_same, copy_adapter, make_base, randomize_adapter,
                          value_and_grads)
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear
from mlx_lm.tuner import lora as mlx_lora

from tests.conftest import DTYPES
from mlx_tuner import lora, ops

BASES = [None] + QUANT
BASE_IDS = ["dense"] + [f"{m}{b}g{g}" for m, g, b in QUANT]


def pair(cls_name, base, r=4, **kw):
    return adapter_pair(lora, mlx_lora, cls_name, base, r=r, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", BASES, ids=BASE_IDS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5), (7,), (1,)])
def test_lora_linear_matches_mlx_lm(device, dtype, quant, bias, shape):
    in_dims, out_dims = 128, 40
    base = make_base("linear", in_dims, out_dims, bias, quant, dtype)
    ours, theirs = pair("LoRALinear", base)
    x = mx.random.normal((*shape, in_dims)).astype(dtype)
    o_out, o_grads = value_and_grads(ours, x)
    t_out, t_grads = value_and_grads(theirs, x)
    oracle = copy_adapter(theirs, mlx_lora.LoRALinear.from_base(as_f32(base), r=4))
    r_out, r_grads = value_and_grads(oracle, x.astype(mx.float32))
    assert_same(o_out, t_out, r_out, dtype, "output")
    assert o_out.dtype == t_out.dtype
    for k in t_grads:
        assert_same(o_grads[k], t_grads[k], r_grads[k], dtype, f"grad {k}")


def test_fresh_layer_equals_base():
    base = make_base("linear", 64, 32, True)
    layer = lora.LoRALinear.from_base(base, r=8, dropout=0.1, scale=10.0)
    assert layer.linear is base and layer.scale == 10.0
    assert layer.lora_a.shape == (64, 8) and layer.lora_b.shape == (8, 32)
    assert not mx.any(layer.lora_b).item()
    assert abs(layer.lora_a).max().item() <= 1 / np.sqrt(64)
    x = mx.random.normal((4, 64))
    layer.eval()
    assert mx.allclose(layer(x), base(x), atol=1e-6).item()
    q = lora.LoRALinear.from_base(make_base("linear", 96, 32, False, ("affine", 32, 3)))
    assert q.lora_a.shape == (96, 8)


def test_layers_call_the_ops(monkeypatch):
    """Dense bases go through ops.lora_linear, quantized ones through ops.qlora_linear;
    x_dropped is None unless dropout is active."""
    calls = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append((name, k.get("x_dropped") is not None))
            return fn(*a, **k)
        monkeypatch.setattr(ops, name, wrapped)

    spy("lora_linear", ops.lora_linear)
    spy("qlora_linear", ops.qlora_linear)
    x = mx.random.normal((2, 64))
    dense = lora.LoRALinear.from_base(make_base("linear", 64, 32, True), dropout=0.5)
    dense(x)
    dense.eval()
    dense(x)
    quant = lora.LoRALinear.from_base(make_base("linear", 64, 32, False, QUANT[0]))
    quant(x)
    emb = lora.LoRAEmbedding.from_base(make_base("embedding", 50, 64, False))
    emb.as_linear(x)
    assert calls == [("lora_linear", True), ("lora_linear", False), ("qlora_linear", False),
                     ("lora_linear", False)]


def test_dropout_matches_mlx_lm():
    base = make_base("linear", 64, 32, True)
    ours, theirs = pair("LoRALinear", base, dropout=0.3)
    x = mx.random.normal((5, 64))
    mx.random.seed(3)
    t = theirs(x)
    mx.random.seed(3)
    o = ours(x)
    assert np.allclose(np.array(o), np.array(t), atol=1e-5)
    mx.random.seed(4)
    assert not np.allclose(np.array(ours(x)), np.array(t), atol=1e-5)  # dropout is live


@pytest.mark.parametrize("quant", BASES, ids=BASE_IDS)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_fuse(quant, bias):
    base = make_base("linear", 128, 48, bias, quant)
    ours, theirs = pair("LoRALinear", base, scale=2.0)
    x = mx.random.normal((6, 128))
    fused, ref = ours.fuse(), theirs.fuse()
    assert type(fused) is type(ref)
    assert ("bias" in fused) == bias
    if quant is None:
        assert isinstance(fused, nn.Linear)
        assert mx.allclose(fused(x), ours(x), atol=1e-4).item()
    else:
        assert isinstance(fused, nn.QuantizedLinear)
        assert (fused.mode, fused.group_size, fused.bits) == tuple(quant)
        assert mx.allclose(fused(x), ref(x), atol=1e-4).item()
    dq = ours.fuse(dequantize=True)
    assert isinstance(dq, nn.Linear)
    assert mx.allclose(dq(x), theirs.fuse(dequantize=True)(x), atol=1e-5).item()
    # mxfp4 dequantizes to bfloat16, so its fused dense weight is rounded to bfloat16.
    tol = 1e-4 if dq.weight.dtype == mx.float32 else 3e-2
    assert mx.allclose(dq(x), ours(x), atol=tol).item()


def switch_base(quant, bias, in_dims=64, out_dims=40, experts=4):
    base = SwitchLinear(in_dims, out_dims, experts, bias=bias)
    if bias:
        base.bias = mx.random.normal(base.bias.shape)
    if quant is not None:
        mode, gs, bits = quant
        base = base.to_quantized(group_size=gs, bits=bits, mode=mode)
    return base


@pytest.mark.parametrize("quant", [None, QUANT[0]], ids=["dense", "q4"])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_switch_linear(quant, bias):
    base = switch_base(quant, bias)
    ours, theirs = pair("LoRASwitchLinear", base)
    x = mx.random.normal((3, 5, 1, 1, 64))
    idx = mx.random.randint(0, 4, (3, 5, 2))
    call = lambda m, x: m(x, idx)  # noqa: E731
    o, og = value_and_grads(ours, x, call)
    t, tg = value_and_grads(theirs, x, call)
    if ops._extension.kernel_for("lora_switch", mx.default_device()) is not None:
        dot = io.StringIO()  # dense or quantized base: the fused primitive, no gather_(q)mm
        mx.export_to_dot(dot, call(ours, x))
        assert "LoRASwitchLinear" in dot.getvalue() and "Gather" not in dot.getvalue()
    # The fused op sums in another order than gather_mm: float32 rounding, scaled.
    assert_same(o, t, None, mx.float32, "output")
    for k in tg:
        assert_same(og[k], tg[k], None, mx.float32, k)
    fused, ref = ours.fuse(), theirs.fuse()
    assert type(fused) is type(ref)
    assert isinstance(fused, QuantizedSwitchLinear if quant else SwitchLinear)
    assert mx.allclose(fused(x, idx), ref(x, idx), atol=1e-4).item()
    assert mx.allclose(ours.fuse(dequantize=True)(x, idx), o, atol=1e-4).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", [None, QUANT[0], QUANT[1]], ids=["dense", "q4", "q8"])
def test_lora_embedding(device, dtype, quant):
    base = make_base("embedding", 70, 64, False, quant, dtype)
    ours, theirs = pair("LoRAEmbedding", base)
    ids = mx.random.randint(0, 70, (3, 9))
    o, og = value_and_grads(ours, ids)
    t, tg = value_and_grads(theirs, ids)
    oracle = copy_adapter(theirs, mlx_lora.LoRAEmbedding.from_base(as_f32(base), r=4))
    r, rg = value_and_grads(oracle, ids)
    assert_same(o, t, r, dtype, "embedding output")
    for k in tg:
        assert_same(og[k], tg[k], rg[k], dtype, f"embedding grad {k}")
    x = mx.random.normal((4, 64)).astype(dtype)
    lin = lambda m, x: m.as_linear(x)  # noqa: E731
    o, og = value_and_grads(ours, x, lin)
    t, tg = value_and_grads(theirs, x, lin)
    r, rg = value_and_grads(oracle, x.astype(mx.float32), lin)
    assert_same(o, t, r, dtype, "as_linear output")
    for k in tg:
        assert_same(og[k], tg[k], rg[k], dtype, f"as_linear grad {k}")


@pytest.mark.parametrize("quant", [None, QUANT[0]], ids=["dense", "q4"])
def test_lora_embedding_fuse(quant):
    base = make_base("embedding", 70, 64, False, quant)
    ours, theirs = pair("LoRAEmbedding", base, scale=3.0)
    ids = mx.random.randint(0, 70, (2, 6))
    fused, ref = ours.fuse(), theirs.fuse()
    assert type(fused) is type(ref)
    assert mx.allclose(fused(ids), ref(ids), atol=1e-5).item()
    assert mx.allclose(ours.fuse(dequantize=True)(ids), ours(ids), atol=1e-4).item()


@pytest.mark.parametrize("name", ["LoRALinear", "LoRASwitchLinear", "LoRAEmbedding"])
def test_same_api_as_mlx_lm(name):
    ours, theirs = getattr(lora, name), getattr(mlx_lora, name)
    for method in ("__init__", "from_base", "fuse", "__call__", "as_linear"):
        if hasattr(theirs, method):
            a = inspect.signature(getattr(ours, method)).parameters
            b = inspect.signature(getattr(theirs, method)).parameters
            assert [(p.name, p.default) for p in a.values()] == \
                   [(p.name, p.default) for p in b.values()], f"{name}.{method}"


def test_under_compile_and_value_and_grad():
    base = make_base("linear", 64, 32, True, QUANT[0])
    layer = randomize_adapter(lora.LoRALinear.from_base(base))
    layer.freeze(keys=["linear"], strict=False)
    layer.linear.freeze()
    x = mx.random.normal((3, 64))
    vg = nn.value_and_grad(layer, lambda x: (layer(x) ** 2).sum())
    v, g = vg(x)
    vc, gc = mx.compile(vg, inputs=layer.state, outputs=layer.state)(x)
    assert sorted(k for k, _ in nn.utils.tree_flatten(g)) == ["lora_a", "lora_b"]
    assert mx.allclose(v, vc, rtol=1e-5).item()
    assert mx.allclose(g["lora_b"], gc["lora_b"], rtol=1e-4, atol=1e-5).item()


def test_subclassed_base_keeps_its_own_forward(monkeypatch):
    """A subclass that overrides the forward is called as such (not bypassed by the op);
    one that does not is still fused."""
    class Shifted(nn.Linear):
        def __call__(self, x):
            return super().__call__(x) + 1.0

    class Tagged(nn.Linear):
        pass

    used = []
    real = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: used.append(1) or real(*a, **k))
    x = mx.random.normal((3, 16))
    for cls, fused in ((Shifted, False), (Tagged, True)):
        used.clear()
        base = cls(16, 8)
        layer = randomize_adapter(lora.LoRALinear.from_base(base))
        ref = randomize_adapter(mlx_lora.LoRALinear.from_base(base))
        copy_adapter(ref, layer)
        assert mx.allclose(layer(x), ref(x), atol=1e-5).item()
        assert bool(used) == fused
