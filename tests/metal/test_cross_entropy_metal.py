"""metal/cross_entropy.metal in the emulator: forward, dh, dW/db against a float64 oracle,
every dtype, 8 schedules each, launched with the host's own numbers
(_ext.metal_launch_linear_cross_entropy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.metal.emulator import compile_metal, metal_include_dirs, run_seeds

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]
SEEDS = range(8)
DTYPES = ["float32", "float16", "bfloat16"]
TOL = {"float32": 1e-4, "float16": 1e-3, "bfloat16": 1e-3}  # inputs are exact in the dtype


@pytest.fixture(scope="module")
def lib():
    return compile_metal(ROOT / "metal" / "cross_entropy.metal", metal_include_dirs())


@pytest.fixture(scope="module")
def ext():
    from mlx_tuner.ops import _extension
    e = _extension.extension()
    if e is None or not hasattr(e, "metal_launch_linear_cross_entropy"):
        pytest.skip("the extension with the cross_entropy family is not built")
    return e


def _enc(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values (already representable) -> the kernel's buffer dtype."""
    if dtype == "bfloat16":
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(np.float16 if dtype == "float16" else np.float32)


def _dec(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64)


def _problem(N, d, V, dtype, rng):
    h = _dec(_enc(rng.standard_normal((N, d)).astype(np.float32), dtype), dtype)
    w = _dec(_enc(0.5 * rng.standard_normal((V, d)).astype(np.float32), dtype), dtype)
    b = _dec(_enc(rng.standard_normal(V).astype(np.float32), dtype), dtype)
    y = rng.integers(0, V, N).astype(np.int32)
    y[1] = -100  # an ignored token
    g = rng.uniform(0.5, 1.5, N).astype(np.float32)
    g[2] = 0.0  # a masked token
    return h, w, b, y, g


def _oracle(h, w, b, y, g):
    z = h @ w.T + b
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    valid = (y >= 0) & (y < w.shape[0])
    rows = np.arange(len(y))
    loss = np.where(valid, lse - z[rows, np.where(valid, y, 0)], 0.0)
    G = np.exp(z - lse[:, None])
    G[rows[valid], y[valid]] -= 1.0
    G *= (g * valid)[:, None]
    return loss, lse, G @ w, G.T @ h, G.sum(axis=0)


def _launch(ext, kernel, rows, dtype):
    name, tg, th = ext.metal_launch_linear_cross_entropy(kernel, rows, dtype)
    return name, dict(threadgroups=tuple(tg), threads=tuple(th))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 300), (3, 33, 256), (4, 1, 1)], ids=str)
def test_forward(lib, ext, dtype, shape):
    N, d, V = shape
    h, w, b, y, g = _problem(N, d, V, dtype, np.random.default_rng(N * d + V))
    loss, lse, *_ = _oracle(h, w, b, y, g)
    name, grid = _launch(ext, "forward", N, dtype)
    bufs = [_enc(h, dtype), _enc(w, dtype), _enc(b, dtype), y, np.empty(N, np.float32),
            np.empty(N, np.float32), np.int32(d), np.int32(V), np.int32(1)]
    for out in run_seeds(lib, name, seeds=SEEDS, buffers=bufs, outputs=[4, 5], **grid):
        np.testing.assert_allclose(out[5], lse, rtol=TOL[dtype], atol=TOL[dtype])
        np.testing.assert_allclose(out[4], loss, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7, 300), (3, 33, 600)], ids=str)
def test_backward(lib, ext, dtype, shape):
    N, d, V = shape
    h, w, b, y, g = _problem(N, d, V, dtype, np.random.default_rng(N + d * V))
    _, lse, dh, dw, db = _oracle(h, w, b, y, g)
    lse32 = lse.astype(np.float32)
    tol = TOL[dtype] if dtype == "float32" else 2e-2  # outputs rounded to the dtype
    common = [_enc(h, dtype), _enc(w, dtype), _enc(b, dtype), y, lse32, g]

    name, grid = _launch(ext, "backward_dh", N, dtype)
    bufs = common + [np.empty((N, d), np.float32), _enc(np.zeros((N, d), np.float32), dtype),
                     np.int32(d), np.int32(V), np.int32(1)]
    for out in run_seeds(lib, name, seeds=SEEDS, buffers=bufs, outputs=[6, 7], **grid):
        np.testing.assert_allclose(_dec(out[7], dtype), dh, rtol=tol, atol=tol)

    name, grid = _launch(ext, "backward_dw", V, dtype)
    bufs = common + [np.empty((V, d), np.float32), _enc(np.zeros((V, d), np.float32), dtype),
                     _enc(np.zeros(V, np.float32), dtype), np.int32(N), np.int32(d),
                     np.int32(V), np.int32(1), np.int32(1), np.int32(1)]
    for out in run_seeds(lib, name, seeds=SEEDS[:2] if V > 300 else SEEDS, buffers=bufs,
                         outputs=[6, 7, 8], **grid):
        np.testing.assert_allclose(_dec(out[7], dtype), dw, rtol=tol, atol=tol)
        np.testing.assert_allclose(_dec(out[8], dtype), db, rtol=tol, atol=tol)


def test_launch_errors(ext):
    with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] unknown Metal kernel"):
        ext.metal_launch_linear_cross_entropy("sideways", 4, "float32")
    name, tg, th = ext.metal_launch_linear_cross_entropy("forward", 7, "float16")
    assert (name, tuple(tg), tuple(th)) == ("lce_forward_float16", (7, 1, 1), (256, 1, 1))
