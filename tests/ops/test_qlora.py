"""qlora_linear against a dequantize-then-matmul float64 oracle: every bits x group size,
dtypes, odd / leading / empty shapes, gradients, mx.compile, errors, peak memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner import ops
from mlx_tuner.ops import _extension, qlora_linear, qlora_linear_reference
from tests.conftest import DTYPES, assert_close_to_oracle, to_f64

BITS = [2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]


def make(shape, n, k, r, *, bits=4, group_size=64, dtype=mx.float32, lora_dtype=None,
         bias=True, dropped=False):
    w = mx.random.normal((n, k)).astype(dtype)
    wq, s, b = mx.quantize(w, group_size=group_size, bits=bits)
    lt = lora_dtype or dtype
    args = dict(
        x=mx.random.normal((*shape, k)).astype(dtype), weight=wq, scales=s, biases=b,
        lora_a=(mx.random.normal((k, r)) / k**0.5).astype(lt),
        lora_b=(mx.random.normal((r, n)) / r**0.5).astype(lt), scale=1.7,
        bias=mx.random.normal((n,)).astype(dtype) if bias else None,
        x_dropped=mx.random.normal((*shape, k)).astype(dtype) if dropped else None)
    return args, dict(group_size=group_size, bits=bits)


def oracle(a, q, dy):
    """y and every gradient in float64 from the dequantized weight."""
    w = to_f64(mx.dequantize(a["weight"], a["scales"].astype(mx.float32),
                             a["biases"].astype(mx.float32), **q))
    x = to_f64(a["x"]).reshape(-1, w.shape[1])
    xd = x if a["x_dropped"] is None else to_f64(a["x_dropped"]).reshape(x.shape)
    A, B, s = to_f64(a["lora_a"]), to_f64(a["lora_b"]), a["scale"]
    g = to_f64(dy).reshape(-1, w.shape[0])
    y = x @ w.T + s * (xd @ A) @ B
    if a["bias"] is not None:
        y = y + to_f64(a["bias"])
    gl = s * g @ B.T
    out_shape = a["x"].shape[:-1]
    grads = {"x": (g @ w + (gl @ A.T if a["x_dropped"] is None else 0)).reshape(a["x"].shape),
             "lora_a": xd.T @ gl, "lora_b": s * (xd @ A).T @ g,
             "bias": g.sum(0), "x_dropped": (gl @ A.T).reshape(a["x"].shape)}
    return y.reshape(*out_shape, w.shape[0]), grads


def diff_names(a):
    names = ["x", "lora_a", "lora_b"]
    names += [n for n in ("bias", "x_dropped") if a[n] is not None]
    return names


def run_vjp(fn, a, q, names, dy, compile_=False):
    def f(*vals):
        kw = {**a, **dict(zip(names, vals))}
        return fn(**kw, **q)

    g = mx.compile(f) if compile_ else f
    y = g(*[a[n] for n in names])
    vjp = lambda *vals: mx.vjp(f, list(vals), [dy])  # noqa: E731
    if compile_:
        vjp = mx.compile(vjp)
    _, grads = vjp(*[a[n] for n in names])
    return y, dict(zip(names, grads))


def check_all(a, q, dtype, compile_=False):
    names = diff_names(a)
    n = a["weight"].shape[0]
    dy = mx.random.normal((*a["x"].shape[:-1], n)).astype(dtype)
    y, g = run_vjp(qlora_linear, a, q, names, dy, compile_)
    with mx.stream(mx.cpu):  # the references on the CPU (tests/conftest.py says why)
        y_o, g_o = oracle(a, q, dy)
        if a["x"].size == 0:
            # mlx's quantized_matmul dies of SIGFPE on an empty batch: the oracle is exact.
            y_ref = mx.array(y_o).astype(y.dtype)
            g_ref = {n: mx.array(g_o[n]).astype(a[n].dtype) for n in names}
        else:
            y_ref, g_ref = run_vjp(qlora_linear_reference, a, q, names, dy)
            mx.eval(y_ref, g_ref)
    assert y.dtype == y_ref.dtype
    assert_close_to_oracle(y, y_ref, y_o, dtype, "y")
    for name in names:
        assert g[name].dtype == a[name].dtype, name
        assert_close_to_oracle(g[name], g_ref[name], g_o[name], dtype, f"d{name}")


def test_kernel_is_compiled_for_cpu():
    info = ops.backend_info()["ops"]["qlora_linear"]
    assert "cpu" in info["kernels"]
    assert "affine" in info["note"]


def test_kernel_is_compiled_for_gpu():
    if not mx.is_available(mx.gpu) or getattr(_extension.extension(), "gpu_backend", "cpu") == "cpu":
        pytest.skip("no GPU backend in this MLX or this build")
    assert "gpu" in ops.backend_info()["ops"]["qlora_linear"]["kernels"]


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_every_bits_and_group_size(device, bits, group_size):
    a, q = make((5,), 37, 256, 8, bits=bits, group_size=group_size)
    check_all(a, q, mx.float32)


@pytest.mark.parametrize("bits", [3, 4, 6])
def test_every_bits_compiled(device, bits):
    a, q = make((2, 3), 29, 128, 4, bits=bits, group_size=32)
    check_all(a, q, mx.float32, compile_=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (2, 3), (0,), (3, 0)], ids=str)
def test_dtypes_and_shapes(device, dtype, shape):
    a, q = make(shape, 19, 192, 4, bits=5, group_size=64, dtype=dtype)
    check_all(a, q, dtype)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_float32_adapter_on_half_base(device, dtype):
    # mlx-lm's layout: model (x, scales) in half precision, lora_a / lora_b in float32.
    a, q = make((6,), 33, 128, 8, dtype=dtype, lora_dtype=mx.float32)
    check_all(a, q, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_x_dropped_and_no_bias(device, dtype):
    a, q = make((4, 5), 21, 256, 8, bits=3, group_size=128, dtype=dtype, bias=False,
                dropped=True)
    check_all(a, q, dtype)
    a, q = make((4, 5), 21, 256, 8, bits=8, group_size=32, dtype=dtype, dropped=True)
    check_all(a, q, dtype, compile_=True)


def test_larger_than_one_panel(device):
    # More rows and columns than one dequantized panel (CPU: 4 MiB; GPU: a quarter of the
    # dense weight), so panels are stitched, the last one partial.
    a, q = make((33,), 1100, 1024, 16, bits=4, group_size=64)
    check_all(a, q, mx.float32)
    a, q = make((9,), 3000, 512, 4, bits=6, group_size=128, dtype=mx.bfloat16)
    check_all(a, q, mx.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_gpu_blocks(monkeypatch, bits, group_size, dtype):
    """The CUDA kernel dequantizes W in blocks of rows (forward) and columns (dx): blocks
    of 128 make several, the last one partial, and reuse the two alternating buffers."""
    if not mx.is_available(mx.gpu):
        pytest.skip("no GPU")
    monkeypatch.setenv("MLX_TUNER_QLORA_CHUNK_ROWS", "128")
    k = 384 if group_size == 128 else 320  # dx: 3 column blocks (128, 128, 64 when 320)
    a, q = make((3, 5), 300, k, 8, bits=bits, group_size=group_size, dtype=dtype,
                lora_dtype=mx.float32, bias=bits != 4, dropped=bits % 2 == 1)
    prev = mx.default_device()
    mx.set_default_device(mx.gpu)
    try:
        check_all(a, q, dtype)
    finally:
        mx.set_default_device(prev)


@pytest.mark.parametrize("bias", [True, False])
def test_rank_zero_adapter(device, bias):
    a, q = make((4,), 40, 128, 0, bias=bias)
    check_all(a, q, mx.float32)


def test_grad_in_any_argnum_order(device):
    a, q = make((3,), 17, 64, 2, group_size=32)

    def f(B, x):
        return qlora_linear(x, a["weight"], a["scales"], a["biases"], a["lora_a"], B, 0.5,
                            **q).sum()

    def fr(B, x):
        return qlora_linear_reference(x, a["weight"], a["scales"], a["biases"], a["lora_a"],
                                      B, 0.5, **q).sum()

    g = mx.grad(f, argnums=(0, 1))(a["lora_b"], a["x"])
    gr = mx.grad(fr, argnums=(0, 1))(a["lora_b"], a["x"])
    for u, v in zip(g, gr):
        assert u.shape == v.shape
        np.testing.assert_allclose(np.array(u), np.array(v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["weight", "scales", "biases"])
def test_frozen_base_gradients_raise(name):
    a, q = make((3,), 16, 64, 2, bias=False)
    if name == "weight":
        with pytest.raises(ValueError):  # mlx itself refuses a uint32 argument
            mx.grad(lambda w: qlora_linear(**{**a, "weight": w}, **q).sum())(a["weight"])
        return
    with pytest.raises(ValueError, match=r"\[qlora_linear\] gradients with respect to " + name):
        mx.grad(lambda v: qlora_linear(**{**a, name: v}, **q).sum())(a[name])


def test_other_modes_run_the_reference():
    w = mx.random.normal((32, 64))
    wq, s = mx.quantize(w, mode="mxfp4", group_size=32, bits=4)
    x = mx.random.normal((3, 64))
    A, B = mx.random.normal((64, 4)) * 0.1, mx.random.normal((4, 32)) * 0.1
    y = qlora_linear(x, wq, s, None, A, B, 2.0, group_size=32, bits=4, mode="mxfp4")
    y_ref = qlora_linear_reference(x, wq, s, None, A, B, 2.0, group_size=32, bits=4,
                                   mode="mxfp4")
    assert mx.array_equal(y, y_ref)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(bits=7), r"\[qlora_linear\] bits must be one of 2, 3, 4, 5, 6, 8 but got 7"),
        (dict(group_size=16), r"\[qlora_linear\] group_size must be 32, 64 or 128 but got 16"),
        (dict(mode="fp16"), r"\[qlora_linear\] mode must be one of"),
        (dict(x=mx.zeros((3, 65))), r"\[qlora_linear\] x must have last dimension 128"),
        (dict(lora_a=mx.zeros((4, 128))), r"\[qlora_linear\] lora_a must have shape \(128, r\) but got \(4, 128\)"),
        (dict(lora_b=mx.zeros((4, 31))), r"\[qlora_linear\] lora_b must have shape \(4, 32\)"),
        (dict(scales=mx.zeros((32, 3))), r"\[qlora_linear\] scales must have shape \(32, 2\)"),
        (dict(biases=None), r"\[qlora_linear\] biases must be given"),
        (dict(bias=mx.zeros((33,))), r"\[qlora_linear\] bias must have shape \(32,\)"),
        (dict(x_dropped=mx.zeros((2, 128))), r"\[qlora_linear\] x_dropped must have shape"),
        (dict(weight=mx.zeros((32, 16))), r"\[qlora_linear\] weight must be a 2-D uint32"),
        (dict(x=mx.zeros((3, 128), dtype=mx.int32)), r"\[qlora_linear\] x must be float"),
        (dict(lora_b=[[0.0]]), r"\[qlora_linear\] lora_b must be an mx.array but got list"),
    ],
)
def test_errors(change, match):
    a, q = make((3,), 32, 128, 4)
    kw = {**a, **q, **change}
    with pytest.raises(ValueError, match=match):
        qlora_linear(**kw)


def test_cxx_op_validates_too():
    # The binding is public: it must refuse bad input on its own, not crash.
    ext = _extension.extension()
    a, q = make((3,), 32, 128, 4)
    with pytest.raises(ValueError, match=r"\[qlora_linear\] lora_b must have shape \(4, 32\)"):
        ext.qlora_linear(a["x"], a["weight"], a["scales"], a["biases"], a["lora_a"],
                         mx.zeros((4, 31)), 1.0, group_size=64, bits=4)
    with pytest.raises(ValueError, match=r"\[qlora_linear\] bits must be one of"):
        ext.qlora_linear(a["x"], a["weight"], a["scales"], a["biases"], a["lora_a"],
                         a["lora_b"], 1.0, group_size=64, bits=7)


def test_peak_memory_never_holds_the_dequantized_weight():
    n = k = 4096
    a, q = make((8,), n, k, 16, dtype=mx.bfloat16)
    mx.eval(a)

    def step():
        f = lambda x, A, B: qlora_linear(**{**a, "x": x, "lora_a": A, "lora_b": B}, **q).sum()  # noqa: E731
        return mx.value_and_grad(f, argnums=(0, 1, 2))(a["x"], a["lora_a"], a["lora_b"])

    mx.eval(step())
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(step())
    peak = mx.get_peak_memory() - before
    # A bf16 copy of W alone would be 32 MiB (float32: 64 MiB); one panel is 4 MiB.
    assert peak < n * k * 2 / 4, f"peak {peak / 2**20:.1f} MiB"
