"""metal/qlora.metal in the Metal emulator: every instantiation, >= 8 schedules each,
dispatched with the launch geometry of the Metal host code (_ext.metal_launch_qlora_*),
against numpy in float64 from the same (rounded) inputs."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

emu = pytest.importorskip("tests.metal.emulator", reason="the Metal emulator is not merged")
from mlx_tuner.ops import _extension  # noqa: E402

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]
DTYPES = ["float32", "float16", "bfloat16"]
BITS = [2, 3, 4, 5, 6, 8]
TOL = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def ext():
    e = _extension.extension()
    if e is None or not hasattr(e, "metal_launch_qlora_gemm"):
        pytest.skip("the extension with the qlora family is not built")
    return e


@pytest.fixture(scope="module")
def lib():
    return emu.compile_metal(ROOT / "metal" / "qlora.metal", include_dirs=[str(ROOT)])


def to_dev(a, dtype):
    """float64 -> (device buffer, the float64 values it holds)."""
    a = np.asarray(a, np.float32)
    if dtype == "float32":
        return a, a.astype(np.float64)
    if dtype == "float16":
        h = a.astype(np.float16)
        return h, h.astype(np.float64)
    u = a.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def from_dev(a, dtype):
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def check(got, want, dtype):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * scale, f"error {err:.3g} > {TOL[dtype] * scale:.3g}"


@pytest.mark.parametrize("fwd", [True, False], ids=["fwd", "bwd"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm(ext, lib, dtype, bits, fwd):
    n, k, m, r, gs = 37, 96, 19, 5, 32  # odd sizes: partial tiles on every edge
    rng = np.random.default_rng(bits)
    wq, s, b = mx.quantize(mx.array(rng.standard_normal((n, k)), mx.float32), group_size=gs,
                           bits=bits)
    s_dev, s64 = to_dev(np.array(s), dtype)
    b_dev, b64 = to_dev(np.array(b), dtype)
    # The weight the kernel sees: codes times the scales / biases it is given.
    w64 = np.array(mx.dequantize(wq, mx.array(s64.astype(np.float32)),
                                 mx.array(b64.astype(np.float32)), group_size=gs, bits=bits),
                   np.float64)
    n_out, kred = (n, k) if fwd else (k, n)
    x_dev, x64 = to_dev(rng.standard_normal((m, kred)), dtype)
    lora_l = rng.standard_normal((m, r)).astype(np.float32)
    if fwd:  # R = B (r, n): R[q, j] = B[q * n + j]
        rmat = rng.standard_normal((r, n)).astype(np.float32)
        rs_q, rs_j, rr = n, 1, rmat.astype(np.float64)
    else:  # R = Aᵀ with A (k, r): R[q, j] = A[j * r + q]
        rmat = rng.standard_normal((k, r)).astype(np.float32)
        rs_q, rs_j, rr = 1, r, rmat.astype(np.float64).T
    bias_dev, bias64 = to_dev(rng.standard_normal(n_out), dtype)
    alpha = 0.75
    want = x64 @ (w64.T if fwd else w64) + alpha * lora_l.astype(np.float64) @ rr
    want = want + (bias64 if fwd else 0.0)
    name, tgs, threads = ext.metal_launch_qlora_gemm(fwd, m, n_out, bits, dtype)
    assert name == f"qlora_gemm_{'fwd' if fwd else 'bwd'}_{dtype}_b{bits}"
    out = np.zeros((m, n_out), x_dev.dtype)
    bufs = [x_dev, np.array(wq).view(np.uint8), s_dev, b_dev, lora_l, rmat, bias_dev, out,
            np.int32(m), np.int32(n_out), np.int32(kred), np.int32(gs), np.int32(r),
            np.int32(rs_q), np.int32(rs_j), np.float32(alpha), np.int32(1), np.int32(int(fwd))]
    results = emu.run_seeds(lib, name, threadgroups=tgs, threads=threads, buffers=bufs,
                            outputs=[7])
    check(from_dev(results[0][7], dtype), want, dtype)


@pytest.mark.parametrize("p_dtype, o_dtype", [("float32", "float32"), ("float16", "float32"),
                                              ("bfloat16", "float32"), ("float32", "float16"),
                                              ("float32", "bfloat16")])
def test_skinny(ext, lib, p_dtype, o_dtype):
    # dA-like use: out (ni, nq) = alpha Pᵀ-strided · Q, P read through strides (1, ni).
    ni, nq, nt = 70, 21, 45
    rng = np.random.default_rng(7)
    p_dev, p64 = to_dev(rng.standard_normal((nt, ni)), p_dtype)  # P[i, t] = p[t * ni + i]
    q = rng.standard_normal((nt, nq)).astype(np.float32)
    alpha = 1.5
    want = alpha * p64.T @ q.astype(np.float64)
    name, tgs, threads = ext.metal_launch_qlora_skinny(ni, nq, p_dtype, o_dtype)
    out = np.zeros((ni, nq), np.float32 if o_dtype == "float32" else
                   (np.float16 if o_dtype == "float16" else np.uint16))
    bufs = [p_dev, q, out, np.int64(1), np.int64(ni), np.int64(nq), np.int64(1), np.int64(nq),
            np.int64(1), np.int32(ni), np.int32(nq), np.int32(nt), np.float32(alpha)]
    results = emu.run_seeds(lib, name, threadgroups=tgs, threads=threads, buffers=bufs,
                            outputs=[2])
    check(from_dev(results[0][2], o_dtype), want, o_dtype)
