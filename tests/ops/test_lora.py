"""Fused LoRA linear vs mlx-lm's maths (lora_linear_reference) and a float64 oracle:
forward and every gradient, eager and compiled, over shapes, dtypes and argnums."""

from __future__ import annotations

import io
import itertools

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension, lora_linear, lora_linear_reference
from tests.conftest import assert_close_to_oracle, to_f64

f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16
# (activation/base dtype, LoRA parameter dtype); bf16 base + f32 LoRA is mlx-lm's usual mix
DTYPE_MIXES = [(f32, f32), (f16, f16), (bf16, bf16), (bf16, f32), (f16, f32)]
# (leading dims, in, out, r)
SHAPES = [
    ((4,), 16, 8, 4),
    ((2, 3), 37, 29, 7),
    ((5,), 64, 130, 1),
    ((1,), 24, 40, 256),
    ((2, 1, 3), 33, 17, 16),
    ((), 19, 23, 3),  # x is 1-D
    ((0,), 16, 8, 4),  # empty batch
    ((3, 0), 12, 10, 2),
    # widths that are multiples of 16 and r <= 16: the CUDA build's own rank-r kernels
    # (float16 / bfloat16), with a partial 16-row tile and r below 8 and 16
    ((5, 7), 64, 48, 8),
    ((40,), 32, 80, 11),
    ((3,), 48, 16, 16),
    # a warp with three 64-wide tiles of x, slices of several 16-row steps: the kernels'
    # two-deep prefetch
    ((2048,), 1600, 64, 16),
    # Hopper's lora_gemm (bf16): partial tiles in every dimension (128 x 256 output tiles,
    # k tiles of 64), three column tiles
    ((300,), 1040, 528, 16),
]
NAMES = ["x", "weight", "lora_a", "lora_b", "bias", "x_dropped"]


def make(lead, din, dout, r, dt, lora_dt, seed=0, bias=True, dropped=True):
    k = mx.random.split(mx.random.key(seed), 6)
    x = mx.random.normal((*lead, din), key=k[0]).astype(dt)
    w = (mx.random.normal((dout, din), key=k[1]) / np.sqrt(din)).astype(dt)
    a = (mx.random.normal((din, r), key=k[2]) / np.sqrt(din)).astype(lora_dt)
    b = mx.random.normal((r, dout), key=k[3]).astype(lora_dt)
    bb = mx.random.normal((dout,), key=k[4]).astype(dt) if bias else None
    xd = (mx.random.normal((*lead, din), key=k[5]).astype(dt)) if dropped else None
    return [x, w, a, b, bb, xd]


def oracle(args, scale, dy=None):
    """float64 forward, and the gradients of <y, dy> when dy is given."""
    x, w, a, b, bb, xd = [None if t is None else to_f64(t) for t in args]
    din = w.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, din)
    xd2 = x2 if xd is None else xd.reshape(-1, din)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite inputs are tested too
        y = x2 @ w.T + scale * (xd2 @ a) @ b
    if bb is not None:
        y = y + bb
    if dy is None:
        return y.reshape(*lead, w.shape[0])
    dy2 = to_f64(dy).reshape(-1, w.shape[0])
    g = dy2 @ b.T
    lora_dx = scale * g @ a.T
    dx = dy2 @ w + (lora_dx if xd is None else 0)
    return {
        "x": dx.reshape(x.shape),
        "weight": dy2.T @ x2,
        "lora_a": scale * xd2.T @ g,
        "lora_b": scale * (xd2 @ a).T @ dy2,
        "bias": dy2.sum(0),
        "x_dropped": lora_dx.reshape(x.shape),
    }


def call(fn, args, scale):
    x, w, a, b, bb, xd = args
    return fn(x, w, a, b, scale, bb, x_dropped=xd)


def vjp(fn, args, scale, argnums, dy):
    """Gradients of <fn(args), dy> w.r.t. the non-None args listed in argnums."""
    present = [i for i, t in enumerate(args) if t is not None]

    def f(*prim):
        full = list(args)
        for i, p in zip(present, prim):
            full[i] = p
        return call(fn, full, scale)

    # mx.vjp differentiates every primal; compare only the ones asked for.
    prims = [args[i] for i in present]
    sub = [present.index(i) for i in argnums]

    def g(*prim):
        return mx.vjp(lambda *p: f(*p), list(prim), [dy])[1]

    grads = g(*prims)
    return {NAMES[i]: grads[j] for i, j in zip(argnums, sub)}


def test_kernel_is_used_on_cpu():
    ext = _extension.kernel_for("lora", mx.cpu)
    if ext is None:
        pytest.skip("extension not built")
    x, w, a, b, bb, xd = make((3,), 8, 6, 2, f32, f32)
    y = lora_linear(x, w, a, b, 0.5, bb, x_dropped=xd, stream=mx.cpu)
    # The graphs hold the fused primitives, forward and backward, not the reference's ops.
    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    assert "LoRALinear" in dot.getvalue() and "Matmul" not in dot.getvalue()
    assert mx.array_equal(y, ext.lora_linear(x, w, a, b, 0.5, bb, xd, stream=mx.cpu))
    _, (dx,) = mx.vjp(lambda x: lora_linear(x, w, a, b, 0.5, stream=mx.cpu), [x], [mx.ones_like(y)])
    dot = io.StringIO()
    mx.export_to_dot(dot, dx)
    assert "LoRALinearVJP" in dot.getvalue() and "Matmul" not in dot.getvalue()


@pytest.mark.parametrize("dt,lora_dt", DTYPE_MIXES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias,dropped", [(False, False), (True, False), (True, True)])
def test_forward(device, dt, lora_dt, shape, bias, dropped):
    args = make(*shape, dt, lora_dt, bias=bias, dropped=dropped)
    scale = 1.7
    y = call(lora_linear, args, scale)
    ref = call(lora_linear_reference, args, scale)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert_close_to_oracle(y, ref, oracle(args, scale), dt)


@pytest.mark.parametrize("dt,lora_dt", DTYPE_MIXES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias,dropped", [(False, False), (True, True)])
def test_all_gradients(device, dt, lora_dt, shape, bias, dropped):
    args = make(*shape, dt, lora_dt, bias=bias, dropped=dropped, seed=1)
    scale = 0.8
    y = call(lora_linear_reference, args, scale)
    dy = mx.random.normal(y.shape, key=mx.random.key(7)).astype(y.dtype)
    argnums = [i for i, t in enumerate(args) if t is not None]
    got = vjp(lora_linear, args, scale, argnums, dy)
    ref = vjp(lora_linear_reference, args, scale, argnums, dy)
    want = oracle(args, scale, dy)
    for name in got:
        assert got[name].dtype == args[NAMES.index(name)].dtype, name
        assert_close_to_oracle(got[name], ref[name], want[name], dt, what=f"d{name}")


@pytest.mark.parametrize("dt,lora_dt", [(f32, f32), (bf16, f32), (f16, f16)],
                         ids=lambda d: str(d).split(".")[-1])
def test_parameter_gradients_repeat_bit_for_bit(device, dt, lora_dt):
    """dA and dB sum over every row; the kernels split the rows into slices and add the
    slices' partial sums in a fixed order (on CUDA the last slice to finish adds them,
    whichever it is), so the same inputs give the same bits, run after run. 1024 rows of
    64: eight slices on the H200."""
    args = make((1024,), 64, 64, 8, dt, lora_dt, seed=5, bias=False, dropped=False)
    dy = mx.random.normal((1024, 64), key=mx.random.key(6)).astype(dt)
    runs = [vjp(lora_linear, args, 0.7, [0, 2, 3], dy) for _ in range(4)]
    mx.eval(runs)
    for other in runs[1:]:
        for name in ("lora_a", "lora_b", "x"):
            assert np.array_equal(np.array(runs[0][name].astype(f32)),
                                  np.array(other[name].astype(f32))), name


# Every subset of the differentiable inputs, on one shape: only those are computed.
SUBSETS = [s for k in range(1, 7) for s in itertools.combinations(range(6), k)]


@pytest.mark.parametrize("widths", [(21, 19), (32, 48)], ids=str)  # (32, 48): CUDA's own kernels
@pytest.mark.parametrize("argnums", SUBSETS[1::3] + [(0,), (1,), (2,), (3,), (4,), (5,)], ids=str)
def test_argnums_subsets(device, argnums, widths):
    args = make((2, 5), *widths, 5, bf16, f32, seed=2)
    scale = 2.0
    y = call(lora_linear_reference, args, scale)
    dy = mx.random.normal(y.shape, key=mx.random.key(3)).astype(y.dtype)

    def loss(fn):
        def f(*p):
            return (call(fn, list(p), scale).astype(f32) * dy.astype(f32)).sum()
        return f

    got = mx.grad(loss(lora_linear), argnums=argnums)(*args)
    ref = mx.grad(loss(lora_linear_reference), argnums=argnums)(*args)
    if len(argnums) == 1:  # mx.grad returns a bare array for one argnum
        got, ref = [got], [ref]
    want = oracle(args, scale, dy)
    for i, g, r in zip(argnums, got, ref):
        assert_close_to_oracle(g, r, want[NAMES[i]], bf16, what=f"d{NAMES[i]}")


@pytest.mark.parametrize("dt,lora_dt", [(f32, f32), (bf16, f32), (f16, f16)],
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("dropped", [False, True])
def test_compiled_value_and_grad(device, dt, lora_dt, dropped):
    args = make((3, 7), 45, 31, 8, dt, lora_dt, bias=True, dropped=dropped, seed=4)
    x, w, a, b, bb, xd = args
    scale = 1.3

    def loss(fn):
        def f(w, a, b, x, bb, xd):
            y = fn(x, w, a, b, scale, bb, x_dropped=xd)
            return (y.astype(f32) ** 2).mean()
        return f

    argnums = [0, 1, 2, 3, 4] + ([5] if dropped else [])
    fused = mx.compile(mx.value_and_grad(loss(lora_linear), argnums=argnums))
    eager = mx.value_and_grad(loss(lora_linear_reference), argnums=argnums)
    for _ in range(2):  # the second call runs the cached compiled graph
        v, g = fused(w, a, b, x, bb, xd)
        vr, gr = eager(w, a, b, x, bb, xd)
        assert abs(v.item() - vr.item()) <= 2e-2 * max(1.0, abs(vr.item()))
        for gi, ri in zip(g, gr):
            assert gi.dtype == ri.dtype and gi.shape == ri.shape
            err = float(mx.abs(gi.astype(f32) - ri.astype(f32)).max())
            # On the H200 the float32 reference (MLX's CUDA matmul) differed from our
            # strict-fp32 cuBLASLt GEMMs by 2e-4 (TF32-sized); the float64-oracle tests bound both.
            f32_tol = 1e-3 if mx.default_device() == mx.gpu else 1e-4
            tol = {f32: f32_tol, f16: 2e-2, bf16: 5e-2}[dt] * max(1.0, float(mx.abs(ri.astype(f32)).max()))
            assert err <= tol


@pytest.mark.parametrize("dt,lora_dt", [(bf16, f32), (bf16, bf16)], ids=lambda d: str(d).split(".")[-1])
def test_tiles_past_one_round(device, dt, lora_dt):
    """More output tiles than the H200 has multiprocessors (71 x 3 tiles of 128 x 256): each
    CTA of Hopper's lora_gemm then walks a run of tiles that crosses row blocks, making
    xa (forward) or g (backward) again at each new row block and reusing it within one,
    and the row block's first tile writes it out for dB and dA. Without dropout, so
    that the GEMM makes them itself."""
    args = make((9000,), 256, 768, 8, dt, lora_dt, seed=5, bias=True, dropped=False)
    scale = 1.5
    y = call(lora_linear, args, scale)
    assert_close_to_oracle(y, call(lora_linear_reference, args, scale), oracle(args, scale), dt)
    dy = mx.random.normal(y.shape, key=mx.random.key(6)).astype(y.dtype)
    got = vjp(lora_linear, args, scale, [0, 2, 3], dy)
    ref = vjp(lora_linear_reference, args, scale, [0, 2, 3], dy)
    want = oracle(args, scale, dy)
    for name in got:
        assert_close_to_oracle(got[name], ref[name], want[name], dt, what=f"d{name}")


@pytest.mark.parametrize("w_tiles", [False, True], ids=["whole_w", "w_tiles"])
@pytest.mark.parametrize("dt,lora_dt", [(f32, f32), (bf16, f32), (f16, f16)],
                         ids=lambda d: str(d).split(".")[-1])
def test_many_row_tiles(device, monkeypatch, dt, lora_dt, w_tiles):
    """The CPU kernels walk the rows in tiles (accumulating dA, dB, dW, dbias across
    them); force tiles of 7 rows so that a small batch runs through many, with a ragged
    last one. With w_tiles, W is also widened and multiplied 8 of its 35 rows at a time
    (y's columns in the forward, dy W's sum in the backward), as a half-precision W
    above 8 MB is."""
    monkeypatch.setenv("MLX_TUNER_LORA_TILE_ROWS", "7")
    if w_tiles:
        monkeypatch.setenv("MLX_TUNER_LORA_W_TILE_ROWS", "8")
    args = make((5, 9), 26, 35, 6, dt, lora_dt, seed=11)
    scale = 0.9
    y = call(lora_linear, args, scale)
    assert_close_to_oracle(y, call(lora_linear_reference, args, scale), oracle(args, scale), dt)
    dy = mx.random.normal(y.shape, key=mx.random.key(12)).astype(y.dtype)
    got = vjp(lora_linear, args, scale, range(6), dy)
    ref = vjp(lora_linear_reference, args, scale, range(6), dy)
    want = oracle(args, scale, dy)
    for name in got:
        assert_close_to_oracle(got[name], ref[name], want[name], dt, what=f"d{name}")
    # Without dropout too: the LoRA part of dx then joins dy W in the same tile buffer.
    args[5] = None
    got = vjp(lora_linear, args, scale, range(5), dy)
    ref = vjp(lora_linear_reference, args, scale, range(5), dy)
    want = oracle(args, scale, dy)
    for name in got:
        assert_close_to_oracle(got[name], ref[name], want[name], dt, what=f"d{name}")


@pytest.mark.parametrize("dt", [f32, f16, bf16], ids=lambda d: str(d).split(".")[-1])
def test_nonfinite_rows_propagate(device, dt):
    args = make((6,), 12, 9, 3, dt, f32, seed=13, dropped=False)
    x = np.array(args[0].astype(f32))
    x[1, 3], x[4, 0] = np.nan, np.inf
    args[0] = mx.array(x).astype(dt)
    y = call(lora_linear, args, 1.0)
    # NaN rows stay NaN, inf rows non-finite, the other rows exact as usual.
    assert_close_to_oracle(y, call(lora_linear_reference, args, 1.0), oracle(args, 1.0), dt)


def test_compiled_forward_matches_eager(device):
    args = make((4, 6), 40, 24, 4, bf16, f32, seed=5)
    f = mx.compile(lambda *p: call(lora_linear, list(p), 0.5))
    assert mx.array_equal(f(*args), call(lora_linear, args, 0.5))


def test_noncontiguous_inputs(device):
    x, w, a, b, bb, _ = make((6,), 20, 14, 3, f32, f32, seed=6)
    xt = mx.random.normal((20, 6)).T  # a transposed view
    wt = mx.random.normal((20, 14)).T / 5
    bt = mx.random.normal((14, 3)).T
    args = [xt, wt, a, bt, bb[::1], None]
    y = call(lora_linear, args, 1.0)
    assert_close_to_oracle(y, call(lora_linear_reference, args, 1.0), oracle(args, 1.0), f32)


def _graph(*arrays):
    buf = io.StringIO()
    mx.export_to_dot(buf, *arrays)
    return buf.getvalue()


def test_vjp_primals_need_no_copy_node(device):
    """mx.vjp wraps each primal in a Copy, which shares its source's buffer: the op adds no
    Contiguous node for it when the source is row-contiguous (every node costs host time),
    and still makes an evaluated transposed view row-contiguous before its kernels read it."""
    if _extension.kernel_for("lora") is None:
        pytest.skip("no lora kernel on this device")
    x, w, a, b, bb, xd = make((6,), 20, 14, 3, f32, f32, seed=16)
    dy = mx.random.normal((6, 14), key=mx.random.key(17))
    at = mx.random.normal((3, 20), key=mx.random.key(18)).T / 5  # a column-major A
    mx.eval(x, w, a, b, bb, xd, dy, at)  # as a training step's parameters are
    for lora_a, copies in ((a, 0), (at, 1)):
        args = [x, w, lora_a, b, bb, xd]
        out, grads = mx.vjp(lambda *p: [call(lora_linear, [p[0], w, p[1], p[2], bb, xd], 0.7)],
                            [x, lora_a, b], [dy])
        assert _graph(out[0], *grads).count('"Contiguous"') == copies
        want = oracle(args, 0.7, dy)
        ref = vjp(lora_linear_reference, args, 0.7, [0, 2, 3], dy)
        for name, g in zip(("x", "lora_a", "lora_b"), grads):
            assert_close_to_oracle(g, ref[name], want[name], f32, what=f"d{name}")


@pytest.mark.parametrize("offset", [2, 4, 8], ids=lambda o: f"offset{o}")
def test_views_at_any_offset(device, offset):
    """x, x_dropped and dy as contiguous views that start `offset` bf16 elements (4, 8,
    16 bytes) into a buffer: widths that are multiples of 16 take the CUDA build's own
    rank-r kernels, which read rows by 16-byte vectors, so a misaligned view must go to
    the other path, not fault or read the wrong rows."""
    n, din, dout, r = 24, 32, 48, 8
    x, w, a, b, bb, xd = make((n,), din, dout, r, bf16, f32, seed=11)

    def at(t, key):
        buf = mx.random.normal((t.size + offset,), key=mx.random.key(key)).astype(t.dtype)
        buf[offset:] = t.reshape(-1)
        return buf[offset:].reshape(t.shape)

    # The reference (MLX's matmul) gets the aligned arrays: MLX 0.32.4's own cuBLASLt GEMM
    # refuses views 4 or 8 bytes into a buffer (status 15) on CUDA.
    aligned = [x, w, a, b, bb, xd]
    args = [at(x, 12), w, a, b, bb, at(xd, 13)]
    assert mx.array_equal(args[0], x) and mx.array_equal(args[5], xd)
    scale = 0.6
    y = call(lora_linear, args, scale)
    assert_close_to_oracle(y, call(lora_linear_reference, aligned, scale), oracle(aligned, scale), bf16)
    dy0 = mx.random.normal((n, dout), key=mx.random.key(14)).astype(bf16)
    dy = at(dy0, 15)
    argnums = [0, 2, 3, 5]
    got = vjp(lora_linear, args, scale, argnums, dy)
    ref = vjp(lora_linear_reference, aligned, scale, argnums, dy0)
    want = oracle(aligned, scale, dy0)
    for name in got:
        assert_close_to_oracle(got[name], ref[name], want[name], bf16, what=f"d{name}")


def test_training_step_reduces_loss(device):
    """A few SGD steps on the LoRA parameters through the fused op fit a target."""
    x, w, a, b, _, _ = make((64,), 32, 16, 4, f32, f32, seed=8)
    b = mx.zeros_like(b)
    k = mx.random.split(mx.random.key(9))
    delta = mx.random.normal((32, 4), key=k[0]) @ mx.random.normal((4, 16), key=k[1]) / 12
    target = x @ (w.T + delta)  # reachable by a rank-4 update

    def loss(a, b):
        return ((lora_linear(x, w, a, b, 1.0) - target) ** 2).mean()

    step = mx.value_and_grad(loss, argnums=[0, 1])
    first = None
    for _ in range(60):
        v, (ga, gb) = step(a, b)
        first = v.item() if first is None else first
        a, b = a - 1.0 * ga, b - 1.0 * gb
    assert v.item() < 0.3 * first


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"x": (3, 9)}, r"\[lora_linear\] x must have last dimension 8"),
        ({"lora_a": (9, 4)}, r"\[lora_linear\] lora_a must have shape \(8, 4\) but got \(9, 4\)"),
        ({"lora_b": (4, 5)}, r"\[lora_linear\] lora_b must have shape \(4, 6\) but got \(4, 5\)"),
        ({"bias": (5,)}, r"\[lora_linear\] bias must have shape \(6,\) but got \(5,\)"),
        ({"x_dropped": (3, 7)}, r"\[lora_linear\] x_dropped must have shape \(3, 8\)"),
        ({"weight": (6,)}, r"\[lora_linear\] weight must have 2 dimensions"),
    ],
)
def test_errors(kwargs, match):
    shapes = {"x": (3, 8), "weight": (6, 8), "lora_a": (8, 4), "lora_b": (4, 6), "bias": (6,),
              "x_dropped": (3, 8)}
    shapes.update(kwargs)
    t = {k: mx.zeros(v) for k, v in shapes.items()}
    with pytest.raises(ValueError, match=match):
        lora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], 1.0, t["bias"],
                    x_dropped=t["x_dropped"])


def test_error_dtype_and_scale():
    x, w, a, b = mx.zeros((2, 4)), mx.zeros((3, 4)), mx.zeros((4, 2)), mx.zeros((2, 3))
    with pytest.raises(ValueError, match=r"\[lora_linear\] x must be float32, float16 or bfloat16"):
        lora_linear(x.astype(mx.int32), w, a, b, 1.0)
    with pytest.raises(ValueError, match=r"\[lora_linear\] scale must be a float"):
        lora_linear(x, w, a, b, "2")
    with pytest.raises(ValueError, match=r"\[lora_linear\] lora_a must be an mx.array"):
        lora_linear(x, w, a.tolist(), b, 1.0)


def test_cpp_op_validates_directly():
    """The C++ op checks its arguments too (for callers that skip the Python layer)."""
    ext = _extension.kernel_for("lora", mx.cpu)
    if ext is None:
        pytest.skip("extension not built")
    x, w, a, b = mx.zeros((2, 4)), mx.zeros((3, 4)), mx.zeros((4, 2)), mx.zeros((2, 5))
    with pytest.raises(ValueError, match=r"\[lora_linear\] lora_b must have shape \(2, 3\) but got \(2, 5\)"):
        ext.lora_linear(x, w, a, b, 1.0)
