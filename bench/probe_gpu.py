"""Kernel-level time of the fused GPU ops (a diagnostic, not a benchmark row).

    python bench/probe_gpu.py
Runs each case a few times under torch.profiler (CUPTI sees every kernel of the process,
MLX's CUDA graphs included) and prints, per case, each kernel's device time per call.
"""
from common import kernel_times, probe_cases

for name, fn in probe_cases().items():
    total, rows = kernel_times(fn)
    print(f"== {name}: {total:.1f} us of kernels per call")
    for us, launches, kname in rows[:14]:
        print(f"   {us:8.1f} us  x{launches:4.1f}  {kname[:110]}")
