"""Kernel-level time of linear_cross_entropy on the GPU (a diagnostic, not a benchmark
row): the trainer's step ("dh" mode) and the loss alone, the materialized reference beside
the fused op and its settings.

    python bench/probe_ce.py [N d V]
Each case runs a few times under torch.profiler (CUPTI sees the kernels inside MLX's CUDA
graphs) and prints, per case, each kernel's device time per call and the wall-clock of
one evaluation, so the chunk loop's GEMMs and softmax can be weighed against the
materialized path's.
"""
import sys
import time

import mlx.core as mx

from common import environ, kernel_times
from mlx_tuner.ops import linear_cross_entropy, linear_cross_entropy_reference

N, D, V = (int(a) for a in sys.argv[1:4]) if len(sys.argv) > 3 else (8192, 1024, 151936)
REPS = 5
k = mx.random.split(mx.random.key(0), 2)
h = (mx.random.normal((N, D), key=k[0]) * 0.5).astype(mx.bfloat16)
w = (mx.random.normal((V, D), key=k[1]) * D**-0.5).astype(mx.bfloat16)
y = mx.random.randint(0, V, (N,))
mask = mx.arange(N) % 7 != 3
mx.eval(h, w, y, mask)


def step(fn, **kw):
    """The trainer's step (frozen head): the loss and dh."""
    g = mx.value_and_grad(lambda h: fn(h, w, y, mask=mask, reduction="mean", **kw))
    return lambda: g(h)


def loss_only(fn):
    """Evaluation: the loss alone."""
    return lambda: (fn(h, w, y, mask=mask, reduction="mean"), None)


# name -> (callable, environment, the materialized case it is checked against)
CASES = {
    "materialized": (step(linear_cross_entropy_reference), {}, "materialized"),
    "fused": (step(linear_cross_entropy, grad_in_forward=True), {}, "materialized"),
    "fused chunk 8192": (step(linear_cross_entropy, grad_in_forward=True),
                         {"MLX_TUNER_CE_CHUNK": "8192"}, "materialized"),
    "loss only, materialized": (loss_only(linear_cross_entropy_reference), {},
                                "loss only, materialized"),
    "loss only, fused": (loss_only(linear_cross_entropy), {}, "loss only, materialized"),
}
refs = {name: CASES[name][0]() for name in {c[2] for c in CASES.values()}}
mx.eval(refs)
for name, (fn, env, against) in CASES.items():
    with environ(env):
        loss, dh = fn()  # the settings' result against the materialized path's
        ref_loss, ref_dh = refs[against]
        line = f"-- {name}: loss {loss.item():.6f} (materialized {ref_loss.item():.6f})"
        if dh is not None:
            err = mx.abs(dh.astype(mx.float32) - ref_dh.astype(mx.float32)).max() / mx.abs(
                ref_dh.astype(mx.float32)).max()
            line += f", dh max error {err.item():.2e} of its largest"
        print(line)
        for _ in range(3):
            mx.eval(fn())
        mx.synchronize()
        t0 = time.perf_counter()
        for _ in range(REPS):
            mx.eval(fn())
        wall = (time.perf_counter() - t0) / REPS * 1e3
        total, rows = kernel_times(fn, REPS)
    print(f"== {name} (N {N}, d {D}, V {V}): {total / 1e3:.2f} ms of kernels, {wall:.2f} ms wall")
    for us, launches, kname in rows[:10]:
        print(f"   {us / 1e3:7.3f} ms  x{launches:5.1f}  {kname[:100]}")
