"""DoRA linear: "reference" (mlx-lm's DoRALinear maths, building W + s B^T A^T every call),
"fused" (mlx_tuner.ops.dora_linear) and "base" (the frozen x W^T alone), forward,
forward+backward (grads of x, lora_a, lora_b, m from a fixed upstream gradient:
common.layer_step) and backward (those grads alone, the forward evaluated untimed first:
common.BackwardOnly), dense and 4-bit quantized, with peak
memory.  Run: pytest bench/bench_dora.py --benchmark-json=bench/results/dora.json
(MLX_TUNER_BENCH_QUICK=1 for tiny shapes)."""

from __future__ import annotations

import mlx.core as mx
import pytest

from common import QUICK, annotate, mode_fn, paired, peak_memory, run
from mlx_tuner.ops import dora_linear, dora_linear_reference, dora_weight_sq_norm

if QUICK:
    SHAPES = [(8, 64, 64, 4)]
elif mx.default_device() == mx.gpu:
    SHAPES = [(4096, 4096, 4096, 16)]
else:
    SHAPES = [(512, 2048, 2048, 16), (2048, 1024, 1024, 8)]  # (N tokens, in, out, r)
DTYPES = [mx.bfloat16] if mx.default_device() == mx.gpu else [mx.float32, mx.bfloat16]
FNS = {"reference": dora_linear_reference, "fused": dora_linear}


def inputs(n, k, o, r, dtype, quant):
    x = mx.random.normal((n, k)).astype(dtype)
    w = (mx.random.normal((o, k)) / k**0.5).astype(dtype)
    a = mx.random.uniform(-1, 1, (k, r)) / k**0.5
    b = mx.random.normal((r, o)) * 0.1
    m = mx.random.uniform(0.5, 1.5, (o,))
    kw = {}
    if quant:
        w, sc, bi = mx.quantize(w, group_size=64, bits=4)
        kw = dict(scales=sc, biases=bi, group_size=64, bits=4)
    mx.eval(x, w, a, b, m, kw)
    return x, w, a, b, m, kw


def make_fn(provider, mode, x, w, a, b, m, kw):
    if provider == "base":
        def f(x):
            if kw:
                return mx.quantized_matmul(x, w, kw["scales"], kw["biases"], transpose=True,
                                           group_size=64, bits=4)
            return x @ w.T
        return mode_fn(f, (x,), [0], mode)
    op = FNS[provider]
    extra = {}
    if provider == "fused":  # DoRALinear caches ||W_i||^2 (W is frozen): so does the bench
        extra["weight_sq_norm"] = dora_weight_sq_norm(w, kw.get("scales"), kw.get("biases"))
        mx.eval(extra["weight_sq_norm"])

    def fwd(x, a, b, m):
        return op(x, w, a, b, m, 2.0, **kw, **extra)

    return mode_fn(fwd, (x, a, b, m), [0, 1, 2, 3], mode)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("mode", ["forward", "backward", "forward_backward"])
@pytest.mark.parametrize("provider", ["reference", "fused", "base"])
def test_dora(benchmark, provider, mode, quant, dtype, shape):
    n, k, o, r = shape
    args = inputs(n, k, o, r, dtype, quant)
    fn = make_fn(provider, mode, *args)
    gemms = 2 if mode == "forward_backward" else 1  # base: x W^T, dx = g W
    flops = gemms * 2.0 * n * k * o
    peak = peak_memory(fn)
    annotate(benchmark, op="dora_linear", provider=provider, mode=mode, dtype=dtype,
             shape=dict(n=n, k=k, o=o, r=r, quant="q4" if quant else "dense"), flops=flops,
             peak_bytes=peak)
    run(benchmark, fn, rounds=3 if provider == "reference" and not QUICK else None)


# Issue 7's targets (DoRA forward+backward <= 1.3x, QDoRA <= 1.6x the frozen dense base
# layer) as one side-by-side row each: base and fused alternate round by round
# (common.paired). GPU and quick mode only.
@pytest.mark.skipif(mx.default_device() != mx.gpu and not QUICK,
                    reason="the per-layer ratio targets are the GPU's")
@pytest.mark.parametrize("quant", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("per_eval", [1, 8], ids=lambda k: f"x{k}")  # calls per evaluation
def test_dora_paired(benchmark, per_eval, mode, quant):
    n, k, o, r = SHAPES[0]
    dense_args = inputs(n, k, o, r, mx.bfloat16, False)
    args = inputs(n, k, o, r, mx.bfloat16, True) if quant else dense_args
    fns = {"dense-base": make_fn("base", mode, *dense_args),
           "fused": make_fn("fused", mode, *args)}
    extra = paired(benchmark, fns, per_eval=per_eval)
    annotate(benchmark, op="dora_linear", provider="paired fused/dense-base", mode=mode,
             dtype=mx.bfloat16, shape=dict(n=n, k=k, o=o, r=r, quant="q4" if quant else "dense"),
             **extra)
