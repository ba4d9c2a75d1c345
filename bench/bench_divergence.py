"""KL / JS divergence: mlx-lm (the composed fallback it runs off Metal) vs the fused op.

    PYTHONPATH=python pytest bench/bench_divergence.py --benchmark-json=bench/results/divergence.json -s

Rows: op (kl/js) x mode (forward, forward+backward w.r.t. the student, and backward: that
gradient alone, the forward evaluated untimed first) x vocabulary (32k, 128k, 152k) x
dtype x provider. Each row carries bytes moved (2 reads forward; forward+backward: 2 reads
+ 2 reads + 1 gradient written; backward: the last three), GB/s, % of the copy bandwidth
measured in the same run, and the peak memory above the inputs.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.tuner import losses as lm_losses

from common import QUICK, BackwardOnly, annotate, ceilings, peak_memory, run
from mlx_tuner import losses

VOCABS = [1000] if QUICK else [32000, 131072, 151936]
DTYPES = [mx.float32] if QUICK else [mx.float32, mx.bfloat16]
ON_GPU = mx.default_device() == mx.gpu


def _rows(V: int) -> int:
    if QUICK:
        return 4
    if ON_GPU:
        return 8192
    return max(8, (32 * 2**20) // (4 * V))  # ~32 MiB of float32 per input on the CPU


PROVIDERS = {
    "reference": {"kl": lm_losses.kl_div_loss, "js": lm_losses.js_div_loss},
    "fused": {"kl": losses.kl_div_loss, "js": losses.js_div_loss},
}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("mlx.core.", ""))
@pytest.mark.parametrize("mode", ["forward", "backward", "forward+backward"])
@pytest.mark.parametrize("op", ["kl", "js"])
def test_divergence(benchmark, op, mode, dtype, V, provider):
    rows = _rows(V)
    q = (3 * mx.random.normal((rows, V))).astype(dtype)
    p = (3 * mx.random.normal((rows, V))).astype(dtype)
    mx.eval(q, p)
    loss = PROVIDERS[provider][op]
    if mode == "forward":
        def fn():
            return loss(q, p)
        nbytes = 2 * q.nbytes
    else:
        vg = mx.value_and_grad(lambda a, b: loss(a, b).astype(mx.float32).sum())

        def fn():
            return vg(q, p)
        nbytes = 5 * q.nbytes
        if mode == "backward":  # the gradient alone: 2 reads + 1 gradient written
            fn, nbytes = BackwardOnly(fn), 3 * q.nbytes
    peak = peak_memory(fn)
    run(benchmark, fn, rounds=5)
    t = benchmark.stats.stats.median
    copy = ceilings("bfloat16" if dtype == mx.bfloat16 else "float32")["copy_bytes_per_s"]
    gbps = nbytes / t / 1e9
    annotate(benchmark, op=f"{op}_div", provider=provider, mode=mode, dtype=dtype,
             shape={"rows": rows, "V": V}, bytes_moved=nbytes, peak_bytes=peak,
             seconds=t, gb_per_s=gbps, pct_copy=100 * gbps * 1e9 / copy,
             peak_over_grad=peak / q.nbytes)
    print(f"\n{op}_div {mode:17s} {str(dtype)[9:]:8s} {rows:5d}x{V:<6d} {provider:9s} "
          f"{t * 1e3:8.2f} ms {gbps:6.1f} GB/s {100 * gbps * 1e9 / copy:5.1f}% of copy "
          f"peak {peak / 2**20:7.1f} MiB ({peak / q.nbytes:.2f}x one input)")
