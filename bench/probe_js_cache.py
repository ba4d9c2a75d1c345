"""The CPU JS forward with its exps kept in a row buffer against recomputed, alternated
call by call in one run (a diagnostic, not a benchmark row).

    cd bench && PYTHONPATH=../python python probe_js_cache.py [float32|bfloat16]

MLX_TUNER_JS_CACHE_MAX_V picks the path per call (the kernel reads it at every
evaluation); the default keeps the buffer up to 3/4 of L2 (csrc/backend/cpu/divergence.cpp,
js_cache_max_v). Prints the copy-rate-style GB/s of both (two inputs read) and the ratio
of their median times, per vocabulary, ~32 MiB of float32 per input as bench_divergence.
"""
import os
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_tuner import losses

dtype = getattr(mx, sys.argv[1] if len(sys.argv) > 1 else "float32")
KEEP, RECOMPUTE = "1000000000", "0"
for V in (32000, 65536, 98304, 131072, 151936):
    rows = max(8, (32 * 2**20) // (4 * V))
    q = (3 * mx.random.normal((rows, V))).astype(dtype)
    p = (3 * mx.random.normal((rows, V))).astype(dtype)
    mx.eval(q, p)
    times = {KEEP: [], RECOMPUTE: []}
    for rep in range(40):
        for cap in (KEEP, RECOMPUTE) if rep % 2 == 0 else (RECOMPUTE, KEEP):
            os.environ["MLX_TUNER_JS_CACHE_MAX_V"] = cap
            t = time.perf_counter()
            mx.eval(losses.js_div_loss(q, p))
            if rep >= 4:  # warm-up rounds
                times[cap].append(time.perf_counter() - t)
    keep, recompute = np.median(times[KEEP]), np.median(times[RECOMPUTE])
    print(f"{str(dtype).split('.')[-1]} V {V:6d} ({rows} rows): kept {2 * q.nbytes / keep / 1e9:5.1f} "
          f"GB/s, recomputed {2 * q.nbytes / recompute / 1e9:5.1f} GB/s, kept / recomputed "
          f"time {keep / recompute:.2f}")
os.environ.pop("MLX_TUNER_JS_CACHE_MAX_V")
