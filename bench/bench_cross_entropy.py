"""linear_cross_entropy: "reference" (mlx-lm: materialized logits + nn.losses.cross_entropy)
vs "fused" (blockwise, no logits), forward + backward, time and peak memory, side by side.

    PYTHONPATH=python pytest bench/bench_cross_entropy.py --benchmark-json=bench/results/ce.json

Loss: the trainer's masked mean. Modes: "fwd" (the loss alone, as in evaluation), "dh"
(LoRA: the head is frozen) and "dh+dW" (the head is trained). As the trainer does, the
fused provider passes grad_in_forward=True in the "dh" mode (dh comes from the forward: 2
GEMMs of N·V·d on CUDA instead of 3) and not in "fwd" nor "dh+dW" (a trained head needs
the recomputed logits anyway). Shapes: the GPU runs the H200 target (N=8192, d=1024,
bf16); the CPU a size its netlib-backed reference finishes in seconds
(MLX_TUNER_BENCH_CE_N / _D override).
"""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

from common import QUICK, annotate, peak_memory, run
from mlx_tuner.ops import linear_cross_entropy, linear_cross_entropy_reference

GPU = mx.default_device() == mx.gpu
VOCABS = [512] if QUICK else [32000, 128256, 151936]
N = int(os.environ.get("MLX_TUNER_BENCH_CE_N", 64 if QUICK else (8192 if GPU else 256)))
D = int(os.environ.get("MLX_TUNER_BENCH_CE_D", 64 if QUICK else (1024 if GPU else 256)))
DTYPE = mx.bfloat16 if GPU else mx.float32
PROVIDERS = {"reference": linear_cross_entropy_reference, "fused": linear_cross_entropy}
# On CUDA also the "dh" mode's settings, timed beside the default (bfloat16 chunks of
# 256 MiB, 16,384 columns at N = 8192): float32 logit chunks, and half as wide chunks.
CUDA_VARIANTS = {
    "fused-f32-logits": {"MLX_TUNER_CE_LOGITS": "float32"},
    "fused-chunk8k": {"MLX_TUNER_CE_CHUNK": "8192"},
}
if GPU and mx.cuda.is_available():
    PROVIDERS.update({name: linear_cross_entropy for name in CUDA_VARIANTS})


def _case(V: int, mode: str, provider: str):
    fn = PROVIDERS[provider]
    h = (mx.random.normal((N, D)) * 0.5).astype(DTYPE)
    w = (mx.random.normal((V, D)) * D**-0.5).astype(DTYPE)
    y = mx.random.randint(0, V, (N,))
    mask = mx.arange(N) % 7 != 3  # some prompt tokens masked out, as in training
    mx.eval(h, w, y, mask)
    kw = {"grad_in_forward": True} if provider.startswith("fused") and mode == "dh" else {}

    def loss(h, w):
        return fn(h, w, y, mask=mask, reduction="mean", **kw)

    if mode == "fwd":
        return h, w, loss
    return h, w, mx.value_and_grad(loss, argnums=(0,) if mode == "dh" else (0, 1))


@pytest.mark.parametrize("mode", ["fwd", "dh", "dh+dW"])
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_linear_cross_entropy(benchmark, provider, V, mode, monkeypatch):
    if provider in CUDA_VARIANTS:
        if mode != "dh":
            pytest.skip("a setting of the gradient-in-forward path")
        for key, value in CUDA_VARIANTS[provider].items():
            monkeypatch.setenv(key, value)
    h, w, step = _case(V, mode, provider)
    peak = peak_memory(lambda: step(h, w))
    gemms = {"fwd": 1, "dh": 2, "dh+dW": 3}[mode]  # logits (, dh, dW): the reference's work
    # The CUDA kernels' float32 accumulators come from cudaMallocAsync, which MLX's memory
    # counters do not see (GPU.md): add them to the measured peak by hand.
    uncounted = 0
    if GPU and provider.startswith("fused") and not mx.metal.is_available():
        uncounted = 4 * ((N * D if mode != "fwd" else 0) + (V * D if mode == "dh+dW" else 0))
    annotate(benchmark, op="linear_cross_entropy", provider=provider,
             mode="fwd" if mode == "fwd" else f"fwd+bwd:{mode}",
             dtype=DTYPE, shape={"N": N, "d": D, "V": V}, flops=gemms * 2.0 * N * D * V,
             peak_bytes=peak + uncounted, uncounted_scratch_bytes=uncounted,
             inputs_bytes=h.nbytes + w.nbytes,
             logits_bytes=N * V * DTYPE.size)
    run(benchmark, lambda: step(h, w), rounds=None if GPU else 2, warmup=0 if not GPU else 2)
