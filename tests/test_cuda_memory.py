"""mlx-tuner's CUDA buffer cache gives its memory back: after the caches are cleared the
device's default pool holds what it held before, plus the one cuBLASLt workspace.
(On the H200, cudaFree on the cache's stream-ordered buffers once left the pool's bytes in
use unchanged, and every training run in a process left its whole cache behind.)
Runs only where the CUDA kernels are built."""

from __future__ import annotations

import time

import mlx.core as mx
import pytest

from mlx_tuner import ops
from mlx_tuner.ops import _extension

ext = _extension.extension()
pytestmark = pytest.mark.skipif(
    ext is None or not hasattr(ext, "cuda_pool_usage") or not mx.cuda.is_available(),
    reason="needs mlx-tuner's CUDA kernels and a CUDA device",
)
MiB = 2**20


def _used():
    mx.synchronize()
    return ext.cuda_pool_usage(False)[0]


def _cached_after_completion(timeout=5.0):
    """The cache's bytes once the last evaluation's buffers have reached it: MLX releases
    a graph's buffers from its completion callback, on its own thread, which may still be
    running after mx.eval and mx.synchronize return."""
    mx.synchronize()
    end = time.monotonic() + timeout
    while ext.cuda_cached_memory() == 0 and time.monotonic() < end:
        time.sleep(0.01)
    time.sleep(0.05)  # the rest of the same callback
    return ext.cuda_cached_memory()


@pytest.fixture
def on_gpu():
    prev = mx.default_device()
    mx.set_default_device(mx.gpu)
    yield
    mx.set_default_device(prev)


def test_clearing_the_caches_returns_the_memory(on_gpu):
    x = mx.random.normal((2048, 1024)).astype(mx.bfloat16)
    w = mx.random.normal((1024, 1024)).astype(mx.bfloat16)
    a, b = mx.random.normal((1024, 16)) * 0.01, mx.random.normal((16, 1024)) * 0.01
    mx.eval(x, w, a, b)

    def step():  # a fused LoRA forward and backward: outputs from the buffer cache
        mx.eval(mx.grad(lambda a, b: ops.lora_linear(x, w, a, b, 2.0).sum(), argnums=(0, 1))(a, b))

    step()  # the first use creates the workspace and per-process state: not checked
    _cached_after_completion()
    mx.clear_cache()
    ext.clear_cuda_cache()
    before = _used()
    for _ in range(4):
        step()
    assert _cached_after_completion() > 0, "the fused op's buffers should have gone to the cache"
    mx.clear_cache()
    ext.clear_cuda_cache()
    assert ext.cuda_cached_memory() == 0
    after = _used()
    assert after <= before + MiB, f"the pool holds {(after - before) / MiB:.1f} MiB more after clearing"
    old = ext.set_cuda_cache_limit(0)  # trimming to a limit gives memory back the same way
    try:
        for _ in range(2):
            step()
        _cached_after_completion(timeout=0.5)  # nothing stays cached at limit 0
        mx.clear_cache()
        assert _used() <= before + MiB
    finally:
        ext.set_cuda_cache_limit(old)
