"""Where the host time of a fused GPU layer goes, by CUDA API call (a diagnostic).

    python bench/probe_host_api.py [REPS]
The per-layer benchmarks are host-bound (BENCHMARKS.md): one evaluation of the fused LoRA
forward+backward costs ~800 us against ~445 us of kernels. MLX's CUDA backend builds a
CUDA graph per evaluation (kernel nodes, child graphs for cuBLASLt captures) and, at each
commit, updates a cached executable graph or instantiates a new one (it instantiates
afresh whenever the graph holds a kernel whose cluster is taller than one CTA, as
cuBLASLt's 1 x 2-cluster GEMMs are). This runs each case REPS times under torch.profiler
(CUPTI traces the CUDA runtime and driver API calls of the whole process) and prints, per
case, the wall time per evaluation and the API calls that took the most host time per
evaluation (count and microseconds), e.g. cudaGraphInstantiate against
cudaGraphExecUpdate, cudaStreamBeginCapture, cudaGraphAddChildGraphNode.
"""
import collections
import sys
import time

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

from common import probe_cases

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
CASES = probe_cases()


def api_call(name: str) -> bool:
    return name.startswith("cu")  # cudaX, cuX (driver), cublasX


for name, fn in CASES.items():
    for _ in range(3):
        mx.eval(fn())
    mx.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(REPS):
            mx.eval(fn())
        mx.synchronize()
        wall = (time.perf_counter() - t0) / REPS * 1e6
    per = collections.defaultdict(lambda: [0.0, 0])
    kernels = 0.0
    for e in prof.events():
        dev = getattr(e.device_type, "name", str(e.device_type))
        if dev == "CUDA":
            kernels += getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        elif api_call(e.name):
            per[e.name][0] += e.cpu_time_total
            per[e.name][1] += 1
    host = sum(v[0] for v in per.values()) / REPS
    print(f"== {name}: {wall:.1f} us per evaluation (profiled), {kernels / REPS:.1f} us of "
          f"kernels, {host:.1f} us in CUDA API calls")
    for api, (us, cnt) in sorted(per.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"   {us / REPS:8.1f} us  x{cnt / REPS:5.1f}  {api[:90]}")
