"""metal/divergence.metal in the Metal emulator: every instantiation (KL / JS x forward /
backward dq, dp, dqdp x float32 / float16 / bfloat16), launched with the geometry the
host code uses (_ext.metal_launch_*), under 8 random simdgroup schedules (bit-identical
results required: a race would show), against a float64 oracle."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from tests.metal.emulator import compile_metal, run_seeds

pytestmark = pytest.mark.metal_emulator

ROOT = Path(__file__).resolve().parents[2]
SEEDS = range(8)
DTYPES = ["float32", "float16", "bfloat16"]
# V: a single element, odd, below one sweep, several sweeps of a 1024-thread group.
SHAPES = [(2, 1), (3, 37), (2, 1001), (2, 4099)]
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def lib():
    return compile_metal(ROOT / "metal" / "divergence.metal", include_dirs=[str(ROOT)])


@pytest.fixture(scope="module")
def ext():
    from mlx_tuner.ops import _extension

    e = _extension.extension()
    if e is None or not hasattr(e, "metal_launch_kl_div_forward"):
        pytest.skip("the extension (with the divergence family) is not built")
    return e


def to_buffer(x: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values -> the bytes a Metal buffer of `dtype` holds."""
    if dtype == "bfloat16":
        return np.array(mx.array(x.astype(np.float32)).astype(mx.bfloat16).view(mx.uint16))
    return x.astype(np.float32 if dtype == "float32" else np.float16)


def from_buffer(b: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.array(mx.array(b).view(mx.bfloat16).astype(mx.float32), dtype=np.float64)
    return b.astype(np.float64)


def oracle(op, q, p, cot):
    def log_softmax(x):
        m = np.max(x, -1, keepdims=True)
        return x - m - np.log(np.sum(np.exp(x - m), -1, keepdims=True))

    def plog(P, a, b):
        live = P > 0
        return np.where(live, P * (np.where(live, a, 0) - np.where(live, b, 0)), 0.0)

    lq, lp = log_softmax(q), log_softmax(p)
    Q, P = np.exp(lq), np.exp(lp)
    c = cot[:, None]
    if op == "kl_div":
        val = plog(P, lp, lq).sum(-1)
        return val, c * (Q - P), c * plog(P, lp, lq + val[:, None])
    with np.errstate(divide="ignore"):
        lm = np.log(0.5 * (P + Q))
    klp, klq = plog(P, lp, lm).sum(-1), plog(Q, lq, lm).sum(-1)
    return (0.5 * (klp + klq), 0.5 * c * plog(Q, lq, lm + klq[:, None]),
            0.5 * c * plog(P, lp, lm + klp[:, None]))


def close(got, want, dtype, what):
    fin = np.isfinite(want)
    assert np.array_equal(np.isfinite(got), fin), f"{what}: non-finite mismatch"
    scale = max(1.0, float(np.max(np.abs(want[fin]), initial=0)))
    err = float(np.max(np.abs(got[fin] - want[fin]), initial=0))
    assert err <= TOL[dtype] * scale, f"{what}: error {err:.3g} > {TOL[dtype] * scale:.3g}"


def inputs(rows, V, dtype, masked=False):
    rng = np.random.default_rng(rows * 100003 + V)
    q, p = 3 * rng.standard_normal((rows, V)), 3 * rng.standard_normal((rows, V))
    if masked and V > 1:
        m = rng.random((rows, V)) < 0.3
        m[:, 0] = False  # keep every row alive
        q[m], p[m] = -np.inf, -np.inf
    qb, pb = to_buffer(q, dtype), to_buffer(p, dtype)
    return qb, pb, from_buffer(qb, dtype), from_buffer(pb, dtype)


def run_forward(lib, ext, op, qb, pb, dtype):
    rows, V = qb.shape
    name, tgs, threads = getattr(ext, f"metal_launch_{op}_forward")(rows, V, dtype)
    out = np.empty(rows, qb.dtype)
    stats = np.empty((rows, 6), np.float32)
    res = run_seeds(lib, name, seeds=SEEDS, threadgroups=tuple(tgs), threads=tuple(threads),
                    buffers=[qb, pb, out, stats, np.int32(V)], outputs=[2, 3])
    return res[0][2], res[0][3]


@pytest.mark.parametrize("op", ["kl_div", "js_div"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward(lib, ext, op, dtype, shape):
    rows, V = shape
    qb, pb, q, p = inputs(rows, V, dtype, masked=shape == (2, 1001))
    cot = np.linspace(0.5, 1.5, rows).astype(np.float32)
    val, dq, dp = oracle(op, q, p, cot.astype(np.float64))
    out, stats = run_forward(lib, ext, op, qb, pb, dtype)
    close(from_buffer(out, dtype), val, dtype, f"{op} forward")
    for gq, gp in [(True, False), (False, True), (True, True)]:
        name, tgs, threads = getattr(ext, f"metal_launch_{op}_backward")(rows, V, dtype, gq, gp)
        bq, bp = np.zeros_like(qb), np.zeros_like(pb)
        outs = ([4] if gq else []) + ([5] if gp else [])
        res = run_seeds(lib, name, seeds=SEEDS, threadgroups=tuple(tgs),
                        threads=tuple(threads),
                        buffers=[qb, pb, stats, cot, bq, bp, np.int32(V)], outputs=outs)[0]
        if gq:
            close(from_buffer(res[4], dtype), dq, dtype, f"{name} dq")
        else:  # an unrequested gradient is never written
            assert not np.any(res[4].view(np.uint8)), f"{name} wrote dq"
        if gp:
            close(from_buffer(res[5], dtype), dp, dtype, f"{name} dp")
        else:
            assert not np.any(res[5].view(np.uint8)), f"{name} wrote dp"


@pytest.mark.parametrize("op", ["kl_div", "js_div"])
def test_huge_logits_forward(lib, ext, op):
    rows, V = 2, 513
    rng = np.random.default_rng(7)
    q = 1e4 * rng.standard_normal((rows, V))
    p = q + rng.standard_normal((rows, V))
    qb, pb = to_buffer(q, "float32"), to_buffer(p, "float32")
    out, _ = run_forward(lib, ext, op, qb, pb, "float32")
    val = oracle(op, qb.astype(np.float64), pb.astype(np.float64), np.ones(rows))[0]
    close(out.astype(np.float64), val, "float32", f"{op} huge logits")
