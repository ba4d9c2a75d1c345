"""What a finished training run leaves in use on the device: MLX's active and cached
bytes, mlx-tuner's own live and cached bytes, the default pool's bytes in use, and the
largest mx.arrays Python still references. Diagnostic for bench_train's device peaks,
whose start grew after each mlx-tuner run in one process.

    MLX_TUNER_BENCH_TRAIN=tinyllama python bench/probe_leak.py [method ...]
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import mlx.core as mx  # noqa: E402

import bench_train as bt  # noqa: E402
from common import cuda_ext  # noqa: E402

MiB = 2**20


def state(tag):
    gc.collect()
    ext = cuda_ext()
    arrays = [o for o in gc.get_objects() if isinstance(o, mx.array)]
    held = sorted(arrays, key=lambda a: -a.nbytes)
    line = (f"{tag:38s} mlx active {mx.get_active_memory() / MiB:8.1f} cache {mx.get_cache_memory() / MiB:8.1f}"
            f"  py arrays {len(arrays)} ({sum(a.nbytes for a in arrays) / MiB:.1f} MiB)")
    if ext is not None:
        line += (f"  ours live {ext.cuda_extra_memory()[0] / MiB:8.1f} cache {ext.cuda_cached_memory() / MiB:8.1f}"
                 f"  pool used {ext.cuda_pool_usage(False)[0] / MiB:8.1f}")
    print(line, flush=True)
    for a in held[:3]:
        print(f"    {a.shape} {a.dtype} {a.nbytes / MiB:.1f} MiB", flush=True)


def sdpa(length, times=3):
    """MLX alone: the attention backward at one sequence length, a fresh graph each time."""
    for _ in range(times):
        q, k, v = (mx.random.normal((4, 16, length, 128)).astype(mx.bfloat16) for _ in range(3))

        def f(q, k, v):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.088, mask="causal").sum()

        mx.eval(mx.grad(f, argnums=(0, 1, 2))(q, k, v))
        del q, k, v
        mx.clear_cache()
        state(f"sdpa backward, length {length}")


def main(methods):
    tmp = Path(tempfile.mkdtemp())
    ext = cuda_ext()
    state("start")
    for method in methods:
        if method == "sdpa":
            sdpa(1024)
            sdpa(1056)
            continue
        if method == "pad32":  # our trainer with mlx-lm's padding: no fused attention backward
            import mlx_tuner.trainer as trainer

            trainer._input_multiple = lambda: 32
            continue
        for provider in os.environ.get("LEAK_PROVIDERS", "fused fused reference").split():
            bt._train(method, provider, tmp, iters=8)
            state(f"{method} {provider} 8 iters")
            mx.clear_cache()
            if ext is not None:
                ext.clear_cuda_cache()
            state("  caches cleared")
        if "LEAK_PROVIDERS" in os.environ:
            continue
        old = mx.set_cache_limit(0), (ext.set_cuda_cache_limit(0) if ext else None)
        bt._train(method, "fused", tmp, iters=8)
        state(f"{method} fused 8 iters, caches off")
        mx.set_cache_limit(old[0])
        if ext is not None:
            ext.set_cuda_cache_limit(old[1])


if __name__ == "__main__":
    main(sys.argv[1:] or ["lora"])  # also "sdpa", and "pad32" before a method
