"""Kernel-level time of the fused GPU ops (a diagnostic, not a benchmark row).

    python bench/probe_gpu.py
Runs each case a few times under torch.profiler (CUPTI sees every kernel of the process,
MLX's CUDA graphs included) and prints, per case, each kernel's device time per call.
"""
import collections

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

from common import layer_step, probe_layer
from mlx_tuner.ops import dora_linear, lora_linear, qlora_linear

x, w, a, b, m, c, (wq, sc, bi) = probe_layer()


def grad_of(f, argnums=(0, 1, 2, 3)):
    """The layer's forward+backward from a fixed upstream gradient (as the benchmarks)."""
    return layer_step(f, (x, a, b, m), list(argnums))


lora = lambda xx, aa, bb, mm: lora_linear(xx, w, aa, bb, 2.0)
dora = lambda xx, aa, bb, mm: dora_linear(xx, w, aa, bb, mm, 2.0, weight_sq_norm=c)
base = lambda xx, aa, bb, mm: xx @ w.T
qlora = lambda xx, aa, bb, mm: qlora_linear(xx, wq, sc, bi, aa, bb, 2.0, group_size=64, bits=4)
CASES = {
    "base fwd": lambda: base(x, a, b, m),
    "base fwd+bwd": grad_of(base, [0]),
    "lora fwd": lambda: lora(x, a, b, m),
    "lora fwd+bwd": grad_of(lora, [0, 1, 2]),
    "qlora fwd": lambda: qlora(x, a, b, m),
    "qlora fwd+bwd": grad_of(qlora, [0, 1, 2]),
    "dora fwd": lambda: dora(x, a, b, m),
    "dora fwd+bwd": grad_of(dora),
}
REPS = 5
for name, fn in CASES.items():
    for _ in range(3):
        mx.eval(fn())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            mx.eval(fn())
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per[e.name][0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
            per[e.name][1] += 1
    total = sum(v[0] for v in per.values()) / REPS
    print(f"== {name}: {total:.1f} us of kernels per call")
    for kname, (us, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0])[:14]:
        print(f"   {us / REPS:8.1f} us  x{cnt / REPS:4.1f}  {kname[:110]}")
