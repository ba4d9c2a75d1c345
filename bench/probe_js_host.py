"""Per-call against queued time of the GPU divergence forwards (a diagnostic).

    cd /tmp && python3 bench/probe_js_host.py [V]

At 8192 x V bfloat16: the median wall time of one forward evaluated and synchronized
alone (as bench_divergence times it), and of ten evaluated together (the host's per-call
work overlapped with the GPU's), for js_div (a cluster launch), kl_div (a plain launch)
and MLX's own elementwise copy of both inputs. The difference is what one evaluation costs
beyond the kernel: graph building, instantiation or update, launch and synchronization.
"""
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_time  # noqa: E402
from mlx_tuner import ops  # noqa: E402

V = int(sys.argv[1]) if len(sys.argv) > 1 else 151936
rows = 8192
mx.random.seed(0)
q = (3 * mx.random.normal((rows, V))).astype(mx.bfloat16)
p = (3 * mx.random.normal((rows, V))).astype(mx.bfloat16)
mx.eval(q, p)
cases = {
    "js_div": lambda: ops.js_div(q, p),
    "kl_div": lambda: ops.kl_div(q, p),
    "copy q, p": lambda: [q * 1, p * 1],
}
for name, fn in cases.items():
    one = median_time(fn, warmup=3, reps=20)
    ten = median_time(lambda f=fn: [f() for _ in range(10)], warmup=1, reps=5) / 10
    print(f"{name:10s} per call {one * 1e3:.3f} ms, queued x10 {ten * 1e3:.3f} ms a call, "
          f"difference {(one - ten) * 1e6:.0f} us")
