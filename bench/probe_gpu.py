"""Kernel-level time of the fused GPU ops (a diagnostic, not a benchmark row).

    python bench/probe_gpu.py
Runs each case a few times under torch.profiler (CUPTI sees every kernel of the process,
MLX's CUDA graphs included) and prints, per case, each kernel's device time per call.
"""
import collections

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

from common import probe_cases

CASES = probe_cases()
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
