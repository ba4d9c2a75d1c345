"""Fused DoRA linear vs mlx-lm's maths (dora_linear_reference) and a float64 oracle:
forward and every gradient, dense and quantized, eager and compiled, over shapes/dtypes."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension, dora_linear, dora_linear_reference, dora_weight_sq_norm
from tests.conftest import assert_close_to_oracle, to_f64

f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16
# (activation/base dtype, LoRA parameter dtype); bf16 base + f32 LoRA is mlx-lm's usual mix
DTYPE_MIXES = [(f32, f32), (f16, f16), (bf16, bf16), (bf16, f32), (f16, f32)]
# (leading dims, in, out, r)
SHAPES = [
    ((4,), 16, 8, 4),
    ((2, 3), 37, 29, 7),
    ((5,), 64, 130, 1),
    ((2, 1, 3), 33, 17, 16),
    ((3,), 40, 24, 20),  # r > 16: the CUDA 1/n kernel's rank-32 instantiation
    ((), 19, 23, 3),  # x is 1-D
    ((0,), 16, 8, 4),  # empty batch
    ((3, 0), 12, 10, 2),
]
QSHAPES = [((3,), 128, 20, 4), ((2, 5), 384, 33, 8), ((0,), 128, 8, 2)]
GRAD_NAMES = ["x", "lora_a", "lora_b", "magnitude", "bias", "x_dropped"]


def has_kernel():
    return "cpu" in _extension.kernel_devices("dora") or mx.default_device() == mx.gpu


def make(lead, k, o, r, dt, pdt, *, bias=True, xd=True, quant=None):
    x = mx.random.normal((*lead, k)).astype(dt)
    w = (mx.random.normal((o, k)) / k**0.5).astype(dt)
    a = (mx.random.uniform(-1, 1, (k, r)) / k**0.5).astype(pdt)
    b = (mx.random.normal((r, o)) * 0.2).astype(pdt)
    m = (mx.random.uniform(0.5, 1.5, (o,))).astype(f32 if pdt == f32 else pdt)
    kw = {"x_dropped": (x * (mx.random.uniform(shape=x.shape) > 0.3) / 0.7).astype(dt)} if xd else {}
    if quant:
        gs, bits = quant
        wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
        w = wq
        kw.update(scales=sc, biases=bi, group_size=gs, bits=bits)
    bb = (mx.random.normal((o,)) * 0.1).astype(dt) if bias else None
    return x, w, a, b, m, bb, kw


def oracle(x, w, a, b, m, s, bias, kw, dy):
    """float64 numpy: output and gradients of sum(y * dy), the norm a constant."""
    if "scales" in kw:
        w = mx.dequantize(w, kw["scales"], kw["biases"], group_size=kw["group_size"],
                          bits=kw["bits"])
    X, W, A, B, M = (to_f64(t) for t in (x, w, a, b, m))
    k = W.shape[1]
    X2 = X.reshape(-1, k)
    XD = to_f64(kw["x_dropped"]).reshape(-1, k) if "x_dropped" in kw else X2
    DY = to_f64(dy).reshape(-1, W.shape[0])
    xa = XD @ A
    u = X2 @ W.T + s * xa @ B
    n = np.linalg.norm(W + s * (A @ B).T, axis=1)
    rs = M / n
    y = rs * u + (to_f64(bias) if bias is not None else 0)
    g = DY * rs
    gB = g @ B.T
    grads = {"lora_a": s * XD.T @ gB, "lora_b": s * xa.T @ g, "magnitude": (DY * u).sum(0) / n,
             "bias": DY.sum(0)}
    if "x_dropped" in kw:
        grads["x"], grads["x_dropped"] = (g @ W).reshape(x.shape), (s * gB @ A.T).reshape(x.shape)
    else:
        grads["x"] = (g @ W + s * gB @ A.T).reshape(x.shape)
    return y.reshape(*x.shape[:-1], W.shape[0]), grads


def run_both(fn, x, w, a, b, m, s, bias, kw, dy, names, compiled=False):
    """y and the vjp of `fn` for the primals in `names`, eager or under mx.compile."""
    def f(*p):
        args = dict(zip(names, p))
        extra = dict(kw)
        if "x_dropped" in args:
            extra["x_dropped"] = args["x_dropped"]
        return fn(args["x"], w, args["lora_a"], args["lora_b"], args["magnitude"], s,
                  args.get("bias", bias), **extra)

    def run(prim, dy):
        out, vjps = mx.vjp(f, prim, [dy])
        return out[0], vjps

    vals = {"x": x, "lora_a": a, "lora_b": b, "magnitude": m, "bias": bias,
            "x_dropped": kw.get("x_dropped")}
    prim = [vals[nm] for nm in names]
    out, vjps = (mx.compile(run) if compiled else run)(prim, dy)
    return out, dict(zip(names, vjps))


def check_all(x, w, a, b, m, s, bias, kw, dt, compiled=False):
    o = w.shape[0]
    dy = mx.random.normal((*x.shape[:-1], o)).astype(dt)
    names = [nm for nm in GRAD_NAMES if (nm != "bias" or bias is not None)
             and (nm != "x_dropped" or "x_dropped" in kw)]
    out_f, g_f = run_both(dora_linear, x, w, a, b, m, s, bias, kw, dy, names, compiled)
    with mx.stream(mx.cpu):  # the references on the CPU (tests/conftest.py says why)
        out_r, g_r = run_both(dora_linear_reference, x, w, a, b, m, s, bias, kw, dy, names)
        mx.eval(out_r, g_r)
        y_o, g_o = oracle(x, w, a, b, m, s, bias, kw, dy)
    assert out_f.dtype == out_r.dtype
    assert_close_to_oracle(out_f, out_r, y_o, dt, "y")
    for nm in names:
        assert g_f[nm].dtype == g_r[nm].dtype, nm
        assert g_f[nm].shape == g_r[nm].shape, nm
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], dt, f"d{nm}")


@pytest.mark.parametrize("lead,k,o,r", SHAPES)
@pytest.mark.parametrize("dt,pdt", DTYPE_MIXES, ids=lambda d: str(d).split(".")[-1])
def test_dense_matches_oracle(device, lead, k, o, r, dt, pdt):
    x, w, a, b, m, bias, kw = make(lead, k, o, r, dt, pdt, bias=r % 2 == 1, xd=k % 2 == 0)
    check_all(x, w, a, b, m, 2.0, bias, kw, dt)


@pytest.mark.parametrize("xd", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("lead,k,o,r", [((3, 11), 64, 48, 8), ((300,), 272, 144, 16)],
                         ids=["small", "tiles"])
def test_widths_of_sixteen(device, xd, lead, k, o, r):
    # bf16 widths that are multiples of 16: on Hopper the CUDA path's own GEMM, m / n in its
    # epilogue, xa made by the GEMM (no dropout) or projected (dropout); "tiles": several row
    # and column tiles, and a partial last k tile in the backward's dx GEMM (out 144). Zero
    # and tiny magnitudes make the backward recompute dm's columns that y lost.
    x, w, a, b, m, bias, kw = make(lead, k, o, r, bf16, f32, bias=False, xd=xd)
    m = mx.where(mx.arange(o) % 7 == 0, 0.0, mx.where(mx.arange(o) % 7 == 1, 1e-35, m))
    check_all(x, w, a, b, m, 2.0, bias, kw, bf16)


@pytest.mark.parametrize("xd", [False, True], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize("gs,bits", [(64, 4), (32, 3), (128, 8)])
@pytest.mark.parametrize("dt", [bf16, f16], ids=str)
def test_quantized_widths_of_sixteen(device, dt, gs, bits, xd):
    # x in the scales' dtype, widths that are multiples of 16: on CUDA one primitive each way
    # (QLoRA's kernels with m / n folded into W's dequantized blocks, B's packed copy and dB);
    # zero and tiny magnitudes make the backward recompute dm's lost columns from the codes.
    x, w, a, b, m, bias, kw = make((3, 11), 128, 48, 8, dt, f32, xd=xd, quant=(gs, bits))
    m = mx.where(mx.arange(48) % 7 == 0, 0.0, mx.where(mx.arange(48) % 7 == 1, 1e-35, m))
    check_all(x, w, a, b, m, 2.0, bias, kw, dt)


@pytest.mark.parametrize("lead,k,o,r", QSHAPES)
@pytest.mark.parametrize("gs,bits", [(32, 2), (64, 3), (64, 4), (128, 4), (32, 5), (64, 6),
                                     (128, 8)])
@pytest.mark.parametrize("dt,pdt", [(f32, f32), (bf16, f32), (f16, f16)],
                         ids=lambda d: str(d).split(".")[-1])
def test_quantized_matches_oracle(device, lead, k, o, r, gs, bits, dt, pdt):
    x, w, a, b, m, bias, kw = make(lead, k, o, r, dt, pdt, bias=bits % 2 == 0,
                                   xd=bits in (3, 4), quant=(gs, bits))
    check_all(x, w, a, b, m, 1.5, bias, kw, dt)


@pytest.mark.parametrize("quant", [None, (64, 4)])
@pytest.mark.parametrize("dt", [f32, bf16])
def test_compiled(device, quant, dt):
    x, w, a, b, m, bias, kw = make((2, 3), 128, 40, 8, dt, f32, quant=quant)
    check_all(x, w, a, b, m, 2.0, bias, kw, dt, compiled=True)


def test_value_and_grad_compiled_matches_eager():
    x, w, a, b, m, bias, kw = make((6,), 64, 30, 4, f32, f32)

    def loss(a, b, m):
        return (dora_linear(x, w, a, b, m, 2.0, bias, **kw) ** 2).sum()

    eager = mx.value_and_grad(loss, argnums=(0, 1, 2))(a, b, m)
    comp = mx.compile(mx.value_and_grad(loss, argnums=(0, 1, 2)))(a, b, m)
    for e, c in zip([eager[0], *eager[1]], [comp[0], *comp[1]]):
        np.testing.assert_allclose(np.array(e), np.array(c), rtol=1e-5, atol=1e-5)


def test_cached_weight_sq_norm_and_scalar_scale():
    for quant in (None, (32, 4)):
        x, w, a, b, m, bias, kw = make((5,), 96, 21, 3, f32, f32, quant=quant)
        qkw = {k: kw[k] for k in ("scales", "biases", "group_size", "bits") if k in kw}
        c = dora_weight_sq_norm(w, qkw.get("scales"), qkw.get("biases"),
                                group_size=qkw.get("group_size", 64), bits=qkw.get("bits", 4))
        y1 = dora_linear(x, w, a, b, m, mx.array(2.0), bias, weight_sq_norm=c, **kw)
        y2 = dora_linear_reference(x, w, a, b, m, 2.0, bias, **kw)
        np.testing.assert_allclose(np.array(y1), np.array(y2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dt", [f32, f16, bf16])
def test_zero_and_tiny_magnitude_gradient(device, dt):
    # dm cannot come from y = (m/n) u where m is 0 (or tiny in float16): recomputed there.
    x, w, a, b, m, bias, kw = make((7,), 48, 12, 4, dt, f32)
    m = mx.where(mx.arange(12) % 3 == 0, 0.0, mx.where(mx.arange(12) % 3 == 1, 1e-4, m))
    check_all(x, w, a, b, m, 2.0, bias, kw, dt)


@pytest.mark.parametrize("quant", [None, (64, 4)], ids=["dense", "q4"])
def test_dm_over_many_tiles(device, quant):
    """dm summed over several row and column tiles of the backward's pass over dy and y,
    a partial last column tile, zero magnitudes recomputed."""
    x, w, a, b, m, bias, kw = make((300,), 64, 304, 8, bf16, f32, xd=False, quant=quant)
    m = mx.where(mx.arange(304) % 37 == 0, 0.0, m)
    check_all(x, w, a, b, m, 2.0, bias, kw, bf16)


def test_two_backwards_of_one_forward_compiled(device):
    """Two gradients of the same forward in one compiled graph (mx.compile may merge the
    two forwards into one node, whose saved values both backwards then read), evaluated
    again from the compiled cache."""
    x, w, a, b, m, _, _ = make((130,), 64, 48, 8, bf16, f32, bias=False, xd=False)
    dy1 = mx.random.normal((130, 48)).astype(bf16)
    dy2 = mx.random.normal((130, 48)).astype(bf16)

    def two(m, dy1, dy2):
        f = lambda m: [dora_linear(x, w, a, b, m, 2.0)]  # noqa: E731
        return mx.vjp(f, [m], [dy1])[1][0], mx.vjp(f, [m], [dy2])[1][0]

    eager = two(m, dy1, dy2)
    comp = mx.compile(two)(m, dy1, dy2)
    for e, c in zip(eager, comp):
        np.testing.assert_allclose(np.array(c), np.array(e), rtol=1e-5, atol=1e-6)
    for _ in range(2):
        again = mx.compile(two)(m, dy1, dy2)
        np.testing.assert_array_equal(np.array(again[1]), np.array(comp[1]))


@pytest.mark.parametrize("quant", [None, (64, 4), (32, 3)])
@pytest.mark.parametrize("dt,pdt", [(f32, f32), (bf16, f32), (f16, f16)],
                         ids=lambda d: str(d).split(".")[-1])
def test_gpu_composition_on_cpu(quant, dt, pdt):
    # The graph the GPU runs (MLX GEMMs, DoRARowSqNorm, LoRA primitive, DoRAScale) on the CPU.
    ext = _extension.extension()
    x, w, a, b, m, bias, kw = make((2, 3), 128, 24, 4, dt, pdt, quant=quant)

    def composed(x, w, a, b, m, s, bias, **k):
        k.pop("mode", None)
        return ext.dora_linear(x, w, a, b, m, s, bias, compose=True, **k)

    dy = mx.random.normal((2, 3, 24)).astype(dt)
    names = ["x", "lora_a", "lora_b", "magnitude", "bias", "x_dropped"]
    out_f, g_f = run_both(composed, x, w, a, b, m, 2.0, bias, kw, dy, names)
    out_r, g_r = run_both(dora_linear_reference, x, w, a, b, m, 2.0, bias, kw, dy, names)
    y_o, g_o = oracle(x, w, a, b, m, 2.0, bias, kw, dy)
    assert_close_to_oracle(out_f, out_r, y_o, dt, "y")
    for nm in names:
        assert g_f[nm].dtype == g_r[nm].dtype, nm
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], dt, f"d{nm}")


@pytest.mark.parametrize("bias_dt", [bf16, f32], ids=["same", "wider"])
def test_gpu_composition_scale_and_bias(bias_dt):
    # The composed graph scales with DoRAScale (the CUDA path's kernel; here its CPU twin). A
    # bias of the output's dtype goes into it; a wider one is added after it and promotes
    # the output, as mlx-lm's add does.
    ext = _extension.extension()
    x, w, a, b, m, _, kw = make((5,), 64, 24, 4, bf16, f32)
    bias = (mx.random.normal((24,)) * 0.1).astype(bias_dt)

    def composed(x, w, a, b, m, s, bias, **k):
        return ext.dora_linear(x, w, a, b, m, s, bias, compose=True, **k)

    assert "DoRAScale" in _graph_names(composed(x, w, a, b, m, 2.0, bias, **kw))
    dy = mx.random.normal((5, 24)).astype(bias_dt)
    names = ["x", "lora_a", "lora_b", "magnitude", "bias", "x_dropped"]
    out_f, g_f = run_both(composed, x, w, a, b, m, 2.0, bias, kw, dy, names)
    out_r, g_r = run_both(dora_linear_reference, x, w, a, b, m, 2.0, bias, kw, dy, names)
    y_o, g_o = oracle(x, w, a, b, m, 2.0, bias, kw, dy)
    assert out_f.dtype == out_r.dtype == bias_dt
    assert_close_to_oracle(out_f, out_r, y_o, bf16, "y")
    for nm in names:
        assert g_f[nm].dtype == g_r[nm].dtype, nm
        assert_close_to_oracle(g_f[nm], g_r[nm], g_o[nm], bf16, f"d{nm}")


def test_no_gradient_asked_for_params_is_not_computed():
    x, w, a, b, m, bias, kw = make((4,), 32, 16, 2, f32, f32)
    g = mx.grad(lambda x: dora_linear(x, w, a, b, m, 1.0).sum())(x)
    _, go = oracle(x, w, a, b, m, 1.0, None, {}, mx.ones((4, 16)))
    np.testing.assert_allclose(np.array(g), go["x"], rtol=1e-4, atol=1e-5)


def test_weight_gradient_dense():
    x, w, a, b, m, _, _ = make((4,), 24, 10, 2, f32, f32)
    gf = mx.grad(lambda w: (dora_linear(x, w, a, b, m, 1.0) ** 2).sum())(w)
    gr = mx.grad(lambda w: (dora_linear_reference(x, w, a, b, m, 1.0) ** 2).sum())(w)
    np.testing.assert_allclose(np.array(gf), np.array(gr), rtol=1e-4, atol=1e-5)


def test_kernel_is_used_on_cpu():
    assert has_kernel(), "the dora family has no CPU kernel in this build"
    x, w, a, b, m, _, _ = make((2,), 16, 8, 2, f32, f32)
    # The reference builds W + s B^T A^T; the fused graph holds the DoRA primitive instead.
    y = dora_linear(x, w, a, b, m, 1.0)
    assert "DoRALinear" in _graph_names(y)


@pytest.mark.skipif(mx.default_device() != mx.gpu
                    or getattr(_extension.extension(), "gpu_backend", None) != "cuda",
                    reason="the one-primitive DoRA path is CUDA's")
@pytest.mark.parametrize("quant", [None, (64, 4)], ids=["dense", "q4"])
def test_cuda_runs_one_primitive_each_way(quant):
    x, w, a, b, m, _, kw = make((4,), 64, 48, 8, bf16, f32, bias=False, xd=False, quant=quant)
    dy = mx.ones((4, 48), bf16)
    y, vjp = mx.vjp(lambda a, m: [dora_linear(x, w, a, b, m, 2.0, **kw)], [a, m], [dy])
    names = _graph_names(y[0]) + _graph_names(vjp[0]) + _graph_names(vjp[1])
    assert "DoRALinear" in names and "DoRALinearVJP" in names
    assert "DoRAScale" not in names and "DoRAInvNorm" not in names


def _graph_names(y):
    import io

    buf = io.StringIO()
    mx.export_to_dot(buf, y)
    return buf.getvalue()


@pytest.mark.parametrize("dt,quant", [(f32, None), (bf16, None), (f32, (64, 4))])
def test_no_out_by_in_temporary(dt, quant):
    # out x in float32 is 16 MiB here; the reference's adapted weight alone is that big.
    k = o = 2048
    x, w, a, b, m, bias, kw = make((8,), k, o, 16, dt, f32, xd=False, quant=quant)
    mx.eval(x, w, a, b, m, bias, kw)
    full = o * k * 4

    def step(fn):
        return mx.grad(lambda x, a, b, m: fn(x, w, a, b, m, 2.0, bias, **kw).sum(),
                       argnums=(0, 1, 2, 3))(x, a, b, m)

    def peak(fn):
        mx.eval(step(fn))
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step(fn))
        return mx.get_peak_memory() - before

    fused, ref = peak(dora_linear), peak(dora_linear_reference)
    assert ref > full, ref
    assert fused < full // 2, (fused, ref)


@pytest.mark.parametrize("case,match", [
    ("a_shape", r"\[dora_linear\] lora_a must have shape \(64, \d+\) but got \(4, 64\)"),
    ("b_shape", r"\[dora_linear\] lora_b must have shape \(4, 8\)"),
    ("m_shape", r"\[dora_linear\] magnitude must have shape \(8,\) but got \(9,\)"),
    ("x_last", r"\[dora_linear\] x must have last dimension 64"),
    ("bias", r"\[dora_linear\] bias must have shape \(8,\)"),
    ("xd", r"\[dora_linear\] x_dropped must have shape"),
    ("int_x", r"\[dora_linear\] x must be float32, float16 or bfloat16 but got int32"),
    ("bits", r"\[dora_linear\] bits must be one of 2, 3, 4, 5, 6, 8 but got 7"),
    ("mode", r"\[dora_linear\] mode must be one of"),
    ("sqnorm", r"\[dora_linear\] weight_sq_norm must have shape \(8,\)"),
    ("list_x", r"\[dora_linear\] x must be an mx.array but got list"),
    ("int_xd", r"\[dora_linear\] x_dropped must be float32, float16 or bfloat16 but got int32"),
])
def test_errors(case, match):
    x, w, a, b, m, bias, _ = make((3,), 64, 8, 4, f32, f32)
    args, kw = [x, w, a, b, m, 1.0, None], {}
    if case == "a_shape":
        args[2] = a.T
    elif case == "b_shape":
        args[3] = b[:, :5]
    elif case == "m_shape":
        args[4] = mx.ones((9,))
    elif case == "x_last":
        args[0] = x[:, :10]
    elif case == "bias":
        args[6] = mx.ones((7,))
    elif case == "xd":
        kw["x_dropped"] = x[:2]
    elif case == "int_x":
        args[0] = x.astype(mx.int32)
    elif case == "list_x":
        args[0] = x.tolist()
    elif case == "int_xd":
        kw["x_dropped"] = x.astype(mx.int32)
    elif case == "sqnorm":
        kw["weight_sq_norm"] = mx.ones((3,))
    else:
        wq, sc, bi = mx.quantize(w, group_size=32, bits=4)
        args[1] = wq
        kw.update(scales=sc, biases=bi, group_size=32, bits=7 if case == "bits" else 4)
        if case == "mode":
            kw["mode"] = "nope"
    with pytest.raises(ValueError, match=match):
        dora_linear(*args, **kw)
