"""metal/dora.metal in the Metal emulator, over 8 schedules each, with the dispatch numbers
and kernel names of the host code (_ext.metal_launch_dora_*): every DoRARowSqNorm
instantiation (dense and affine-quantized W), the Gram matrix and 1 / n of DoRAInvNorm, the
column scale of DoRAScale and its backward (DoRAScaleVJP), float32/float16/bfloat16,
against a float64 numpy oracle and the primitives' CPU kernels."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def ext():
    e = _extension.extension()
    if e is None or not hasattr(e, "metal_launch_dora_row_sq_norm"):
        pytest.skip("the extension (dora family) is not built")
    return e


def raw(a: mx.array) -> np.ndarray:
    """The bytes of an MLX array as numpy (bfloat16 as uint16)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def dequantize_f64(wq, sc, bi, gs, bits):
    """mx.quantize's layout decoded in float64: a little-endian bit stream of codes."""
    rows = wq.shape[0]
    stream = np.unpackbits(np.array(wq).view(np.uint8).reshape(rows, -1), axis=1,
                           bitorder="little")
    codes = stream.reshape(rows, -1, bits) @ (1 << np.arange(bits))
    f64 = lambda a: np.array(a.astype(mx.float32), np.float64).repeat(gs, 1)  # noqa: E731
    return f64(sc) * codes + f64(bi)


@pytest.fixture(scope="module")
def lib(metal_emu):
    return metal_emu.compile_metal(ROOT / "metal/dora.metal",
                                   include_dirs=[str(ROOT / "metal")])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,k", [(3, 100), (5, 517)])
def test_row_sq_dense(metal_emu, lib, dtype, rows, k):
    w = mx.random.normal((rows, k)).astype(DTYPES[dtype])
    name, tg, th = ext().metal_launch_dora_row_sq_norm(rows, dtype, 0)
    res = metal_emu.run_seeds(lib, name, threadgroups=tg, threads=th,
                              buffers=[raw(w), np.empty(rows, np.float32), np.int32(k)],
                              outputs=[1])
    want = (np.array(w.astype(mx.float32), np.float64) ** 2).sum(1)
    np.testing.assert_allclose(res[0][1], want, rtol=2e-5)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_row_sq_quantized(metal_emu, lib, dtype, bits):
    rows, k, gs = 3, 384, 64 if bits % 2 else 128
    w = mx.random.normal((rows, k)).astype(DTYPES[dtype])
    wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
    name, tg, th = ext().metal_launch_dora_row_sq_norm(rows, dtype, bits)
    res = metal_emu.run_seeds(
        lib, name, threadgroups=tg, threads=th,
        buffers=[np.array(wq).view(np.uint8), raw(sc), raw(bi), np.empty(rows, np.float32),
                 np.int32(k), np.int32(gs)],
        outputs=[3])
    want = (dequantize_f64(wq, sc, bi, gs, bits) ** 2).sum(1)
    np.testing.assert_allclose(res[0][3], want, rtol=2e-4)
    # the CPU kernel of the same primitive agrees
    cpu = ext().dora_weight_sq_norm(wq, sc, bi, group_size=gs, bits=bits)
    np.testing.assert_allclose(np.array(cpu), want, rtol=2e-4)


# ------------------------------------------------------------ DoRAInvNorm, DoRAScale(VJP)
MAX_RANK = 32  # kInvNormMaxRank (csrc/ops/dora.h)
NP_RAW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def rounded(a: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, mx.array]:
    """float64 values rounded to `dtype`: (the buffer's bytes, the values in float64, the
    MLX array), so that the oracle sees exactly what the kernel reads."""
    m = mx.array(np.asarray(a, np.float32)).astype(DTYPES[dtype])
    return raw(m), np.array(m.astype(mx.float32), np.float64), m


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    """A kernel's output buffer as float64 (bfloat16 from its uint16 bits)."""
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


def launch(lib, metal_emu, spec, buffers, outputs):
    """Runs the host's (name, threadgroups, threads) under 8 schedules: seed 0's buffers."""
    name, tg, th = spec
    return metal_emu.run_seeds(lib, name, threadgroups=tg, threads=th, buffers=buffers,
                               outputs=outputs)[0]


def run_gram(lib, metal_emu, a32: np.ndarray) -> np.ndarray:
    k, r = a32.shape
    res = launch(lib, metal_emu, ext().metal_launch_dora_gram(r),
                 [a32, np.empty((r, r), np.float32), np.int32(k), np.int32(r)], [1])
    return res[1]


@pytest.mark.parametrize("k,r", [(1, 1), (300, 1), (517, 7), (300, MAX_RANK), (5, MAX_RANK)])
def test_gram(metal_emu, lib, k, r):
    rng = np.random.default_rng(k + r)
    a = rng.uniform(-1, 1, (k, r)).astype(np.float32)
    g = run_gram(lib, metal_emu, a)
    a64 = a.astype(np.float64)
    want = a64.T @ a64
    bound = 1e-6 * np.sqrt(k) * (np.abs(a64).T @ np.abs(a64))  # float32 sums of k terms
    assert np.all(np.abs(g - want) <= bound + 1e-30), np.max(np.abs(g - want))
    assert np.array_equal(g, g.T)  # the same products summed in the same order


def inv_norm_inputs(dtype, k, out, r, p_transposed, seed):
    """P = W A in dtype (as P^T when p_transposed), B, A, c = ||W_i||^2, with column 0 of
    zero norm (W_0 = 0, B[:, 0] = 0) and column 1 of negative n^2 (c_1 < 0: the clamp)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, k)) / np.sqrt(k)
    w[0] = 0.0
    a = (rng.uniform(-1, 1, (k, r)) / np.sqrt(k)).astype(np.float32)
    b = (rng.standard_normal((r, out)) * 0.2).astype(np.float32)
    b[:, :2] = 0.0
    c = (w**2).sum(1).astype(np.float32)
    c[1] = -0.5
    p = w @ a.astype(np.float64)
    p_raw, p64, p_mx = rounded(p.T if p_transposed else p, dtype)
    return a, b, c, p_raw, (p64.T if p_transposed else p64), p_mx


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("p_transposed", [False, True])
@pytest.mark.parametrize("k,out,r", [(37, 300, 1), (64, 517, 5), (45, 41, MAX_RANK)])
def test_inv_norm(metal_emu, lib, dtype, p_transposed, k, out, r):
    s = 1.5
    a, b, c, p_raw, p64, p_mx = inv_norm_inputs(dtype, k, out, r, p_transposed, out + r)
    g = run_gram(lib, metal_emu, a)  # G as the device computes it, then 1 / n from it
    res = launch(lib, metal_emu, ext().metal_launch_dora_inv_norm(out, dtype),
                 [p_raw, b, g, c, np.empty(out, np.float32), np.int32(out), np.int32(r),
                  np.float32(s), np.int32(p_transposed)], [4])
    got = res[4].astype(np.float64)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    n2 = (c + 2 * s * np.einsum("ki,ik->i", b64, p64)
          + s * s * np.einsum("ki,kl,li->i", b64, a64.T @ a64, b64))
    with np.errstate(divide="ignore"):
        want = 1.0 / np.sqrt(np.maximum(n2, 0.0))
    assert np.isposinf(got[:2]).all() and np.isposinf(want[:2]).all()  # as on CUDA
    np.testing.assert_allclose(got, want, rtol=2e-5)
    # the CPU kernel of the same primitive (float64 sums) agrees, infinities included
    cpu = ext()._dora_inv_norm(p_mx, mx.array(b), mx.array(a), mx.array(c), s, p_transposed)
    np.testing.assert_allclose(got, np.array(cpu), rtol=2e-5)


def scale_inputs(dtype, rows, cols, seed):
    rng = np.random.default_rng(seed)
    z = rounded(rng.standard_normal((rows, cols)) * 3, dtype)
    sv = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    bias = rounded(rng.standard_normal(cols), dtype)
    return z, sv, bias


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("rows,cols", [(7, 517), (13, 41), (1, 300)])
def test_scale(metal_emu, lib, dtype, has_bias, rows, cols):
    (z_raw, z64, z_mx), sv, (b_raw, b64, b_mx) = scale_inputs(dtype, rows, cols, rows + cols)
    res = launch(lib, metal_emu, ext().metal_launch_dora_scale(rows, cols, dtype, has_bias),
                 [z_raw, sv, b_raw if has_bias else z_raw[:1],
                  np.empty((rows, cols), NP_RAW[dtype]), np.int32(rows), np.int32(cols)], [3])
    y = res[3]
    # float32 maths, z * sv rounded to float32 before the bias, one rounding to dtype: the
    # bits of DoRAScale's CPU kernel, and in float32 those of MLX's multiply then add.
    cpu = ext()._dora_scale(z_mx, mx.array(sv), b_mx if has_bias else None)
    np.testing.assert_array_equal(y, raw(cpu))
    if dtype == "float32":
        ref = mx.multiply(z_mx, mx.array(sv))
        np.testing.assert_array_equal(y, np.array(mx.add(ref, b_mx) if has_bias else ref))
    # and the float64 oracle within those two roundings (float32's product, dtype's result)
    prod = z64 * sv
    want = prod + (b64 if has_bias else 0.0)
    half_ulp = {"float32": 2**-24, "float16": 2**-11, "bfloat16": 2**-8}[dtype]
    bound = 2**-24 * np.abs(prod) + half_ulp * np.abs(want)
    assert np.all(np.abs(decode(y, dtype) - want) <= bound * (1 + 1e-6) + 1e-30)


# The wanted gradients (dz, dsv, dbias); dz alone runs the forward's kernel (no bias).
WANTS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True),
         (True, False, True), (False, True, True), (True, True, False)]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("want", WANTS, ids=lambda w: "".join("zsb"[i] for i in range(3) if w[i]))
@pytest.mark.parametrize("rows,cols", [(150, 41), (7, 517)])
def test_scale_vjp(metal_emu, lib, dtype, want, rows, cols):
    want_dz, want_sv, want_b = want
    (dy_raw, dy64, dy_mx), sv, _ = scale_inputs(dtype, rows, cols, rows * cols)
    z_raw, z64, _ = rounded(np.random.default_rng(cols).standard_normal((rows, cols)), dtype)
    e = ext()
    dz = None
    if not want_sv and not want_b:
        res = launch(lib, metal_emu, e.metal_launch_dora_scale(rows, cols, dtype, False),
                     [dy_raw, sv, dy_raw[:1], np.empty((rows, cols), NP_RAW[dtype]),
                      np.int32(rows), np.int32(cols)], [3])
        dz = res[3]
    else:
        spec = e.metal_launch_dora_scale_vjp(rows, cols, dtype)
        tiles = spec[1][1]
        assert spec[1][0] * 32 >= cols and tiles >= 1
        part = lambda on: np.empty((tiles, cols) if on else 1, np.float32)  # noqa: E731
        outs = [3] * want_dz + [4] * want_sv + [5] * want_b
        res = launch(lib, metal_emu, spec,
                     [dy_raw, sv, z_raw if want_sv else dy_raw[:1],
                      np.empty((rows, cols) if want_dz else 1, NP_RAW[dtype]),
                      part(want_sv), part(want_b), np.int32(rows), np.int32(cols),
                      np.int32(want_dz), np.int32(want_sv), np.int32(want_b)], outs)
        dz = res[3] if want_dz else None
        res = launch(lib, metal_emu, e.metal_launch_dora_scale_colsum(cols, dtype),
                     [res[4], res[5], np.empty(cols if want_sv else 1, np.float32),
                      np.empty(cols if want_b else 1, NP_RAW[dtype]), np.int32(tiles),
                      np.int32(cols), np.int32(want_sv), np.int32(want_b)],
                     [2] * want_sv + [3] * want_b)
        bound = 1e-6 * rows  # float32 sums over the rows of O(1) terms
        if want_sv:
            want_dsv = (dy64 * z64).sum(0)
            assert np.max(np.abs(res[2] - want_dsv)) <= bound * max(1.0, np.abs(want_dsv).max())
        if want_b:
            want_db = dy64.sum(0)
            tol = {"float32": 1e-6, "float16": 2**-11, "bfloat16": 2**-8}[dtype]
            err = np.abs(decode(res[3], dtype) - want_db)
            assert np.all(err <= tol * np.abs(want_db) + bound * max(1.0, np.abs(want_db).max()))
    if want_dz:
        # dz = dy * sv rounded once: the bits of DoRAScaleVJP's CPU kernel
        cpu_dz, = mx.vjp(lambda zz: ext()._dora_scale(zz, mx.array(sv)), [dy_mx], [dy_mx])[1]
        np.testing.assert_array_equal(dz, raw(cpu_dz))


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_scale_vjp_of_an_empty_batch_is_zeros(metal_emu, lib, dtype):
    cols = 41
    name, tg, _ = ext().metal_launch_dora_scale_vjp(0, cols, dtype)
    assert tg[1] == 0  # no row tile: the host skips the pass over dy
    res = launch(lib, metal_emu, ext().metal_launch_dora_scale_colsum(cols, dtype),
                 [np.zeros((1, cols), np.float32), np.zeros((1, cols), np.float32),
                  np.empty(cols, np.float32), np.empty(cols, NP_RAW[dtype]), np.int32(0),
                  np.int32(cols), np.int32(1), np.int32(1)], [2, 3])
    assert not res[2].any() and not decode(res[3], dtype).any()


def test_launch_rejects_unknown_dtypes():
    with pytest.raises(ValueError, match=r"\[dora_linear\] no Metal kernel for dtype float64"):
        ext().metal_launch_dora_inv_norm(4, "float64")
    with pytest.raises(ValueError, match=r"\[dora_linear\] no Metal kernel"):
        ext().metal_launch_dora_scale(4, 4, "int32", False)
    with pytest.raises(ValueError, match=r"\[dora_linear\] no Metal kernel"):
        ext().metal_launch_dora_scale_vjp(4, 4, "float64")
    with pytest.raises(ValueError, match=r"\[dora_linear\] no Metal kernel"):
        ext().metal_launch_dora_scale_colsum(4, "uint8")
