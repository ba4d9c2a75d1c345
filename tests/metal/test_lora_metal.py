"""The Metal LoRA kernels (metal/lora.h), forward and backward, in the emulator: every
instantiation, odd sizes spanning several tiles, 8 simdgroup schedules each, against a
float64 oracle. Launch
geometry and kernel names come from the host's own functions (through the bindings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

emulator = pytest.importorskip("tests.metal.emulator")
ext = pytest.importorskip("mlx_tuner._ext")

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]
# (activation dtype, LoRA parameter dtype): every pair metal/lora.metal instantiates
PAIRS = [("float32", "float32"), ("float16", "float16"), ("float16", "float32"),
         ("bfloat16", "bfloat16"), ("bfloat16", "float32")]
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values -> the bytes a Metal buffer of `dtype` holds (bf16 as uint16 bits)."""
    if dtype == "float32":
        return a.astype(np.float32)
    if dtype == "float16":
        return a.astype(np.float16)
    bits = a.astype(np.float32).view(np.uint32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (bits >> 16).astype(np.uint16)


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


@pytest.fixture(scope="module")
def lib():
    return emulator.compile_metal(ROOT / "metal" / "lora.metal",
                                  include_dirs=emulator.metal_include_dirs())


@pytest.mark.parametrize("t,u", PAIRS)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("n,din,dout,r", [(37, 45, 41, 5), (9, 20, 70, 20)])
def test_lora_forward_kernels(lib, t, u, has_bias, n, din, dout, r):
    rng = np.random.default_rng(n + r)
    # Inputs rounded to their dtypes first: the oracle sees exactly what the kernel reads.
    xd = decode(encode(rng.standard_normal((n, din)), t), t)
    x = decode(encode(rng.standard_normal((n, din)), t), t)
    w = decode(encode(rng.standard_normal((dout, din)) / np.sqrt(din), t), t)
    a = decode(encode(rng.standard_normal((din, r)) / np.sqrt(din), u), u)
    b = decode(encode(rng.standard_normal((r, dout)), u), u)
    bias = decode(encode(rng.standard_normal(dout), t), t)
    scale = np.float32(1.5)

    name, tgs, threads = ext.metal_launch_lora_xa(n, r, t, u)
    runs = emulator.run_seeds(
        lib, name, seeds=range(8), threadgroups=tgs, threads=threads,
        buffers=[encode(xd, t), encode(a, u), np.empty((n, r), np.float32), np.int32(n),
                 np.int32(din), np.int32(r)], outputs=[2])
    xa = runs[0][2]
    xa_ref = xd @ a
    assert np.max(np.abs(xa - xa_ref)) <= 1e-5 * max(1.0, np.abs(xa_ref).max()) * np.sqrt(din)

    name, tgs, threads = ext.metal_launch_lora_linear(n, dout, t, u, has_bias)
    y_buf = encode(np.zeros((n, dout)), t)
    runs = emulator.run_seeds(
        lib, name, seeds=range(8), threadgroups=tgs, threads=threads,
        buffers=[encode(x, t), encode(w, t), xa, encode(b, u),
                 encode(bias if has_bias else np.zeros(1), t), y_buf, np.int32(n),
                 np.int32(din), np.int32(dout), np.int32(r), scale],
        outputs=[5])
    y = decode(runs[0][5], t)
    y_ref = x @ w.T + float(scale) * (xa.astype(np.float64) @ b) + (bias if has_bias else 0)
    err = np.max(np.abs(y - y_ref))
    # One rounding to t at the end (float accumulation), plus float32 sums over din.
    assert err <= TOL[t] * max(1.0, np.abs(y_ref).max()), (name, err)


def run(lib, launch, buffers, out):
    """The kernel of `launch` (the host's name and geometry) under 8 schedules."""
    name, tgs, threads = launch
    runs = emulator.run_seeds(lib, name, seeds=range(8), threadgroups=tgs, threads=threads,
                              buffers=buffers, outputs=[out])
    return runs[0][out]


def check(got, ref, tol, what):
    err = np.max(np.abs(got - ref), initial=0.0)
    assert err <= tol * max(1.0, np.abs(ref).max(initial=0.0)), (what, err)


@pytest.mark.parametrize("t,u", PAIRS)
@pytest.mark.parametrize("n,din,dout,r", [(37, 45, 41, 5), (9, 20, 70, 20)])
def test_lora_backward_kernels(lib, t, u, n, din, dout, r):
    rng = np.random.default_rng(n + r + 1)
    # Inputs rounded to their dtypes first; xa as the forward saves it (float32).
    dy = decode(encode(rng.standard_normal((n, dout)), t), t)
    xd = decode(encode(rng.standard_normal((n, din)), t), t)
    w = decode(encode(rng.standard_normal((dout, din)) / np.sqrt(din), t), t)
    a = decode(encode(rng.standard_normal((din, r)) / np.sqrt(din), u), u)
    b = decode(encode(rng.standard_normal((r, dout)), u), u)
    xa = rng.standard_normal((n, r)).astype(np.float32)
    scale = np.float32(1.5)
    s = float(scale)
    dims = [np.int32(n), np.int32(din), np.int32(dout), np.int32(r), scale]

    # g = dy B^T, float32: float32 sums over dout (no rounding to t).
    g = run(lib, ext.metal_launch_lora_g(n, t, u),
            [encode(dy, t), encode(b, u), np.empty((n, r), np.float32), np.int32(n),
             np.int32(dout), np.int32(r)], 2)
    g_ref = dy @ b.T
    check(g, g_ref, 1e-5 * np.sqrt(dout), "g")
    g64 = g.astype(np.float64)  # the next kernels' operand, as on the device

    # dx = dy W + s g A^T (both pairs), dy W (x_dropped given), dx_d = s g A^T.
    for base, lora, ref in [(True, True, dy @ w + s * (g64 @ a.T)), (True, False, dy @ w),
                            (False, True, s * (g64 @ a.T))]:
        launch = ext.metal_launch_lora_dx(n, din, t, u, base, lora)
        a_buf = encode(a, u if lora else t)  # dy W alone reads no A (typed T there)
        dx = run(lib, launch, [encode(dy, t), encode(w, t), g, a_buf,
                               encode(np.zeros((n, din)), t), *dims], 4)
        check(decode(dx, t), ref, TOL[t], launch[0])

    # dA = s x_d^T g (in, r) and dB = s xa^T dy (r, out), in the LoRA parameters' dtype.
    da = run(lib, ext.metal_launch_lora_da(din, r, t, u),
             [encode(xd, t), g, encode(np.zeros((din, r)), u), np.int32(n), np.int32(din),
              np.int32(r), scale], 2)
    check(decode(da, u), s * (xd.T @ g64), TOL[u] * np.sqrt(n), "dA")
    db = run(lib, ext.metal_launch_lora_db(r, dout, t, u),
             [xa, encode(dy, t), encode(np.zeros((r, dout)), u), np.int32(n), np.int32(r),
              np.int32(dout), scale], 2)
    check(decode(db, u), s * (xa.astype(np.float64).T @ dy), TOL[u] * np.sqrt(n), "dB")


@pytest.mark.parametrize("t,u", [("float32", "float32"), ("bfloat16", "float32")])
def test_lora_parameter_gradients_of_an_empty_batch_are_zeros(lib, t, u):
    din, dout, r = 20, 41, 5
    da = run(lib, ext.metal_launch_lora_da(din, r, t, u),
             [encode(np.zeros((1, din)), t), np.zeros((1, r), np.float32),
              encode(np.zeros((din, r)), u), np.int32(0), np.int32(din), np.int32(r),
              np.float32(1.5)], 2)
    db = run(lib, ext.metal_launch_lora_db(r, dout, t, u),
             [np.zeros((1, r), np.float32), encode(np.zeros((1, dout)), t),
              encode(np.zeros((r, dout)), u), np.int32(0), np.int32(r), np.int32(dout),
              np.float32(1.5)], 2)
    assert not decode(da, u).any() and not decode(db, u).any()


def test_launch_rejects_unknown_dtype_pairs():
    with pytest.raises(ValueError, match=r"\[lora_linear\] no Metal kernel"):
        ext.metal_launch_lora_linear(4, 4, "bfloat16", "float16", False)
    with pytest.raises(ValueError, match=r"\[lora_linear\] no Metal kernel"):
        ext.metal_launch_lora_g(4, "float16", "bfloat16")
    with pytest.raises(ValueError, match=r"\[lora_linear\] no Metal kernel"):
        ext.metal_launch_lora_db(4, 4, "float64", "float32")
    with pytest.raises(ValueError, match=r"\[lora_linear\] the dx kernel needs"):
        ext.metal_launch_lora_dx(4, 4, "float32", "float32", False, False)
