"""Helpers shared by the adapter-layer tests: bases, parameter copies, output/grad checks."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from tests.conftest import assert_close_to_oracle, to_f64

# (mode, group_size, bits) of the quantized bases the tests run over.
QUANT = [("affine", 64, 4), ("affine", 32, 8), ("affine", 32, 3), ("mxfp4", 32, 4)]


def make_base(kind: str, in_dims: int, out_dims: int, bias: bool, quant=None, dtype=mx.float32):
    """A linear/embedding base layer with random weights (quantized when ``quant``)."""
    if kind == "linear":
        base = nn.Linear(in_dims, out_dims, bias=bias)
        if bias:
            base.bias = mx.random.normal((out_dims,)) * 0.5
    else:
        base = nn.Embedding(in_dims, out_dims)
    base.set_dtype(dtype)
    if quant is not None:
        mode, gs, bits = quant
        if kind == "linear":
            base = nn.QuantizedLinear.from_linear(base, gs, bits, mode=mode)
        else:
            base = nn.QuantizedEmbedding.from_embedding(base, gs, bits, mode=mode)
    return base


def randomize_adapter(layer, seed: int = 1):
    """Non-zero lora_b (fresh layers have B = 0, which would hide most bugs)."""
    key = mx.random.key(seed)
    layer.lora_b = mx.random.normal(layer.lora_b.shape, key=key) * 0.2
    if "m" in layer:
        k2 = mx.random.split(key)[0]
        layer.m = layer.m * (1 + 0.1 * mx.random.normal(layer.m.shape, key=k2))
    return layer


def copy_adapter(src, dst):
    """Give ``dst`` the adapter parameters (lora_a, lora_b, m) of ``src``."""
    for k in ("lora_a", "lora_b", "m"):
        if k in src:
            dst[k] = src[k]
    return dst


def value_and_grads(layer, x, call=None, cot_seed: int = 7):
    """Output and gradients of <layer(x), c> w.r.t. the adapter parameters and x."""
    call = call or (lambda m, x: m(x))
    out = call(layer, x)
    cot = mx.random.normal(out.shape, key=mx.random.key(cot_seed)).astype(out.dtype)
    names = [k for k in ("lora_a", "lora_b", "m") if k in layer]

    def loss(params, x):
        layer.update(params)
        return (call(layer, x).astype(mx.float32) * cot.astype(mx.float32)).sum()

    params = {k: layer[k] for k in names}
    if mx.issubdtype(x.dtype, mx.floating):
        g_params, g_x = mx.grad(loss, argnums=(0, 1))(params, x)
        flat = {**g_params, "x": g_x}
    else:
        flat = dict(mx.grad(loss)(params, x))
    mx.eval(out, flat)
    return out, flat


def assert_same(ours, theirs, oracle, dtype, what):
    """Ours vs mlx-lm's layer in ``dtype``, judged against mlx-lm's layer in float32."""
    if dtype == mx.float32:
        o, t = to_f64(ours), to_f64(theirs)
        scale = max(1.0, float(np.abs(t).max(initial=0.0)))
        err = float(np.abs(o - t).max(initial=0.0))
        assert err <= 2e-5 * scale, f"{what}: max error {err:.3g} vs mlx-lm"
    else:
        assert_close_to_oracle(ours, theirs, to_f64(oracle), dtype, what)


def adapter_pair(ours_module, theirs_module, cls_name, base, r=4, **kw):
    """(ours, theirs): the same adapter class from both libraries over one base, with
    mlx-lm's randomized adapter parameters copied into ours."""
    theirs = randomize_adapter(getattr(theirs_module, cls_name).from_base(base, r=r, **kw))
    ours = copy_adapter(theirs, getattr(ours_module, cls_name).from_base(base, r=r, **kw))
    return ours, theirs


def as_f32(base):
    """The same base with float32 floating arrays (quantized ints untouched): the oracle."""
    out = type(base).__new__(type(base))
    out.__dict__.update(base.__dict__)
    dict.update(out, {k: (v.astype(mx.float32) if isinstance(v, mx.array) and
                          mx.issubdtype(v.dtype, mx.floating) else v) for k, v in base.items()})
    return out
