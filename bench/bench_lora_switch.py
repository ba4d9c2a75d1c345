"""Fused LoRA over a mixture-of-experts switch layer vs mlx-lm's LoRASwitchLinear maths.

    pytest bench/bench_lora_switch.py --benchmark-json=bench/results/lora_switch.json

providers: "reference" (lora_switch_linear_reference: mlx-lm's gather_mm maths) and
"fused" (mlx_tuner.ops.lora_switch_linear); modes "forward", "forward+backward"
(gradients for x, lora_a, lora_b: a LoRA training step, frozen base) and "backward"
(those gradients alone, the forward evaluated untimed first: common.BackwardOnly). Inputs are laid out
as mlx-lm's SwitchGLU does for a training batch: the (token, slot) pairs sorted by expert,
x (N k, 1, in), indices (N k,), sorted_indices=True. Each row carries FLOP/s and, on the
CPU, the BLAS float32 GEMM of the same total size (N k, in) x (in, out) timed right after.
MLX's CPU gather_mm runs float32 only, so the CPU rows are float32. Bases: "dense" and
"q4g64" (mx.quantize'd at 4 bits, group size 64: mlx-lm's QuantizedSwitchLinear, whose
reference is gather_qmm).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from common import QUICK, BackwardOnly, annotate, blas_gemm_flops, ceilings, run
from mlx_tuner.ops import lora_switch_linear, lora_switch_linear_reference

GPU = mx.default_device() == mx.gpu
# (name, tokens N, experts, k, in, out, rank)
if QUICK:
    SHAPES = [("tiny", 32, 8, 2, 128, 80, 8)]
elif GPU:
    SHAPES = [("qwen3-30b-a3b.gate_proj", 4096, 128, 8, 2048, 768, 16),
              ("qwen3-30b-a3b.down_proj", 4096, 128, 8, 768, 2048, 16)]
else:  # Qwen3-30B-A3B's expert shapes, 32 of its 128 experts, a few hundred tokens
    SHAPES = [("qwen3-30b-a3b.gate_proj", 256, 32, 8, 2048, 768, 8),
              ("qwen3-30b-a3b.down_proj", 256, 32, 8, 768, 2048, 8)]
DTYPES = [mx.bfloat16] if GPU else [mx.float32]
PROVIDERS = ["reference", "fused"]
MODES = ["forward", "backward", "forward+backward"]
BASES = ["dense", "q4g64"]


def flops(mode, pairs, din, dout, r):
    base = 2 * pairs * din * dout
    lora = 2 * pairs * r * (din + dout)
    fwd = base + lora
    # dx = dy W + s g A, g = dy B, dA, dB
    bwd = base + 2 * lora
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[mode]


def make_fn(provider, mode, x, w, a, b, idx, scale, quant):
    op = lora_switch_linear if provider == "fused" else lora_switch_linear_reference

    def f(x, a, b):
        return op(x, w, a, b, idx, scale, sorted_indices=True, **quant)

    if mode == "forward":
        return lambda: f(x, a, b)
    step = mx.value_and_grad(lambda x, a, b: f(x, a, b).astype(mx.float32).sum(), [0, 1, 2])
    both = lambda: step(x, a, b)  # noqa: E731
    return BackwardOnly(both) if mode == "backward" else both


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s[0])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("base", BASES)
def test_lora_switch_linear(benchmark, base, provider, mode, shape, dtype):
    name, n, experts, k, din, dout, r = shape
    keys = mx.random.split(mx.random.key(0), 5)
    x = mx.random.normal((n, din), key=keys[0]).astype(dtype)
    w = (mx.random.normal((experts, dout, din), key=keys[1]) / din**0.5).astype(dtype)
    a = mx.random.normal((experts, r, din), key=keys[2]) / din**0.5  # float32 LoRA
    b = mx.random.normal((experts, dout, r), key=keys[3]) * 0.01
    # k distinct experts per token (a random router), then mlx-lm's sort by expert
    route = mx.argpartition(mx.random.normal((n, experts), key=keys[4]), k - 1, axis=-1)[:, :k]
    flat = route.flatten()
    order = mx.argsort(flat)
    idx = flat[order].astype(mx.uint32)
    xs = x[order // k][:, None, :]  # (N k, 1, in)
    quant = {}
    if base == "q4g64":
        wq, scales, biases = mx.quantize(w, 64, 4)
        w, quant = wq, dict(scales=scales, biases=biases, group_size=64, bits=4)
    mx.eval(xs, w, a, b, idx, *quant.values())
    fn = make_fn(provider, mode, xs, w, a, b, idx, 2.0, quant)
    slow = provider != "fused" and not GPU
    run(benchmark, fn, rounds=3 if slow else 10, warmup=1 if slow else 3)
    pairs = n * k
    work = flops(mode, pairs, din, dout, r)
    ceil = ceilings("bfloat16" if (GPU and dtype == mx.bfloat16) else "float32")["gemm_flops"]
    achieved = work / benchmark.stats["median"]
    extra = {}
    if not GPU:
        blas = blas_gemm_flops(pairs, din, dout)
        extra = {"blas_same_shape_flops": blas, "fraction_of_blas_same_shape": achieved / blas}
    annotate(benchmark, op="lora_switch_linear", provider=provider, mode=mode, dtype=dtype,
             shape={"base": base, "layer": name, "N": n, "experts": experts, "k": k, "in": din,
                    "out": dout, "r": r}, flops=work, flops_per_s=achieved,
             fraction_of_gemm_ceiling=achieved / ceil, **extra)
