"""Shared benchmark machinery: the machine's ceilings measured in the same run, timing
with warm-up, peak memory, and the facts every result row carries.

Each bench test uses pytest-benchmark's ``benchmark`` fixture for timing and calls
``annotate(benchmark, ...)`` so the row in ``--benchmark-json`` carries device, dtype,
shape, work (FLOPs / bytes), the ceiling and peak memory; ``bench/report.py`` turns those
JSON files into BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from contextlib import contextmanager
from functools import lru_cache

import mlx.core as mx
import numpy as np

QUICK = os.environ.get("MLX_TUNER_BENCH_QUICK", "") not in ("", "0")


def device_label() -> str:
    if mx.default_device() == mx.gpu:
        try:
            info = mx.device_info()
            return str(info.get("device_name", "gpu"))
        except Exception:
            return "gpu"
    return f"cpu:{platform.machine()}x{os.cpu_count()}"


def commit() -> str:
    """The commit measured: MLX_TUNER_COMMIT when set (bench/device-run sets it from
    `.commit`, since the device's copy of the tree may carry a stale .git), else git's."""
    if os.environ.get("MLX_TUNER_COMMIT", "unknown") != "unknown":
        return os.environ["MLX_TUNER_COMMIT"]
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL,
            cwd=os.path.dirname(__file__)).strip()
    except Exception:
        return "unknown"


def sync(out) -> None:
    """Evaluate every array in `out` (an array, or a tuple/list/dict of them)."""
    mx.eval(out)


def median_time(fn, *, warmup: int = 2, reps: int = 10) -> float:
    """Median seconds of fn() (evaluated), after warm-up. For ceilings and quick checks."""
    for _ in range(warmup):
        sync(fn())
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sync(fn())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def cuda_ext():
    """mlx-tuner's CUDA kernels allocate outside MLX's allocator: their own counter."""
    from mlx_tuner.ops import _extension

    ext = _extension.extension()
    return ext if ext is not None and hasattr(ext, "cuda_extra_memory") else None


def reset_peak() -> None:
    """Starts a peak-memory window (MLX's counter and, on CUDA, mlx-tuner's own)."""
    mx.reset_peak_memory()
    extra = cuda_ext()
    if extra is not None:
        extra.reset_cuda_extra_peak()


def read_peak() -> int:
    """Peak bytes since reset_peak(): MLX's peak plus mlx-tuner's CUDA peak (upper bound)."""
    extra = cuda_ext()
    return int(mx.get_peak_memory() + (extra.cuda_extra_memory()[1] if extra is not None else 0))


@contextmanager
def device_pool_peak():
    """On CUDA, one peak counter for MLX's buffers and mlx-tuner's alike (the default
    memory pool both allocate from), with both caches off so that freed buffers count as
    free. Yields (reset, high): reset() starts the window and returns the bytes in use,
    high() the high-water mark since (after a synchronize). Yields None off CUDA."""
    ext = cuda_ext()
    if ext is None or not hasattr(ext, "cuda_pool_usage"):
        yield None
        return
    old_mlx, old_ours = mx.set_cache_limit(0), ext.set_cuda_cache_limit(0)
    mx.clear_cache()

    def high():
        mx.synchronize()
        return int(ext.cuda_pool_usage(False)[1])

    try:
        yield (lambda: int(ext.cuda_pool_usage(True)[0])), high
    finally:
        mx.set_cache_limit(old_mlx)
        ext.set_cuda_cache_limit(old_ours)


def peak_memory(fn) -> int:
    """Peak bytes allocated while running fn() once, above what was live before.

    On CUDA this adds the peak of mlx-tuner's own device allocations to MLX's peak: an
    upper bound (the two peaks need not coincide), never an underestimate.
    """
    sync(fn())  # warm caches and compiled graphs
    mx.clear_cache()
    # The backward alone: its forward is evaluated (and live) before the window opens.
    timed = fn.timed_part() if isinstance(fn, BackwardOnly) else fn
    extra = cuda_ext()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    if extra is not None:
        extra.reset_cuda_extra_peak()
        extra_before = extra.cuda_extra_memory()[0]
    sync(timed())
    # Clamped at 0: buffers freed during fn() (inputs converted and dropped, say) can leave
    # the peak under what was live before, and "less than nothing" is not an extra cost.
    peak = max(0, mx.get_peak_memory() - before)
    if extra is not None:
        peak += extra.cuda_extra_memory()[1] - extra_before
    return int(peak)


@lru_cache(maxsize=None)
def ceilings(dtype_name: str = "float32") -> dict:
    """The machine's GEMM FLOP/s and copy bandwidth, measured now, on the default device.

    CPU: float32 GEMM through numpy's OpenBLAS (the same BLAS family our CPU kernels use);
    copy bandwidth from numpy's copy. GPU: MLX matmul in `dtype_name` and an MLX copy.
    """
    if mx.default_device() == mx.gpu:
        dtype = getattr(mx, dtype_name)
        n = 8192
        a = mx.random.normal((n, n)).astype(dtype)
        b = mx.random.normal((n, n)).astype(dtype)
        t = median_time(lambda: a @ b, warmup=3, reps=10)
        gemm = 2 * n**3 / t
        x = mx.random.normal((256 * 2**20,)).astype(mx.bfloat16)  # 512 MiB
        t = median_time(lambda: x * 1, warmup=3, reps=10)
        copy = 2 * x.nbytes / t
        # MLX's elementwise kernels do not reach the HBM copy rate; PyTorch's device copy
        # (on the H200 image) is the better ceiling when it is there.
        try:
            import torch

            if torch.cuda.is_available():
                a = torch.empty(2**30, dtype=torch.uint8, device="cuda")
                b = torch.empty_like(a)
                for _ in range(3):
                    b.copy_(a)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(20):
                    b.copy_(a)
                end.record()
                torch.cuda.synchronize()
                copy = max(copy, 2 * a.numel() * 20 / (start.elapsed_time(end) / 1e3))
                del a, b
                torch.cuda.empty_cache()
        except ImportError:
            pass
    else:
        n = 256 if QUICK else 2048
        a = np.random.rand(n, n).astype(np.float32)
        b = np.random.rand(n, n).astype(np.float32)
        t = median_time(lambda: mx.array(0) if a @ b is None else mx.array(0), warmup=1,
                        reps=3 if QUICK else 5)
        gemm = 2 * n**3 / t
        x = np.random.rand((4 if QUICK else 64) * 2**20).astype(np.float32)
        y = np.empty_like(x)
        t = median_time(lambda: mx.array(0) if np.copyto(y, x) else mx.array(0), warmup=1,
                        reps=5)
        copy = 2 * x.nbytes / t
    return {"gemm_flops": gemm, "copy_bytes_per_s": copy}


def blas_gemm_flops(rows: int, din: int, dout: int, reps: int = 5) -> float:
    """FLOP/s of numpy's OpenBLAS float32 GEMM (rows, in) x (in, out): the CPU ceiling of a
    layer of that size, timed right after it on the shared machine."""
    xn = np.random.rand(rows, din).astype(np.float32)
    wt = np.random.rand(din, dout).astype(np.float32)
    xn @ wt
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        xn @ wt
        ts.append(time.perf_counter() - t)
    return 2 * rows * din * dout / float(np.median(ts))


def annotate(benchmark, *, op: str, provider: str, mode: str, dtype, shape: dict,
             flops: float = 0.0, bytes_moved: float = 0.0, peak_bytes: int | None = None,
             **extra) -> None:
    """Attach the facts of one result row to a pytest-benchmark result."""
    dtype_name = str(dtype).replace("mlx.core.", "")
    ceil = ceilings("bfloat16" if dtype_name == "bfloat16" else "float32")
    benchmark.extra_info.update(
        op=op, provider=provider, mode=mode, dtype=dtype_name, shape=shape,
        device=device_label(), mlx=mx.__version__, commit=commit(), flops=flops,
        bytes=bytes_moved, peak_bytes=peak_bytes, ceiling_gemm_flops=ceil["gemm_flops"],
        ceiling_copy_bytes_per_s=ceil["copy_bytes_per_s"], **extra)


def layer_step(f, primals, argnums):
    """forward+backward of one layer as it runs inside a model: y = f(*primals), then the
    gradients of `argnums` for a fixed random upstream gradient dy. A loss of the
    benchmark's own (a cast and a sum, and their gradients) would be timed otherwise, the
    same for every provider, and hide part of the layer's difference."""
    primals = list(primals)
    y = f(*primals)
    dy = mx.random.normal(y.shape, key=mx.random.key(7)).astype(y.dtype)
    mx.eval(dy)

    def g(*sub):
        full = list(primals)
        for i, p in zip(argnums, sub):
            full[i] = p
        return [f(*full)]

    return lambda: mx.vjp(g, [primals[i] for i in argnums], [dy])


def probe_layer(n=4096, d=4096, r=16):
    """The GPU probes' layer: x (n, d) and W (d, d) in bfloat16, float32 LoRA A, B and
    DoRA magnitude m, W's cached squared row norms, and W quantized to 4 bits, group 64
    (n = d = 128 in quick mode)."""
    if QUICK:
        n = d = 128
    from mlx_tuner.ops import dora_weight_sq_norm

    k = mx.random.split(mx.random.key(0), 5)
    x = mx.random.normal((n, d), key=k[0]).astype(mx.bfloat16)
    w = (mx.random.normal((d, d), key=k[1]) / d**0.5).astype(mx.bfloat16)
    a = mx.random.normal((d, r), key=k[2]) / d**0.5
    b = mx.random.normal((r, d), key=k[3]) * 0.01
    m = mx.random.uniform(0.5, 1.5, (d,), key=k[4])
    c = dora_weight_sq_norm(w)
    q = mx.quantize(w, group_size=64, bits=4)
    mx.eval(x, w, a, b, m, c, q)
    return x, w, a, b, m, c, q


def probe_cases() -> dict:
    """The GPU probes' cases (probe_gpu.py, probe_host_api.py): name -> a callable that
    builds one call's graph (the caller evaluates it), on probe_layer()'s layer."""
    from mlx_tuner.ops import dora_linear, dora_weight_sq_norm, lora_linear, qlora_linear

    x, w, a, b, m, c, (wq, sc, bi) = probe_layer()

    def grad_of(f, argnums=(0, 1, 2, 3)):
        """The layer's forward+backward from a fixed upstream gradient (as the benchmarks)."""
        return layer_step(f, (x, a, b, m), list(argnums))

    def lora(xx, aa, bb, mm):
        return lora_linear(xx, w, aa, bb, 2.0)

    def dora(xx, aa, bb, mm):
        return dora_linear(xx, w, aa, bb, mm, 2.0, weight_sq_norm=c)

    def base(xx, aa, bb, mm):
        return xx @ w.T

    def qlora(xx, aa, bb, mm):
        return qlora_linear(xx, wq, sc, bi, aa, bb, 2.0, group_size=64, bits=4)

    cq = dora_weight_sq_norm(wq, sc, bi, group_size=64, bits=4)
    mx.eval(cq)

    def qdora(xx, aa, bb, mm):
        return dora_linear(xx, wq, aa, bb, mm, 2.0, scales=sc, biases=bi, group_size=64,
                           bits=4, weight_sq_norm=cq)

    return {
        "base fwd": lambda: base(x, a, b, m),
        "base fwd+bwd": grad_of(base, [0]),
        "lora fwd": lambda: lora(x, a, b, m),
        "lora fwd+bwd": grad_of(lora, [0, 1, 2]),
        "qlora fwd": lambda: qlora(x, a, b, m),
        "qlora fwd+bwd": grad_of(qlora, [0, 1, 2]),
        "dora fwd": lambda: dora(x, a, b, m),
        "dora fwd+bwd": grad_of(dora),
        "qdora fwd": lambda: qdora(x, a, b, m),
        "qdora fwd+bwd": grad_of(qdora),
    }


def kernel_times(fn, reps: int = 5):
    """The CUDA kernels of fn() (evaluated), per call, after 3 warm-up calls, under
    torch.profiler (CUPTI sees the kernels inside MLX's CUDA graphs): (total us, rows of
    (us, launches, kernel name), largest first). The GPU probes' measurement."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        mx.eval(fn())
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            mx.eval(fn())
        torch.cuda.synchronize()
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            per[e.name][0] += getattr(e, "device_time_total", None) or e.cuda_time_total
            per[e.name][1] += 1
    rows = sorted(((us / reps, n / reps, name) for name, (us, n) in per.items()), reverse=True)
    return sum(r[0] for r in rows), rows


@contextmanager
def environ(values: dict):
    """os.environ updated with `values` for the duration, then restored."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def paired(benchmark, fns: dict, *, rounds: int | None = None, warmup: int = 3,
           per_eval: int = 1) -> dict:
    """Time the providers of `fns` side by side: each round runs every one once
    (evaluated), in reverse order every other round, so that the machine's drift (clocks,
    the host, other tenants) falls on all of them alike; on the H200 the same base layer
    measured 263-422 us in separate benchmark rows of one session. With per_eval = k, a
    run is k calls evaluated together and its time is divided by k: a layer as it runs
    inside a training step's graph, where one synchronization serves many layers. The
    benchmark's own time is a whole round. Returns the extra_info of the row: each
    provider's median and IQR per call, and for every provider after the first the median
    of its per-round time ratios to the first (the base)."""
    rounds = 1 if QUICK else (rounds or 30)
    names = list(fns)
    times: dict[str, list] = {n: [] for n in names}

    def run_one(n):
        sync([fns[n]() for _ in range(per_eval)])

    for _ in range(0 if QUICK else warmup):
        for n in names:
            run_one(n)
    def one_round():
        order = names if len(times[names[0]]) % 2 == 0 else names[::-1]  # rounds done so far
        for n in order:
            t = time.perf_counter()
            run_one(n)
            times[n].append((time.perf_counter() - t) / per_eval)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    out = {"paired_rounds": rounds, "paired_base": names[0], "paired_per_eval": per_eval}
    for n in names:
        q1, med, q3 = np.percentile(times[n], [25, 50, 75])
        out[f"paired_{n}_median_s"] = float(med)
        out[f"paired_{n}_iqr_s"] = float(q3 - q1)
    base = np.array(times[names[0]])
    for n in names[1:]:
        out[f"paired_{n}_ratio"] = float(np.median(np.array(times[n]) / base))
    return out


class BackwardOnly:
    """The "backward" mode: the gradients alone. `step()` builds a forward+backward graph
    and returns (outputs, gradients), as layer_step's steps and mx.value_and_grad do.
    MLX evaluates lazily and keeps what it has computed, so once the outputs are evaluated
    (untimed), evaluating the gradients runs only the backward's nodes: what a training
    step spends after its forward. Called, it is the whole step (for warm-up)."""

    def __init__(self, step):
        self.step = step

    def __call__(self):
        return self.step()

    def timed_part(self):
        """Builds a fresh step, evaluates its forward; returns the backward to run."""
        outs, grads = self.step()
        sync(outs)
        return lambda: grads


def mode_fn(f, primals, argnums, mode):
    """A layer's timed function for `mode`: "forward" (f alone), "forward+backward"
    (layer_step: the output and the gradients of `argnums`) or "backward" (the same step,
    its forward evaluated untimed first: BackwardOnly)."""
    if mode == "forward":
        return lambda: f(*primals)
    step = layer_step(f, primals, argnums)
    return BackwardOnly(step) if mode == "backward" else step


def run(benchmark, fn, *, rounds: int | None = None, warmup: int = 2):
    """Time fn() (evaluated) with pytest-benchmark; a single round in quick mode. For a
    BackwardOnly, every round's forward is evaluated before its timer starts."""
    rounds = 1 if QUICK else (rounds or 10)
    warmup = 0 if QUICK else warmup
    if isinstance(fn, BackwardOnly):
        return benchmark.pedantic(lambda backward: sync(backward()),
                                  setup=lambda: ((fn.timed_part(),), {}), rounds=rounds,
                                  warmup_rounds=warmup, iterations=1)
    return benchmark.pedantic(lambda: sync(fn()), rounds=rounds, warmup_rounds=warmup,
                              iterations=1)
