"""DoRAScale, the m / n column scale of dora_linear's GPU path (y = z * sv + bias), and its
one-pass backward (dz, dsv = sum_rows dy * z, dbias = sum_rows dy), checked on the CPU
against a float64 oracle and the same maths in MLX ops."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension
from tests.conftest import assert_close_to_oracle, to_f64

f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16
DTYPES = [f32, f16, bf16]
# (N, out): odd sizes, a single row / column, empty batch
SHAPES = [(1, 1), (1, 13), (37, 1), (37, 13), (4, 16), (64, 40), (130, 67), (0, 13), (0, 0)]
EPS = {f32: 2.0**-23, f16: 2.0**-10, bf16: 2.0**-7}


def ext():
    e = _extension.extension()
    if e is None or not hasattr(e, "_dora_scale"):
        pytest.skip("the compiled extension is not available")
    if mx.default_device() == mx.gpu and not (
            e.gpu_backend == "cuda" and "gpu" in _extension.kernel_devices("dora")):
        pytest.skip("DoRAScale has a GPU kernel only in CUDA builds (Metal composes MLX ops)")
    return e


def make(n, o, dt, bias=True):
    z = (mx.random.normal((n, o)) * 3).astype(dt)
    sv = mx.random.uniform(0.2, 2.0, (o,)) * mx.where(mx.arange(o) % 3 == 0, -1.0, 1.0)
    b = (mx.random.normal((o,)) * 0.5).astype(dt) if bias else None
    return z, sv, b


def reference(z, sv, bias=None):
    """The MLX-ops expression: float32 maths, one rounding to z's dtype."""
    y = z.astype(f32) * sv
    if bias is not None:
        y = y + bias.astype(f32)
    return y.astype(z.dtype)


def oracle(z, sv, b, dy):
    Z, S, DY = to_f64(z), to_f64(sv), to_f64(dy)
    y = Z * S + (to_f64(b) if b is not None else 0)
    return y, {"z": DY * S, "sv": (DY * Z).sum(0), "bias": DY.sum(0)}


@pytest.mark.parametrize("n,o", SHAPES)
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_is_one_rounding(device, n, o, dt, bias):
    z, sv, b = make(n, o, dt, bias)
    y = ext()._dora_scale(z, sv, b)
    assert y.dtype == dt and y.shape == (n, o)
    y_o, _ = oracle(z, sv, b, mx.zeros_like(z))
    # float32 maths then one rounding to dt: half an ulp of dt, plus float32's own error
    mag = np.abs(to_f64(z) * to_f64(sv)) + (np.abs(to_f64(b)) if b is not None else 0)
    bound = 0.5 * EPS[dt] * np.abs(y_o) + 4 * EPS[f32] * mag + (2.0**-25 if dt == f16 else 0)
    err = np.abs(to_f64(y) - y_o)
    assert np.all(err <= bound), float((err - bound).max())
    assert_close_to_oracle(y, reference(z, sv, b), y_o, dt, "y")


def grads(fn, z, sv, b, dy, names):
    vals = {"z": z, "sv": sv, "bias": b}

    def f(*p):
        args = dict(vals, **dict(zip(names, p)))
        return fn(args["z"], args["sv"], args["bias"])

    out, vjps = mx.vjp(f, [vals[k] for k in names], [dy])
    return out[0], dict(zip(names, vjps))


NAME_SETS = [("z", "sv", "bias"), ("z",), ("sv",), ("bias",), ("sv", "bias"), ("z", "bias")]


@pytest.mark.parametrize("n,o", SHAPES)
@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gradients(device, n, o, dt):
    e = ext()
    z, sv, b = make(n, o, dt)
    dy = mx.random.normal((n, o)).astype(dt)
    names = ["z", "sv", "bias"]
    _, g_f = grads(e._dora_scale, z, sv, b, dy, names)
    _, g_r = grads(reference, z, sv, b, dy, names)
    _, g_o = oracle(z, sv, b, dy)
    for nm in names:
        assert g_f[nm].dtype == g_r[nm].dtype, nm
        assert g_f[nm].shape == g_r[nm].shape, nm
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], dt, f"d{nm}")
    if n == 0:
        assert not np.any(np.array(g_f["sv"])) and not np.any(to_f64(g_f["bias"]))


@pytest.mark.parametrize("names", NAME_SETS, ids="+".join)
def test_only_the_asked_gradients(device, names):
    e = ext()
    z, sv, b = make(37, 13, bf16)
    dy = mx.random.normal((37, 13)).astype(bf16)
    _, g_f = grads(e._dora_scale, z, sv, b, dy, list(names))
    _, g_o = oracle(z, sv, b, dy)
    _, g_r = grads(reference, z, sv, b, dy, list(names))
    for nm in names:
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], bf16, f"d{nm}")


def test_without_bias_gradients(device):
    e = ext()
    z, sv, _ = make(9, 21, f16, bias=False)
    dy = mx.random.normal((9, 21)).astype(f16)
    _, g_f = grads(lambda z, sv, b: e._dora_scale(z, sv), z, sv, None, dy, ["z", "sv"])
    _, g_o = oracle(z, sv, None, dy)
    _, g_r = grads(lambda z, sv, b: reference(z, sv), z, sv, None, dy, ["z", "sv"])
    for nm in ("z", "sv"):
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], f16, f"d{nm}")


@pytest.mark.parametrize("names", NAME_SETS, ids="+".join)
def test_jvp(device, names):
    e = ext()
    z, sv, b = make(6, 11, f32)
    vals = {"z": z, "sv": sv, "bias": b}
    tans = {"z": mx.random.normal(z.shape), "sv": mx.random.normal(sv.shape),
            "bias": mx.random.normal(b.shape)}

    def wrap(fn):
        return lambda *p: fn(**dict(vals, **dict(zip(names, p))))

    args = ([vals[k] for k in names], [tans[k] for k in names])
    _, (t_f,) = mx.jvp(wrap(lambda z, sv, bias: e._dora_scale(z, sv, bias)), *args)
    _, (t_r,) = mx.jvp(wrap(reference), *args)
    np.testing.assert_allclose(np.array(t_f), np.array(t_r), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_compiled_matches_eager(device, dt):
    e = ext()
    z, sv, b = make(37, 13, dt)
    dy = mx.random.normal((37, 13)).astype(dt)

    def step(z, sv, b, dy):
        out, vjps = mx.vjp(lambda z, sv, b: e._dora_scale(z, sv, b), [z, sv, b], [dy])
        return [out[0], *vjps]

    eager = step(z, sv, b, dy)
    comp = mx.compile(step)(z, sv, b, dy)
    for a, c in zip(eager, comp):
        assert a.dtype == c.dtype
        np.testing.assert_array_equal(to_f64(a), to_f64(c))


def test_non_contiguous_inputs(device):
    e = ext()
    zt = mx.random.normal((13, 37)).astype(bf16)
    sv2 = mx.random.normal((26,))
    b = mx.random.normal((13,)).astype(bf16)
    z, sv = zt.T, sv2[::2]  # transposed z, strided sv
    y = e._dora_scale(z, sv, b)
    np.testing.assert_array_equal(to_f64(y), to_f64(reference(z, sv, b)))
    # broadcast cotangent (the vjp of a sum)
    g = mx.grad(lambda sv: e._dora_scale(z, sv, b).astype(f32).sum())(sv)
    np.testing.assert_allclose(np.array(g), to_f64(z).sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_unaligned_rows(device, dt):
    # Row-contiguous views 3 elements into their buffer: the rows are a whole number of
    # 16-byte vectors (32 columns) but the data is not 16-byte aligned.
    e = ext()
    n, o = 21, 32
    flat = mx.random.normal((n * o + 3,)).astype(dt)
    z = flat[3:].reshape(n, o)
    dy = (mx.random.normal((n * o + 3,)).astype(dt))[3:].reshape(n, o)
    sv = mx.random.normal((o + 1,))[1:]
    b = mx.random.normal((o,)).astype(dt)
    y, g_f = grads(e._dora_scale, z, sv, b, dy, ["z", "sv", "bias"])
    y_r, g_r = grads(reference, z, sv, b, dy, ["z", "sv", "bias"])
    y_o, g_o = oracle(z, sv, b, dy)
    np.testing.assert_array_equal(to_f64(y), to_f64(y_r))
    for nm in g_f:
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], dt, f"d{nm}")


# Sizes that take the GPU kernels through several row and column tiles, and the cap on
# row tiles (cols = 20 tiles of 256 bf16 columns); too slow to be worth it on the CPU.
@pytest.mark.parametrize("n,o", [(300, 520), (4000, 5120), (1030, 4099)])
def test_large_on_gpu(device, n, o):
    if device != mx.gpu:
        pytest.skip("the tiling only exists on the GPU")
    e = ext()
    z, sv, b = make(n, o, bf16)
    dy = mx.random.normal((n, o)).astype(bf16)
    names = ["z", "sv", "bias"]
    y, g_f = grads(e._dora_scale, z, sv, b, dy, names)
    y_r, g_r = grads(reference, z, sv, b, dy, names)
    y_o, g_o = oracle(z, sv, b, dy)
    assert_close_to_oracle(y, y_r, y_o, bf16, "y")
    for nm in names:
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], bf16, f"d{nm}")


def test_deterministic(device):
    # The column sums add partial rows in a fixed order: the same bits on every run.
    e = ext()
    z, sv, b = make(2000, 264, bf16)
    dy = mx.random.normal((2000, 264)).astype(bf16)
    runs = [grads(e._dora_scale, z, sv, b, dy, ["sv", "bias"])[1] for _ in range(3)]
    for r in runs[1:]:
        for nm in ("sv", "bias"):
            np.testing.assert_array_equal(to_f64(r[nm]), to_f64(runs[0][nm]))


@pytest.mark.parametrize("case,match", [
    ("z_1d", r"\[dora_scale\] z must have 2 dimensions but got shape \(13,\)"),
    ("z_int", r"\[dora_scale\] z must be float32, float16 or bfloat16 but got int32"),
    ("sv_shape", r"\[dora_scale\] sv must have shape \(13,\) but got \(12,\)"),
    ("sv_dtype", r"\[dora_scale\] sv must be float32 but got float16"),
    ("bias_shape", r"\[dora_scale\] bias must have shape \(13,\) but got \(1, 13\)"),
    ("bias_dtype", r"\[dora_scale\] bias must have z's dtype bfloat16 but got float32"),
])
def test_errors(case, match):
    e = ext()
    z, sv, b = make(5, 13, bf16)
    if case == "z_1d":
        z = z[0]
    elif case == "z_int":
        z = z.astype(mx.int32)
    elif case == "sv_shape":
        sv = sv[:12]
    elif case == "sv_dtype":
        sv = sv.astype(f16)
    elif case == "bias_shape":
        b = b[None]
    elif case == "bias_dtype":
        b = b.astype(f32)
    with pytest.raises(ValueError, match=match):
        e._dora_scale(z, sv, b)


# ---------------------------------------------------------------- DoRAInvNorm
def inv_norm_oracle(p, b, a, c, s, p_transposed):
    """1 / ||W_i + s (A B)ᵀ_i|| from the low-rank identity, in float64."""
    p64, b64, a64, c64 = (to_f64(t) for t in (p, b, a, c))
    pm = p64.T if p_transposed else p64  # (out, r)
    cross = np.einsum("ki,ik->i", b64, pm)
    quad = np.einsum("ki,kl,li->i", b64, a64.T @ a64, b64)
    with np.errstate(divide="ignore"):  # a zero row (no input dims) has n = 0: 1 / n = inf
        return 1.0 / np.sqrt(np.maximum(c64 + 2 * s * cross + s * s * quad, 0.0))


@pytest.mark.parametrize("dt", DTYPES, ids=str)
@pytest.mark.parametrize("p_transposed", [False, True])
@pytest.mark.parametrize("din,out,r", [(1, 1, 1), (70, 13, 3), (130, 67, 16), (200, 64, 32),
                                       (0, 5, 4), (9, 0, 2)])
def test_inv_norm_matches_the_identity(din, out, r, p_transposed, dt):
    e = ext()
    with mx.stream(mx.cpu):  # the inputs only: MLX's CUDA matmul crashes on an empty K
        w = mx.random.normal((out, din))
        a = mx.random.normal((din, r)) / max(din, 1) ** 0.5
        b = mx.random.normal((r, out)) * 0.1
        p = (w @ a).astype(dt)
        c = (w * w).sum(axis=1)
        mx.eval(w, a, b, p, c)
    got = e._dora_inv_norm(p.T if p_transposed else p, b, a, c, 2.0, p_transposed)
    want = inv_norm_oracle(p.T if p_transposed else p, b, a, c, 2.0, p_transposed)
    assert got.dtype == f32 and got.shape == (out,)
    np.testing.assert_allclose(np.array(got), want, rtol=2e-5, atol=0)
    # it is the norm of the adapted weight (p rounded to dt is the only approximation)
    if out and dt == f32:
        direct = np.linalg.norm(to_f64(w) + 2.0 * (to_f64(a) @ to_f64(b)).T, axis=1)
        np.testing.assert_allclose(1.0 / np.array(got), direct, rtol=1e-4)


def quant_case(out, din, r, bits, gs, dt, seed=0):
    """A quantized W with its dequantized rows (in dt, as mlx-lm's), A, B, c = ||W_i||^2."""
    mx.random.seed(seed)
    with mx.stream(mx.cpu):
        w = mx.random.normal((out, din)).astype(dt)
        wq, scales, biases = mx.quantize(w, group_size=gs, bits=bits)
        wd = mx.dequantize(wq, scales, biases, group_size=gs, bits=bits)  # in dt
        a = mx.random.normal((din, r)) / din**0.5
        b = mx.random.normal((r, out)) * 3
        c = (wd.astype(f32) ** 2).sum(axis=1)
        mx.eval(wq, scales, biases, wd, a, b, c)
    return wq, scales, biases, wd, a, b, c


# P = W A made from the codes in the node: every bit width, group size and dtype; widths
# with a partial 64-column tile (1056 = 16.5 tiles, gs 32), row counts not a multiple of 16.
@pytest.mark.parametrize("dt", [f16, bf16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("out,din,r", [(1, 128, 1), (13, 384, 5), (67, 1056, 16), (40, 4096, 8)])
def test_inv_norm_quant_matches_the_dequantized_weight(out, din, r, gs, bits, dt):
    if din % gs:
        pytest.skip("the width is not a whole number of groups")
    e = ext()
    wq, scales, biases, wd, a, b, c = quant_case(out, din, r, bits, gs, dt)
    got = e._dora_inv_norm_quant(wq, scales, biases, b, a, c, 2.0, gs, bits)
    wd64, a64, b64 = to_f64(wd), to_f64(a), to_f64(b)
    p = wd64 @ a64  # the oracle's P, from the dequantized weight
    n2 = to_f64(c) + 4.0 * np.einsum("ki,ik->i", b64, p) + 4.0 * np.einsum(
        "ki,kl,li->i", b64, a64.T @ a64, b64)
    want = 1.0 / np.sqrt(n2)
    assert got.dtype == f32 and got.shape == (out,)
    # A (or its fragments, T-rounded on the GPU) is the only approximation; the cross term
    # 2 s B.P is ~10% of n^2 here, so a wrong column of P shows far above this tolerance.
    np.testing.assert_allclose(np.array(got), want, rtol=5e-4, atol=0)
    direct = np.linalg.norm(wd64 + 2.0 * (a64 @ b64).T, axis=1)
    np.testing.assert_allclose(1.0 / np.array(got), direct, rtol=5e-4)


def test_inv_norm_quant_compiles_and_errors():
    e = ext()
    wq, scales, biases, wd, a, b, c = quant_case(16, 256, 4, 4, 64, bf16)
    eager = e._dora_inv_norm_quant(wq, scales, biases, b, a, c, 1.5, 64, 4)
    compiled = mx.compile(lambda: e._dora_inv_norm_quant(wq, scales, biases, b, a, c, 1.5, 64, 4))
    np.testing.assert_array_equal(np.array(compiled()), np.array(eager))
    with pytest.raises(ValueError, match=r"\[dora_inv_norm_quant\] a must have 1 to 16 columns"):
        e._dora_inv_norm_quant(wq, scales, biases, mx.zeros((17, 16)), mx.zeros((256, 17)), c, 1.0, 64, 4)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm_quant\] scales must be float16 or bfloat16"):
        e._dora_inv_norm_quant(wq, scales.astype(f32), biases.astype(f32), b, a, c, 1.0, 64, 4)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm_quant\] bits must be one of 2, 3, 4, 5, 6, 8 but got 7"):
        e._dora_inv_norm_quant(wq, scales, biases, b, a, c, 1.0, 64, 7)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm_quant\] group_size must be 32, 64 or 128 but got 16"):
        e._dora_inv_norm_quant(wq, scales, biases, b, a, c, 1.0, 16, 4)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm_quant\] scales must have shape \(16, 8\)"):
        e._dora_inv_norm_quant(wq, scales, biases, b, a, c, 1.0, 32, 4)


def test_inv_norm_is_a_constant_and_compiles():
    e = ext()
    a, b = mx.random.normal((20, 4)), mx.random.normal((4, 7))
    p, c = mx.random.normal((7, 4)), mx.random.uniform(1, 2, (7,))
    f = lambda bb: (e._dora_inv_norm(p, bb, a, c, 1.5, False) * bb.sum(0)).sum()  # noqa: E731
    g = mx.grad(f)(b)  # n is a stop_gradient: only the explicit factor's gradient remains
    np.testing.assert_allclose(np.array(g), np.broadcast_to(np.array(
        e._dora_inv_norm(p, b, a, c, 1.5, False)), (4, 7)), rtol=1e-6)
    compiled = mx.compile(lambda: e._dora_inv_norm(p, b, a, c, 1.5, False))
    np.testing.assert_array_equal(np.array(compiled()), np.array(e._dora_inv_norm(p, b, a, c, 1.5, False)))


def test_inv_norm_errors():
    e = ext()
    a, b = mx.zeros((20, 4)), mx.zeros((4, 7))
    p, c = mx.zeros((7, 4)), mx.zeros((7,))
    with pytest.raises(ValueError, match=r"\[dora_inv_norm\] b must have shape \(4, 7\) but got \(4, 6\)"):
        e._dora_inv_norm(p, mx.zeros((4, 6)), a, c, 1.0, False)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm\] p must have shape \(4, 7\) but got \(7, 4\)"):
        e._dora_inv_norm(p, b, a, c, 1.0, True)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm\] a must have at most 32 columns"):
        e._dora_inv_norm(mx.zeros((7, 33)), mx.zeros((33, 7)), mx.zeros((20, 33)), c, 1.0, False)
    with pytest.raises(ValueError, match=r"\[dora_inv_norm\] c must be float32 but got float16"):
        e._dora_inv_norm(p, b, a, c.astype(f16), 1.0, False)
