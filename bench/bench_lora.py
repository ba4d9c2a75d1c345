"""Fused LoRA linear vs mlx-lm's LoRALinear maths and the frozen base layer alone.

    pytest bench/bench_lora.py --benchmark-json=bench/results/lora.json

providers: "reference" (lora_linear_reference: what mlx-lm's LoRALinear runs), "base"
(x W^T alone, MLX's matmul) and "fused" (mlx_tuner.ops.lora_linear); modes "forward",
"forward+backward" (the output and the gradients for x, lora_a, lora_b from a fixed
upstream gradient: the layer's share of a LoRA training step, frozen base; the base layer
computes dx only) and "backward" (those gradients alone, the forward evaluated untimed
first: common.BackwardOnly).
Each row carries FLOP/s and the BLAS / device GEMM ceiling measured in the same run.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from common import QUICK, annotate, blas_gemm_flops, ceilings, mode_fn, paired, run
from mlx_tuner.ops import lora_linear, lora_linear_reference

GPU = mx.default_device() == mx.gpu
# (name, tokens N, in, out, rank): layers of real models
if QUICK:
    SHAPES = [("tiny", 64, 96, 80, 8)]
elif GPU:
    SHAPES = [
        ("llama3-8b.q_proj", 4096, 4096, 4096, 16),
        ("llama3-8b.up_proj", 4096, 4096, 14336, 16),
        ("llama3-8b.down_proj", 4096, 14336, 4096, 16),
        ("qwen3-0.6b.up_proj", 4096, 1024, 3072, 8),
        ("qwen3-4b.up_proj", 4096, 2560, 9728, 16),
        ("mistral-7b.k_proj", 4096, 4096, 1024, 16),  # its q / up / down are Llama-3-8B's
    ]
else:  # 2 shared cores and a ~5 GFLOP/s reference: a few hundred tokens only
    SHAPES = [
        ("qwen3-0.6b.up_proj", 1024, 1024, 3072, 8),
        ("qwen3-4b.q_proj", 256, 2560, 4096, 16),
        ("llama3-8b.q_proj", 256, 4096, 4096, 16),
    ]
DTYPES = [mx.bfloat16] if (QUICK or GPU) else [mx.bfloat16, mx.float32]
PROVIDERS = ["reference", "base", "fused"]
MODES = ["forward", "backward", "forward+backward"]
PAIRED_MODES = ["forward", "forward+backward"]  # the targets' modes


def flops(mode, n, din, dout, r, provider):
    base = 2 * n * din * dout
    lora = 2 * n * r * (din + dout)
    fwd = base + (0 if provider == "base" else lora)
    # dx = dy W (+ s g A^T), g = dy B^T, dA, dB
    bwd = base + (0 if provider == "base" else 2 * lora)
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def layer_inputs(n, din, dout, r, dtype):
    k = mx.random.split(mx.random.key(0), 4)
    x = mx.random.normal((n, din), key=k[0]).astype(dtype)
    w = (mx.random.normal((dout, din), key=k[1]) / din**0.5).astype(dtype)
    a = mx.random.normal((din, r), key=k[2]) / din**0.5  # float32 LoRA, as mlx-lm
    b = mx.random.normal((r, dout), key=k[3]) * 0.01
    mx.eval(x, w, a, b)
    return x, w, a, b


def make_fn(provider, mode, x, w, a, b, scale):
    if provider == "base":
        def f(x, a, b):
            return x @ w.T
    else:
        op = lora_linear if provider == "fused" else lora_linear_reference

        def f(x, a, b):
            return op(x, w, a, b, scale)
    return mode_fn(f, (x, a, b), [0] if provider == "base" else [0, 1, 2], mode)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_lora_linear(benchmark, provider, mode, shape, dtype):
    name, n, din, dout, r = shape
    x, w, a, b = layer_inputs(n, din, dout, r, dtype)
    fn = make_fn(provider, mode, x, w, a, b, 2.0)
    slow = provider != "fused" and not GPU
    run(benchmark, fn, rounds=3 if slow else 10, warmup=1 if slow else 3)
    work = flops(mode, n, din, dout, r, provider)
    ceil = ceilings("bfloat16" if (GPU and dtype == mx.bfloat16) else "float32")["gemm_flops"]
    achieved = work / benchmark.stats["median"]
    extra = {}
    if not GPU:
        # The machine is shared: also time the BLAS float32 GEMM of this very layer
        # (x W^T) right after, the ceiling the CPU kernel is held to.
        blas = blas_gemm_flops(x.shape[0], x.shape[1], w.shape[0])
        extra = {"blas_same_shape_flops": blas, "fraction_of_blas_same_shape": achieved / blas}
    annotate(benchmark, op="lora_linear", provider=provider, mode=mode, dtype=dtype,
             shape={"layer": name, "N": n, "in": din, "out": dout, "r": r}, flops=work,
             flops_per_s=achieved, fraction_of_gemm_ceiling=achieved / ceil, **extra)


# The per-layer targets (issue 5: fused <= 1.15x / 1.2x the frozen base layer) as one
# side-by-side row: base and fused alternate round by round (common.paired). GPU and quick
# mode only: on the CPU the targets are against the BLAS GEMM (the rows above).
@pytest.mark.skipif(not (GPU or QUICK), reason="the per-layer ratio targets are the GPU's")
@pytest.mark.parametrize("mode", PAIRED_MODES)
@pytest.mark.parametrize("per_eval", [1, 8], ids=lambda k: f"x{k}")  # calls per evaluation
def test_lora_linear_paired(benchmark, per_eval, mode):
    name, n, din, dout, r = SHAPES[0]
    x, w, a, b = layer_inputs(n, din, dout, r, mx.bfloat16)
    fns = {p: make_fn(p, mode, x, w, a, b, 2.0) for p in ("base", "fused")}
    extra = paired(benchmark, fns, per_eval=per_eval)
    annotate(benchmark, op="lora_linear", provider="paired fused/base", mode=mode,
             dtype=mx.bfloat16, shape={"layer": name, "N": n, "in": din, "out": dout, "r": r},
             **extra)
