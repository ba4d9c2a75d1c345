"""Kernel-level time of the fused GPU ops (a diagnostic, not a benchmark row).

    python bench/probe_gpu.py
Runs each case a few times under torch.profiler (CUPTI sees every kernel of the process,
MLX's CUDA graphs included) and prints, per case, each kernel's device time per call.
"""
import collections

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

from mlx_tuner.ops import dora_linear, dora_weight_sq_norm, lora_linear

n, d, r = 4096, 4096, 16
k = mx.random.split(mx.random.key(0), 5)
x = mx.random.normal((n, d), key=k[0]).astype(mx.bfloat16)
w = (mx.random.normal((d, d), key=k[1]) / d**0.5).astype(mx.bfloat16)
a = mx.random.normal((d, r), key=k[2]) / d**0.5
b = mx.random.normal((r, d), key=k[3]) * 0.01
m = mx.random.uniform(0.5, 1.5, (d,), key=k[4])
c = dora_weight_sq_norm(w)
mx.eval(x, w, a, b, m, c)


def grad_of(f):
    g = mx.value_and_grad(lambda *p: f(*p).astype(mx.float32).sum(), argnums=list(range(4)))
    return lambda: g(x, a, b, m)


lora = lambda xx, aa, bb, mm: lora_linear(xx, w, aa, bb, 2.0)
dora = lambda xx, aa, bb, mm: dora_linear(xx, w, aa, bb, mm, 2.0, weight_sq_norm=c)
base = lambda xx, aa, bb, mm: xx @ w.T
CASES = {
    "base fwd": lambda: base(x, a, b, m),
    "base fwd+bwd": grad_of(base),
    "lora fwd": lambda: lora(x, a, b, m),
    "lora fwd+bwd": grad_of(lora),
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
