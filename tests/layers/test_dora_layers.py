"""mlx_tuner.dora against mlx_lm.tuner.dora: same outputs, gradients (m included), fuse
and API; plus what mlx-lm lacks (quantized embeddings, 3/6-bit quantized bases)."""

from __future__ import annotations

import inspect

import mlx.core as mx
import mlx.nn as nn
import pytest
from layer_checks import (QUANT, adapter_pair, as_f32, assert_same, copy_adapter, make_base, randomize_adapter,
                          value_and_grads)
from mlx_lm.tuner import dora as mlx_dora

from tests.conftest import DTYPES
from mlx_tuner import dora, ops

# mlx-lm's DoRALinear.from_base computes in_dims * (32 // bits): wrong for 3-bit bases.
MLX_OK_QUANT = [q for q in QUANT if 32 % q[2] == 0]
QUANT_ID = lambda q: "dense" if q is None else f"{q[0]}{q[2]}"  # noqa: E731


def pair(cls_name, base, r=4, **kw):
    return adapter_pair(dora, mlx_dora, cls_name, base, r=r, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant", [None] + MLX_OK_QUANT, ids=QUANT_ID)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(3, 5), (1,)])
def test_dora_linear_matches_mlx_lm(device, dtype, quant, bias, shape):
    base = make_base("linear", 128, 40, bias, quant, dtype)
    ours, theirs = pair("DoRALinear", base)
    assert ours.m.dtype == theirs.m.dtype == mx.float32
    x = mx.random.normal((*shape, 128)).astype(dtype)
    o, og = value_and_grads(ours, x)
    t, tg = value_and_grads(theirs, x)
    oracle = copy_adapter(theirs, mlx_dora.DoRALinear.from_base(as_f32(base), r=4))
    r, rg = value_and_grads(oracle, x.astype(mx.float32))
    assert_same(o, t, r, dtype, "output")
    assert set(og) == {"lora_a", "lora_b", "m", "x"}
    for k in tg:
        assert_same(og[k], tg[k], rg[k], dtype, f"grad {k}")


def test_three_bit_base_beyond_mlx_lm():
    base = make_base("linear", 96, 40, True, ("affine", 32, 3))
    layer = randomize_adapter(dora.DoRALinear.from_base(base, r=4))
    assert layer.lora_a.shape == (96, 4)
    x = mx.random.normal((5, 96))
    w = mx.dequantize(base.weight, base.scales, base.biases, group_size=32, bits=3)
    ref = ops.dora_linear_reference(x, w, layer.lora_a, layer.lora_b, layer.m, layer.scale,
                                    base.bias)
    assert mx.allclose(layer(x), ref, atol=1e-5).item()


def test_fresh_layer_equals_base():
    base = make_base("linear", 64, 32, True)
    layer = dora.DoRALinear.from_base(base, r=8, dropout=0.1, scale=5.0)
    layer.eval()
    assert layer.linear is base and layer.scale == 5.0 and layer.m.shape == (32,)
    assert mx.allclose(layer.m, mx.linalg.norm(base.weight, axis=1)).item()
    x = mx.random.normal((4, 64))
    assert mx.allclose(layer(x), base(x), atol=1e-5).item()
    other = make_base("linear", 64, 32, False)
    layer.set_linear(other)
    assert layer.linear is other
    assert mx.allclose(layer.m, mx.linalg.norm(other.weight, axis=1)).item()
    assert mx.allclose(layer(x), other(x), atol=1e-5).item()


def test_layer_calls_the_op(monkeypatch):
    seen = []
    real = ops.dora_linear

    def spy(*a, **k):
        seen.append((k.get("scales") is not None, k.get("x_dropped") is not None))
        return real(*a, **k)

    monkeypatch.setattr(ops, "dora_linear", spy)
    x = mx.random.normal((2, 64))
    dora.DoRALinear.from_base(make_base("linear", 64, 32, True), dropout=0.5)(x)
    dora.DoRALinear.from_base(make_base("linear", 64, 32, False, QUANT[0]))(x)
    dora.DoRAEmbedding.from_base(make_base("embedding", 40, 64, False)).as_linear(x)
    assert seen == [(False, True), (True, False), (False, False)]


def test_weight_sq_norm_cached(monkeypatch):
    """The layer passes ops.dora_linear ||W_i||^2 as ``weight_sq_norm``, computed once per
    base weight."""
    got = []

    def op(x, weight, lora_a, lora_b, magnitude, scale, bias=None, *, x_dropped=None,
           scales=None, biases=None, group_size=64, bits=4, mode="affine",
           weight_sq_norm=None, stream=None):
        got.append(weight_sq_norm)
        return ops.dora_linear_reference(x, weight, lora_a, lora_b, magnitude, scale, bias,
                                         x_dropped=x_dropped, scales=scales, biases=biases,
                                         group_size=group_size, bits=bits, mode=mode)

    monkeypatch.setattr(ops, "dora_linear", op)
    base = make_base("linear", 64, 32, False, QUANT[0])
    layer = dora.DoRALinear.from_base(base)
    x = mx.random.normal((2, 64))
    layer(x)
    layer(x)
    w = mx.dequantize(base.weight, base.scales, base.biases, group_size=64, bits=4)
    assert got[0] is got[1]
    assert mx.allclose(got[0], (w * w).sum(axis=1), rtol=1e-5).item()
    layer.set_linear(make_base("linear", 64, 32, False))
    layer(x)
    assert got[2] is not got[0] and mx.allclose(got[2], (layer.linear.weight ** 2).sum(1)).item()
    assert "_sq_norm_cache" not in dict(nn.utils.tree_flatten(layer.parameters()))


@pytest.mark.parametrize("quant", [None] + MLX_OK_QUANT, ids=QUANT_ID)
@pytest.mark.parametrize("bias", [False, True])
def test_dora_linear_fuse(quant, bias):
    base = make_base("linear", 128, 48, bias, quant)
    ours, theirs = pair("DoRALinear", base, scale=2.0)
    x = mx.random.normal((6, 128))
    fused, ref = ours.fuse(), theirs.fuse()
    assert type(fused) is type(ref) and ("bias" in fused) == bias
    assert mx.allclose(fused(x), ref(x), atol=1e-4).item()
    if quant is not None:
        assert (fused.mode, fused.group_size, fused.bits) == tuple(quant)
    dq = ours.fuse(dequantize=True)
    assert isinstance(dq, nn.Linear)
    # mxfp4 dequantizes to bfloat16, so the adapted weight is rounded to bfloat16.
    tol = 3e-2 if quant is not None and quant[0] != "affine" else 1e-4
    assert mx.allclose(dq(x), ours(x), atol=tol).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_embedding_matches_mlx_lm(device, dtype):
    base = make_base("embedding", 70, 64, False, None, dtype)
    ours, theirs = pair("DoRAEmbedding", base)
    oracle = copy_adapter(theirs, mlx_dora.DoRAEmbedding.from_base(as_f32(base), r=4))
    ids = mx.random.randint(0, 70, (3, 9))
    o, og = value_and_grads(ours, ids)
    t, tg = value_and_grads(theirs, ids)
    r, rg = value_and_grads(oracle, ids)
    assert_same(o, t, r, dtype, "output")
    for k in tg:
        assert_same(og[k], tg[k], rg[k], dtype, f"grad {k}")
    x = mx.random.normal((4, 64)).astype(dtype)
    lin = lambda m, x: m.as_linear(x)  # noqa: E731
    o, og = value_and_grads(ours, x, lin)
    t, tg = value_and_grads(theirs, x, lin)
    r, rg = value_and_grads(oracle, x.astype(mx.float32), lin)
    # mlx-lm's as_linear returns float32 for half inputs (m is float32): compare values.
    assert o.dtype == x.dtype
    assert_same(o, t.astype(dtype), r, dtype, "as_linear output")
    for k in tg:
        assert_same(og[k], tg[k].astype(og[k].dtype), rg[k], dtype, f"as_linear grad {k}")


@pytest.mark.parametrize("quant", [QUANT[0], QUANT[1]], ids=["q4", "q8"])
def test_dora_quantized_embedding(quant):
    """Beyond mlx-lm: a quantized table behaves as the dequantized dense table."""
    qbase = make_base("embedding", 70, 64, False, quant)
    dense = nn.Embedding(70, 64)
    dense.weight = mx.dequantize(qbase.weight, qbase.scales, qbase.biases,
                                 group_size=quant[1], bits=quant[2])
    ours = randomize_adapter(dora.DoRAEmbedding.from_base(qbase, r=4))
    ref = copy_adapter(ours, mlx_dora.DoRAEmbedding.from_base(dense, r=4))
    assert mx.allclose(ours.m, ref.m, rtol=1e-5).item()
    ours.m = ref.m = ours.m * 1.1
    ids = mx.random.randint(0, 70, (2, 7))
    o, og = value_and_grads(ours, ids)
    t, tg = value_and_grads(ref, ids)
    assert mx.allclose(o, t, atol=1e-5).item()
    for k in tg:
        assert mx.allclose(og[k], tg[k], atol=1e-5).item(), k
    x = mx.random.normal((3, 64))
    lin = lambda m, x: m.as_linear(x)  # noqa: E731
    assert mx.allclose(ours.as_linear(x), ref.as_linear(x), atol=1e-4).item()
    fused = ours.fuse()
    assert isinstance(fused, nn.QuantizedEmbedding) and fused.bits == quant[2]
    dq = ours.fuse(dequantize=True)
    assert isinstance(dq, nn.Embedding)
    assert mx.allclose(dq(ids), ours(ids), atol=1e-4).item()
    assert mx.allclose(dq.as_linear(x), lin(ours, x), atol=1e-4).item()


def test_dora_embedding_fuse():
    base = make_base("embedding", 70, 64, False)
    ours, theirs = pair("DoRAEmbedding", base, scale=3.0)
    ids = mx.random.randint(0, 70, (2, 6))
    fused = ours.fuse()
    assert isinstance(fused, nn.Embedding)
    assert mx.allclose(fused.weight, theirs.fuse().weight, atol=1e-6).item()
    assert mx.allclose(fused(ids), ours(ids), atol=1e-5).item()


@pytest.mark.parametrize("name", ["DoRALinear", "DoRAEmbedding"])
def test_same_api_as_mlx_lm(name):
    ours, theirs = getattr(dora, name), getattr(mlx_dora, name)
    for method in ("__init__", "from_base", "fuse", "__call__", "as_linear", "set_linear",
                   "set_embedding"):
        if hasattr(theirs, method):
            a = inspect.signature(getattr(ours, method)).parameters
            b = inspect.signature(getattr(theirs, method)).parameters
            assert [(p.name, p.default) for p in a.values()] == \
                   [(p.name, p.default) for p in b.values()], f"{name}.{method}"
