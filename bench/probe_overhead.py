"""Where a fused layer's wall time goes on the GPU (a diagnostic, not a benchmark row).

    python bench/probe_overhead.py [label]

For the frozen base layer and the fused LoRA / QLoRA / DoRA layers (4096 tokens,
4096 x 4096, r 16, bfloat16): the median wall time of one call evaluated alone (what the
benchmarks time), the host time spent building its graph, and the time per call when 8
calls share one evaluation (as the layers of a model do: host work then overlaps the
GPU's), and one call under mx.compile (as the trainer's step runs). Run it under
different environments (MLX_TUNER_CUDA_CACHE=0, MLX_USE_CUDA_GRAPHS=0) to see what each
costs; with MLX_TUNER_CUDA_HOST_TIMES=1 it also prints the host time spent inside
mlx-tuner's own eval_gpu bodies and GEMM calls per call.
"""
import os
import sys
import time

import mlx.core as mx
import numpy as np

from common import cuda_ext, layer_step, probe_layer
from mlx_tuner.ops import dora_linear, lora_linear, qlora_linear

x, w, a, b, m, c, (wq, sc, bi) = probe_layer()

LAYERS = {
    "base": (lambda x: x @ w.T, (x,), [0]),
    "lora": (lambda x, a, b: lora_linear(x, w, a, b, 2.0), (x, a, b), [0, 1, 2]),
    "qlora": (lambda x, a, b: qlora_linear(x, wq, sc, bi, a, b, 2.0, group_size=64, bits=4),
              (x, a, b), [0, 1, 2]),
    "dora": (lambda x, a, b, m: dora_linear(x, w, a, b, m, 2.0, weight_sq_norm=c),
             (x, a, b, m), [0, 1, 2, 3]),
}


def timed(fn, reps=20, on_warm=None):
    for _ in range(3):
        mx.eval(fn())
    if on_warm is not None:  # one-off work (plans, JIT) stays out of the host times
        on_warm()
    wall, build = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        t1 = time.perf_counter()
        mx.eval(out)
        t2 = time.perf_counter()
        wall.append(t2 - t0)
        build.append(t1 - t0)
    return float(np.median(wall)) * 1e6, float(np.median(build)) * 1e6


def compiled(f, primals, argnums, mode):
    """The same call under mx.compile (as the trainer's step runs): no Python tracing per
    call, MLX's graph work and ours remain."""
    if mode == "fwd":
        c = mx.compile(f)
        return lambda: c(*primals)
    y = f(*primals)
    dy = mx.random.normal(y.shape, key=mx.random.key(7)).astype(y.dtype)
    mx.eval(dy)

    def step(*p):
        def g(*sub):
            full = list(p)
            for i, v in zip(argnums, sub):
                full[i] = v
            return [f(*full)]
        return mx.vjp(g, [p[i] for i in argnums], [dy])  # outputs too, or compile drops the forward

    c = mx.compile(step)
    return lambda: c(*primals)


label = sys.argv[1] if len(sys.argv) > 1 else "default"
ext = cuda_ext()
host = ext is not None and os.environ.get("MLX_TUNER_CUDA_HOST_TIMES") == "1"
print(f"== {label}: wall us/call (one eval each) | host graph build us | us/call, 8 per eval"
      " | compiled, one eval each"
      + (" | our eval_gpu host us/call (name: us)" if host else ""))
for name, (f, primals, argnums) in LAYERS.items():
    for mode in ("fwd", "fwd+bwd"):
        one = (lambda f=f, p=primals: f(*p)) if mode == "fwd" else layer_step(f, primals, argnums)
        wall, build = timed(one, on_warm=(lambda: ext.cuda_host_times(True)) if host else None)
        ours = ""
        if host:  # 20 timed calls after the warm-up
            ours = "  " + " ".join(f"{n}: {us / 20:.1f}" for n, us, _ in ext.cuda_host_times(True))
        batch, _ = timed(lambda one=one: [one() for _ in range(8)], reps=5)
        comp, _ = timed(compiled(f, primals, argnums, mode))
        print(f"   {name:6s} {mode:8s} {wall:9.1f} {build:9.1f} {batch / 8:9.1f} {comp:9.1f}{ours}")
