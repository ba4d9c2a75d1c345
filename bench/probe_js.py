"""The GPU JS forward under this process's settings, against the copy rate measured in the
same process (a diagnostic for choosing the CUDA kernel's plan, not a benchmark row).

    cd /tmp && MLX_TUNER_JS_CTAS_PER_SM=4 python3 bench/probe_js.py [V]

The kernel reads its settings at every launch, but MLX may update a cached CUDA graph in
place, so each setting gets its own process (bench/device-run's `js` stage loops over
them). Prints the median time of the forward and forward+backward (w.r.t. q) at 8192 x V
bfloat16, their % of copy (2 reads; 5 for forward+backward, as bench_divergence), the
forward's time a call with ten queued in one evaluation (the host's per-call time
overlapped: steadier for comparing builds), and the largest difference of the forward from
the two-pass kernel's result on the same inputs (computed in a child process, so the check
never shares a graph with the timed kernel).
"""
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import ceilings, median_time  # noqa: E402
from mlx_tuner import ops  # noqa: E402

V = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "--ref" else 151936
rows = 8192
mx.random.seed(0)
q = (3 * mx.random.normal((rows, V))).astype(mx.bfloat16)
p = (3 * mx.random.normal((rows, V))).astype(mx.bfloat16)
mx.eval(q, p)
out = ops.js_div(q, p)
mx.eval(out)
if "--ref" in sys.argv:  # the child: the two-pass kernel's values
    np.save(sys.argv[-1], np.array(out.astype(mx.float32)))
    sys.exit(0)

copy = ceilings("bfloat16")["copy_bytes_per_s"]
t_f = median_time(lambda: ops.js_div(q, p), warmup=3, reps=20)
# Ten forwards in one evaluation: the GPU's time a forward with the host's per-call time
# (graph, launch, sync) overlapped, for comparing builds with less noise than t_f.
t_q = median_time(lambda: [ops.js_div(q, p) for _ in range(10)], warmup=1, reps=5) / 10
vg = mx.value_and_grad(lambda a, b: ops.js_div(a, b).astype(mx.float32).sum())
t_fb = median_time(lambda: vg(q, p), warmup=2, reps=10)
ref_path = f"/tmp/js_ref_{V}.npy"  # the two-pass result, by V
if not os.path.exists(ref_path):
    env = dict(os.environ, MLX_TUNER_JS_CTAS_PER_SM="0")
    subprocess.run([sys.executable, __file__, str(V), "--ref", ref_path], env=env, check=True)
ref = np.load(ref_path)
diff = float(np.max(np.abs(np.array(out.astype(mx.float32)) - ref)))
setting = " ".join(f"{k}={os.environ.get(k, '-')}"
                   for k in ("MLX_TUNER_JS_CTAS_PER_SM", "MLX_TUNER_JS_THREADS", "MLX_TUNER_JS_KEEP",
                             "MLX_TUNER_JS_SPLIT"))
f_pct = 100 * 2 * q.nbytes / t_f / copy
fb_pct = 100 * 5 * q.nbytes / t_fb / copy
print(f"{setting}: copy {copy / 1e12:.2f} TB/s; forward {t_f * 1e3:.3f} ms ({f_pct:.1f}% of copy; "
      f"queued x10 {t_q * 1e3:.3f} ms, {100 * 2 * q.nbytes / t_q / copy:.1f}%); "
      f"forward+backward {t_fb * 1e3:.3f} ms ({fb_pct:.1f}%); max |out - two-pass| {diff:.3g}")
