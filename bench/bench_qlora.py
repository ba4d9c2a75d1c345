"""QLoRA linear: mlx-lm's path (quantized_matmul + LoRA), the dense base layer, and fused.

    pytest bench/bench_qlora.py --benchmark-json=bench/results/qlora.json

providers: "reference" = qlora_linear_reference (what mlx-lm's LoRALinear over an
nn.QuantizedLinear runs); "dense-base" = the unquantized base layer alone (x Wᵀ, and
dy W for the backward): OpenBLAS float32 GEMMs on the CPU (the machine's GEMM ceiling),
MLX's bf16 matmul on a GPU; "fused" = qlora_linear. Modes: forward, forward+backward
(dx, dA, dB from a fixed upstream gradient: common.layer_step), and backward (those
gradients alone, the forward evaluated untimed first: common.BackwardOnly). Each row carries FLOP/s, the GEMM ceiling of the same run, peak memory and
the bytes of a float32 dequantized copy of W (peak_bytes far below it shows that no
whole copy is ever made).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from common import QUICK, annotate, mode_fn, paired, peak_memory, run
from mlx_tuner.ops import qlora_linear, qlora_linear_reference

BITS, GROUP = 4, 64
ON_GPU = mx.default_device() == mx.gpu
if QUICK:
    SHAPE = dict(m=64, n=256, k=256, r=8)
elif ON_GPU:
    SHAPE = dict(m=4096, n=4096, k=4096, r=16)  # the H200 target of issue 6
else:
    # mlx-lm's CPU path runs ~0.3 GFLOP/s in bf16: keep its side of the run in seconds.
    SHAPE = dict(m=512, n=1024, k=1024, r=16)
DTYPES = [mx.bfloat16] if ON_GPU else [mx.float32, mx.bfloat16]
PROVIDERS = ["reference", "dense-base", "fused"]
MODES = ["forward", "backward", "forward+backward"]
PAIRED_MODES = ["forward", "forward+backward"]  # the targets' modes


def make(dtype):
    m, n, k, r = SHAPE["m"], SHAPE["n"], SHAPE["k"], SHAPE["r"]
    w = mx.random.normal((n, k)).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=GROUP, bits=BITS)
    x = mx.random.normal((m, k)).astype(dtype)
    a = (mx.random.normal((k, r)) / k**0.5).astype(mx.float32)
    bb = (mx.random.normal((r, n)) * 0.01).astype(mx.float32)
    mx.eval(w, wq, s, b, x, a, bb)
    return w, (wq, s, b), x, a, bb


def flops(mode):
    m, n, k, r = SHAPE["m"], SHAPE["n"], SHAPE["k"], SHAPE["r"]
    fwd = 2 * m * n * k + 2 * m * r * (k + n)
    # backward: dx = dy W + g Aᵀ, g = s dy Bᵀ, dA = x_dᵀ g, dB = s xaᵀ dy
    bwd = 2 * m * n * k + 4 * m * r * (k + n)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def qlora_fn(op, mode, q, x, a, b):
    wq, s, bq = q

    def fwd(x, a, b):
        return op(x, wq, s, bq, a, b, 2.0, group_size=GROUP, bits=BITS)

    return mode_fn(fwd, (x, a, b), [0, 1, 2], mode)


def dense_fn(mode, w, x):
    if ON_GPU:
        return mode_fn(lambda x: x @ w.T, (x,), [0], mode)
    wn, xn = np.array(w.astype(mx.float32)), np.array(x.astype(mx.float32))
    dy = np.ones((xn.shape[0], wn.shape[0]), np.float32)

    def cpu():  # OpenBLAS through numpy: the CPU GEMM ceiling for this shape
        if mode != "backward":
            y = xn @ wn.T
        if mode != "forward":
            y = dy @ wn
        return mx.array(float(y[0, 0]))

    return cpu


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("mlx.core.", ""))
def test_qlora(benchmark, dtype, provider, mode):
    w, q, x, a, b = make(dtype)
    if provider == "dense-base":
        fn = dense_fn(mode, w, x)
        fl = 2 * SHAPE["m"] * SHAPE["n"] * SHAPE["k"] * (2 if mode == "forward+backward" else 1)
    else:
        op = qlora_linear if provider == "fused" else qlora_linear_reference
        fn = qlora_fn(op, mode, q, x, a, b)
        fl = flops(mode)
    del w  # the dense weight must not count in the quantized providers' memory
    peak = None if (provider == "dense-base" and not ON_GPU) else peak_memory(fn)
    run(benchmark, fn, rounds=3 if provider == "reference" and not ON_GPU else None)
    annotate(benchmark, op="qlora_linear", provider=provider, mode=mode, dtype=dtype,
             shape=dict(SHAPE), flops=fl, peak_bytes=peak, bits=BITS, group_size=GROUP,
             dequantized_weight_bytes=SHAPE["n"] * SHAPE["k"] * 4)
    t = benchmark.stats.stats.median
    benchmark.extra_info["flops_per_s"] = fl / t


# Issue 6's targets (fused <= 1.5x the dense bf16 base layer) as one side-by-side row:
# the two alternate round by round (common.paired). GPU and quick mode only: on the CPU
# the dense base is numpy's float32 GEMM, not a layer to race.
@pytest.mark.skipif(not (ON_GPU or QUICK), reason="the per-layer ratio targets are the GPU's")
@pytest.mark.parametrize("mode", PAIRED_MODES)
@pytest.mark.parametrize("per_eval", [1, 8], ids=lambda k: f"x{k}")  # calls per evaluation
def test_qlora_paired(benchmark, per_eval, mode):
    w, q, x, a, b = make(mx.bfloat16)
    dense = mode_fn(lambda x: x @ w.T, (x,), [0], mode)
    fns = {"dense-base": dense, "fused": qlora_fn(qlora_linear, mode, q, x, a, b)}
    extra = paired(benchmark, fns, per_eval=per_eval)
    annotate(benchmark, op="qlora_linear", provider="paired fused/dense-base", mode=mode,
             dtype=mx.bfloat16, shape=dict(SHAPE), bits=BITS, group_size=GROUP, **extra)
