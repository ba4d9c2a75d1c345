"""Fused LoRA switch layer vs mlx-lm's gather_mm maths (lora_switch_linear_reference) and
a float64 oracle: forward and gradients, eager and compiled, over random expert shapes,
routings, dtypes and argnums; errors; the empty batch."""

from __future__ import annotations

import io
import random

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension, lora_switch_linear, lora_switch_linear_reference
from tests.conftest import assert_close_to_oracle, to_f64

f32, f16, bf16 = mx.float32, mx.float16, mx.bfloat16
NAMES = ["x", "weight", "lora_a", "lora_b", "bias", "x_dropped"]


def random_cases(n, seed):
    """(x shape, indices shape, experts, out, r): SwitchGLU's (..., 1, 1, in) with
    (..., k) indices, the sorted form (P, 1, in) with (P,), and M > 1 rows per pair."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        e, k = rng.randint(1, 8), rng.randint(1, 4)
        k = min(k, e)
        din, dout, r = rng.choice([3, 17, 33, 48]), rng.choice([5, 19, 40]), rng.randint(1, 16)
        kind = i % 3
        if kind == 0:
            lead = rng.choice([(7,), (2, 5), (1,)])
            cases.append(((*lead, 1, 1, din), (*lead, k), e, dout, r))
        elif kind == 1:
            p = rng.randint(1, 20)
            cases.append(((p, 1, din), (p,), e, dout, r))
        else:
            t, m = rng.randint(1, 6), rng.randint(2, 4)
            cases.append(((t, m, din), (t,), e, dout, r))
    return cases


CASES = random_cases(9, 0)


def make(case, dt, lora_dt, seed=0, bias=True, dropped=True, sort=False):
    xs, ids, e, dout, r = case
    din = xs[-1]
    k = mx.random.split(mx.random.key(seed), 7)
    x = mx.random.normal(xs, key=k[0]).astype(dt)
    w = (mx.random.normal((e, dout, din), key=k[1]) / np.sqrt(din)).astype(dt)
    a = (mx.random.normal((e, r, din), key=k[2]) / np.sqrt(din)).astype(lora_dt)
    b = mx.random.normal((e, dout, r), key=k[3]).astype(lora_dt)
    bb = mx.random.normal((e, dout), key=k[4]).astype(dt) if bias else None
    xd = mx.random.normal(xs, key=k[5]).astype(dt) if dropped else None
    idx = mx.random.randint(0, e, ids, key=k[6]).astype(mx.uint32)
    if sort:
        idx = mx.sort(idx.flatten()).reshape(ids)
    return [x, w, a, b, bb, xd], idx


def unbroadcast(g, shape):
    """Sum g over the dimensions broadcasting added to reach g.shape from shape."""
    while g.ndim > len(shape):
        g = g.sum(0)
    for i, s in enumerate(shape):
        if s == 1 and g.shape[i] != 1:
            g = g.sum(i, keepdims=True)
    return g


def oracle(args, idx, scale, dy=None):
    """float64 forward, and the gradients of <y, dy> when dy is given."""
    x, w, a, b, bb, xd = [None if t is None else to_f64(t) for t in args]
    idx = np.array(idx).astype(np.int64)
    m, din = x.shape[-2:]
    dout = w.shape[1]
    batch = np.broadcast_shapes(x.shape[:-2], idx.shape)
    X = np.broadcast_to(x, batch + (m, din)).reshape(-1, m, din)
    XD = X if xd is None else np.broadcast_to(xd, batch + (m, din)).reshape(-1, m, din)
    ii = np.broadcast_to(idx, batch).reshape(-1)
    wt, at, bt = w[ii].transpose(0, 2, 1), a[ii].transpose(0, 2, 1), b[ii].transpose(0, 2, 1)
    xa = XD @ at
    y = X @ wt + scale * xa @ bt
    if bb is not None:
        y = y + bb[ii][:, None, :]
    if dy is None:
        return y.reshape(batch + (m, dout))
    dy = to_f64(dy).reshape(-1, m, dout)
    g = dy @ b[ii]
    lora_dx = scale * g @ a[ii]
    dx = dy @ w[ii] + (lora_dx if xd is None else 0)
    out = {"x": unbroadcast(dx.reshape(batch + (m, din)), x.shape),
           "x_dropped": unbroadcast(lora_dx.reshape(batch + (m, din)), x.shape)}
    for name, per_pair, shape in [
        ("weight", dy.transpose(0, 2, 1) @ X, w.shape),
        ("lora_a", scale * g.transpose(0, 2, 1) @ XD, a.shape),
        ("lora_b", scale * dy.transpose(0, 2, 1) @ xa, b.shape),
        ("bias", dy.sum(1), (w.shape[0], dout)),
    ]:
        acc = np.zeros(shape)
        np.add.at(acc, ii, per_pair)
        out[name] = acc
    return out


def half_on_cpu(args):
    return mx.default_device() == mx.cpu and args[0].dtype != f32


def up(args):
    return [None if t is None else t.astype(f32) for t in args]


def reference_in_dtype(args, idx, scale, sort=False):
    """mlx-lm's maths in the inputs' dtype. MLX's CPU gather_mm runs float32 only (its
    half-precision inputs raise), so there the float32 result is rounded to the dtype."""
    if not half_on_cpu(args):
        return call(lora_switch_linear_reference, args, idx, scale, sort)
    # (x, weight and bias share one dtype in these tests: it is the output's)
    return call(lora_switch_linear_reference, up(args), idx, scale, sort).astype(args[0].dtype)


def call(fn, args, idx, scale, sort=False):
    x, w, a, b, bb, xd = args
    return fn(x, w, a, b, idx, scale, bb, x_dropped=xd, sorted_indices=sort)


def vjp(fn, args, idx, scale, argnums, dy):
    present = [i for i, t in enumerate(args) if t is not None]

    def f(*prim):
        full = list(args)
        for i, p in zip(present, prim):
            full[i] = p
        return call(fn, full, idx, scale)

    grads = mx.vjp(f, [args[i] for i in present], [dy])[1]
    return {NAMES[i]: grads[present.index(i)] for i in argnums}


def test_kernel_is_used_on_cpu():
    if _extension.kernel_for("lora_switch", mx.cpu) is None:
        pytest.skip("extension not built")
    args, idx = make(CASES[0], f32, f32)
    y = call(lora_switch_linear, args, idx, 0.5)
    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    assert "LoRASwitchLinear" in dot.getvalue() and "GatherMM" not in dot.getvalue()
    x = args[0]
    _, (dx,) = mx.vjp(lambda x: call(lora_switch_linear, [x, *args[1:]], idx, 0.5), [x],
                      [mx.ones_like(y)])
    dot = io.StringIO()
    mx.export_to_dot(dot, dx)
    assert "LoRASwitchLinearVJP" in dot.getvalue() and "GatherMM" not in dot.getvalue()


DTYPE_MIXES = [(f32, f32), (f16, f32), (bf16, f32), (bf16, bf16)]
DT_IDS = lambda d: str(d).split(".")[-1]  # noqa: E731


@pytest.mark.parametrize("dt,lora_dt", DTYPE_MIXES, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bias,dropped,sort", [(False, False, False), (True, True, True)])
def test_forward(device, dt, lora_dt, case, bias, dropped, sort):
    args, idx = make(case, dt, lora_dt, bias=bias, dropped=dropped, sort=sort)
    y = call(lora_switch_linear, args, idx, 1.7, sort)
    ref = reference_in_dtype(args, idx, 1.7, sort)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    assert_close_to_oracle(y, ref, oracle(args, idx, 1.7), dt)


@pytest.mark.parametrize("dt,lora_dt", DTYPE_MIXES, ids=DT_IDS)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("bias,dropped", [(False, False), (True, True)])
def test_all_gradients(device, dt, lora_dt, case, bias, dropped):
    args, idx = make(case, dt, lora_dt, seed=1, bias=bias, dropped=dropped)
    ref_y = reference_in_dtype(args, idx, 0.8)
    dy = mx.random.normal(ref_y.shape, key=mx.random.key(7)).astype(ref_y.dtype)
    argnums = [i for i, t in enumerate(args) if t is not None]
    got = vjp(lora_switch_linear, args, idx, 0.8, argnums, dy)
    if half_on_cpu(args):  # see reference_in_dtype
        ref = vjp(lora_switch_linear_reference, up(args), idx, 0.8, argnums, dy.astype(f32))
        ref = {k: v.astype(args[NAMES.index(k)].dtype) for k, v in ref.items()}
    else:
        ref = vjp(lora_switch_linear_reference, args, idx, 0.8, argnums, dy)
    want = oracle(args, idx, 0.8, dy)
    for name in got:
        assert got[name].dtype == args[NAMES.index(name)].dtype, name
        assert got[name].shape == ref[name].shape, name
        assert_close_to_oracle(got[name], ref[name], want[name], dt, what=f"d{name}")


@pytest.mark.parametrize("argnums", [(0,), (2,), (3,), (5,), (2, 3), (0, 2, 3, 5), (1, 4)],
                         ids=str)
def test_argnums_subsets(device, argnums):
    args, idx = make(((4, 1, 1, 21), (4, 3), 5, 19, 6), bf16, f32, seed=2)
    dy = mx.random.normal(call(lora_switch_linear_reference, args, idx, 2.0).shape,
                          key=mx.random.key(3)).astype(bf16)

    def loss(fn):
        return lambda *p: (call(fn, list(p), idx, 2.0).astype(f32) * dy.astype(f32)).sum()

    got = mx.grad(loss(lora_switch_linear), argnums=argnums)(*args)
    ref = mx.grad(loss(lora_switch_linear_reference), argnums=argnums)(
        *(up(args) if half_on_cpu(args) else args))
    if len(argnums) == 1:
        got, ref = [got], [ref]
    want = oracle(args, idx, 2.0, dy)
    for i, g, r in zip(argnums, got, ref):
        assert_close_to_oracle(g, r, want[NAMES[i]], bf16, what=f"d{NAMES[i]}")


@pytest.mark.parametrize("dt", [f32, bf16], ids=DT_IDS)
@pytest.mark.parametrize("dropped", [False, True])
def test_compiled_value_and_grad(device, dt, dropped):
    args, idx = make(((3, 4, 1, 1, 45), (3, 4, 2), 6, 31, 8), dt, f32, dropped=dropped, seed=4)
    x, w, a, b, bb, xd = args

    def loss(fn):
        def f(a, b, x, xd):
            y = fn(x, w, a, b, idx, 1.3, bb, x_dropped=xd)
            return (y.astype(f32) ** 2).mean()
        return f

    argnums = [0, 1, 2] + ([3] if dropped else [])
    fused = mx.compile(mx.value_and_grad(loss(lora_switch_linear), argnums=argnums))
    eager = mx.value_and_grad(loss(lora_switch_linear_reference), argnums=argnums)
    if half_on_cpu(args):  # see reference_in_dtype
        w, bb = w.astype(f32), bb.astype(f32)
        eager = mx.value_and_grad(loss(lora_switch_linear_reference), argnums=argnums)
    for _ in range(2):  # the second call runs the cached compiled graph
        v, g = fused(a, b, x, xd)
        vr, gr = eager(a, b, *(up([x, xd]) if half_on_cpu(args) else [x, xd]))
        assert abs(v.item() - vr.item()) <= 2e-2 * max(1.0, abs(vr.item()))
        for gi, ri, arg in zip(g, gr, [a, b, x, xd]):
            assert gi.dtype == arg.dtype and gi.shape == ri.shape
            tol = {f32: 1e-4, bf16: 5e-2}[dt] * max(1.0, float(mx.abs(ri.astype(f32)).max()))
            assert float(mx.abs(gi.astype(f32) - ri.astype(f32)).max()) <= tol


@pytest.mark.parametrize("dropped", [False, True])
@pytest.mark.parametrize("routing", ["balanced", "skewed"])
def test_concurrent_and_sequential_experts(device, routing, dropped):
    """Many pairs over several experts: balanced routing runs the experts concurrently on
    the CPU (tokens' k slots in different experts, some twice in one expert, all add into
    one dx block), skewed routing (one expert holds most pairs) runs them in turn."""
    case = ((48, 1, 1, 40), (48, 4), 8, 24, 6)
    args, idx = make(case, f32, f32, seed=3, bias=True, dropped=dropped)
    if routing == "skewed":
        idx = mx.where(mx.arange(idx.size).reshape(idx.shape) % 8 == 0, idx, 0)
    idx = idx.astype(mx.uint32)
    dy = mx.random.normal((48, 4, 1, 24), key=mx.random.key(5))
    argnums = [i for i, t in enumerate(args) if t is not None]
    got_y = call(lora_switch_linear, args, idx, 0.5)
    got = vjp(lora_switch_linear, args, idx, 0.5, argnums, dy)
    ref_y = call(lora_switch_linear_reference, args, idx, 0.5)
    ref = vjp(lora_switch_linear_reference, args, idx, 0.5, argnums, dy)
    assert_close_to_oracle(got_y, ref_y, oracle(args, idx, 0.5), f32, what="y")
    want = oracle(args, idx, 0.5, dy)
    for name in got:
        assert_close_to_oracle(got[name], ref[name], want[name], f32, what=f"d{name}")


def test_experts_without_tokens_get_zero_gradients(device):
    args, _ = make(((6, 1, 1, 16), (6, 2), 8, 12, 4), f32, f32, bias=True, dropped=False)
    idx = mx.array([[1, 3]] * 6, dtype=mx.uint32)
    g = vjp(lora_switch_linear, args, idx, 1.0, [1, 2, 3, 4], mx.ones((6, 2, 1, 12)))
    for name in ("weight", "lora_a", "lora_b", "bias"):
        assert float(mx.abs(g[name][mx.array([0, 2, 4, 5, 6, 7])]).max()) == 0.0, name
        assert float(mx.abs(g[name][1]).max()) > 0.0, name


@pytest.mark.parametrize("xs,ids", [((0, 1, 1, 8), (0, 2)), ((3, 1, 1, 8), (3, 0))], ids=str)
def test_empty_batch(device, xs, ids):
    args, idx = make((xs, ids, 3, 5, 2), bf16, f32)
    y = call(lora_switch_linear, args, idx, 1.0)
    ref = call(lora_switch_linear_reference, args, idx, 1.0)
    assert y.shape == ref.shape and y.dtype == ref.dtype and y.size == 0
    g = mx.grad(lambda a: call(lora_switch_linear, [args[0], args[1], a, *args[3:]], idx,
                               1.0).astype(f32).sum())(args[2])
    assert g.shape == args[2].shape and float(mx.abs(g).max()) == 0.0


def test_out_of_range_expert_gives_nan_not_a_crash():
    if _extension.kernel_for("lora_switch", mx.cpu) is None:
        pytest.skip("extension not built")
    args, _ = make(((2, 1, 1, 8), (2, 1), 3, 5, 2), f32, f32)
    y = call(lora_switch_linear, args, mx.array([[1], [7]], dtype=mx.uint32), 1.0)
    assert not mx.isnan(y[0]).any().item() and mx.isnan(y[1]).all().item()


def _base_args():
    args, idx = make(((4, 1, 1, 8), (4, 2), 3, 5, 2), f32, f32)
    x, w, a, b, bb, xd = args
    return dict(x=x, weight=w, lora_a=a, lora_b=b, indices=idx, scale=1.0, bias=bb,
                x_dropped=xd)


@pytest.mark.parametrize("fn", [lora_switch_linear, lora_switch_linear_reference],
                         ids=["fused", "reference"])
@pytest.mark.parametrize("change,match", [
    (dict(x=mx.zeros((4, 7))), r"x must have last dimension 8 \(weight is \(3, 5, 8\)\) but got shape \(4, 7\)"),
    (dict(x=mx.zeros((8,))), r"x must have at least 2 dimension\(s\) but got shape \(8,\)"),
    (dict(weight=mx.zeros((5, 8))), r"weight must have 3 dimensions but got shape \(5, 8\)"),
    (dict(lora_a=mx.zeros((3, 8, 2))), r"lora_a must have shape \(3, 8, 8\) but got \(3, 8, 2\)"),
    (dict(lora_b=mx.zeros((3, 2, 5))), r"lora_b must have shape \(3, 5, 2\) but got \(3, 2, 5\)"),
    (dict(bias=mx.zeros((5,))), r"bias must have 2 dimensions but got shape \(5,\)"),
    (dict(x_dropped=mx.zeros((4, 1, 8))), r"x_dropped must have shape \(4, 1, 1, 8\) but got \(4, 1, 8\)"),
    (dict(indices=mx.zeros((4, 2))), r"indices must be an integer array but got float32"),
    (dict(indices=mx.zeros((3, 2), dtype=mx.int32)), r"indices must broadcast with x's batch dimensions \(4, 1\) but got shape \(3, 2\)"),
    (dict(scale="2"), r"scale must be a float but got str"),
])
def test_errors(fn, change, match):
    kw = {**_base_args(), **change}
    with pytest.raises(ValueError, match=r"\[lora_switch_linear\] " + match):
        fn(kw.pop("x"), kw.pop("weight"), kw.pop("lora_a"), kw.pop("lora_b"), kw.pop("indices"),
           kw.pop("scale"), kw.pop("bias"), **kw)


def test_cpp_op_validates_directly():
    ext = _extension.extension()
    if ext is None or not hasattr(ext, "lora_switch_linear"):
        pytest.skip("extension not built")
    kw = _base_args()
    with pytest.raises(ValueError, match=r"\[lora_switch_linear\] lora_b must have shape \(3, 5, 2\) but got \(3, 2, 5\)"):
        ext.lora_switch_linear(kw["x"], kw["weight"], kw["lora_a"], mx.zeros((3, 2, 5)),
                               kw["indices"], 1.0)
    with pytest.raises(ValueError, match=r"\[lora_switch_linear\] indices must be an integer array"):
        ext.lora_switch_linear(kw["x"], kw["weight"], kw["lora_a"], kw["lora_b"],
                               mx.zeros((4, 2)), 1.0)


def test_gradient_of_indices_is_refused():
    kw = _base_args()
    route = lambda x: mx.argpartition(-x.sum((-1, -2)), 1, axis=-1)[..., :2]  # noqa: E731
    x = mx.random.normal((4, 3, 1, 8))
    with pytest.raises(ValueError, match=r"indices"):
        mx.grad(lambda x: lora_switch_linear(x, kw["weight"], kw["lora_a"], kw["lora_b"],
                                             route(x), 1.0).sum())(x)


# --- affine-quantized base (mlx-lm's QuantizedSwitchLinear): gather_qmm's maths ---

BITS = [2, 3, 4, 5, 6, 8]
GROUP_SIZES = [32, 64, 128]
QCASE = ((6, 1, 1, 128), (6, 2), 5, 24, 4)  # SwitchGLU's layout; in = 128 fits every group


def qmake(case, dt, bits, gs, seed=0, bias=True, dropped=True, sort=False):
    """make()'s inputs with W quantized in dt (so scales are dt, as mx.quantize gives);
    the oracle's args carry the dequantized W."""
    args, idx = make(case, dt, f32, seed=seed, bias=bias, dropped=dropped, sort=sort)
    wq, sc, bi = mx.quantize(args[1], gs, bits)
    q = dict(weight=wq, scales=sc, biases=bi, group_size=gs, bits=bits)
    dense = list(args)
    dense[1] = mx.dequantize(wq, sc, bi, gs, bits)
    return args, dense, q, idx


def qcall(fn, args, q, idx, scale, sort=False):
    x, _, a, b, bb, xd = args
    return fn(x, q["weight"], a, b, idx, scale, bb, x_dropped=xd, sorted_indices=sort,
              scales=q["scales"], biases=q["biases"], group_size=q["group_size"],
              bits=q["bits"])


def qup(args, q):
    """float32 inputs for MLX's CPU gather_mm (see reference_in_dtype)."""
    return up(args), {**q, "scales": q["scales"].astype(f32), "biases": q["biases"].astype(f32)}


def qvjp(fn, args, q, idx, scale, argnums, dy):
    def f(*prim):
        full = list(args)
        for i, p in zip(argnums, prim):
            full[i] = p
        return qcall(fn, full, q, idx, scale)

    grads = mx.vjp(f, [args[i] for i in argnums], [dy])[1]
    return {NAMES[i]: g for i, g in zip(argnums, grads)}


def test_quantized_kernel_is_used_on_cpu():
    if _extension.kernel_for("lora_switch", mx.cpu) is None:
        pytest.skip("extension not built")
    args, _, q, idx = qmake(QCASE, f32, 4, 64)
    y = qcall(lora_switch_linear, args, q, idx, 0.5)
    _, (dx,) = mx.vjp(lambda x: qcall(lora_switch_linear, [x, *args[1:]], q, idx, 0.5),
                      [args[0]], [mx.ones_like(y)])
    for out, prim in [(y, "LoRASwitchLinear"), (dx, "LoRASwitchLinearVJP")]:
        dot = io.StringIO()
        mx.export_to_dot(dot, out)
        assert prim in dot.getvalue() and "GatherQMM" not in dot.getvalue()
        assert "Dequantize" not in dot.getvalue()


# every bits x group size in float32; half precision at a few (keeps the suite fast)
QGRID = [(b, g, f32) for b in BITS for g in GROUP_SIZES] + [
    (b, g, dt) for dt in (bf16, f16) for b, g in [(2, 32), (4, 64), (5, 128), (8, 64)]]


@pytest.mark.parametrize("bits,gs,dt", QGRID, ids=lambda v: DT_IDS(v) if isinstance(v, mx.Dtype) else str(v))
def test_quantized_forward_and_gradients(device, bits, gs, dt):
    sort = (bits + gs) % 2 == 0  # sorted and unsorted indices across the grid
    args, dense, q, idx = qmake(QCASE, dt, bits, gs, seed=bits * gs, sort=sort)
    y = qcall(lora_switch_linear, args, q, idx, 1.3, sort)
    half = half_on_cpu(args)
    rargs, rq = qup(args, q) if half else (args, q)
    ref_y = qcall(lora_switch_linear_reference, rargs, rq, idx, 1.3, sort).astype(y.dtype)
    assert y.dtype == dt and y.shape == ref_y.shape
    assert_close_to_oracle(y, ref_y, oracle(dense, idx, 1.3), dt, what="y")
    dy = mx.random.normal(y.shape, key=mx.random.key(bits)).astype(dt)
    argnums = [0, 2, 3, 4, 5]
    got = qvjp(lora_switch_linear, args, q, idx, 1.3, argnums, dy)
    ref = qvjp(lora_switch_linear_reference, rargs, rq, idx, 1.3, argnums,
               dy.astype(f32) if half else dy)
    want = oracle(dense, idx, 1.3, dy)
    for name in got:
        assert got[name].dtype == args[NAMES.index(name)].dtype, name
        r = ref[name].astype(got[name].dtype)
        assert_close_to_oracle(got[name], r, want[name], dt, what=f"d{name}")


@pytest.mark.parametrize("bits,gs", [(4, 64), (3, 128)], ids=str)
def test_quantized_without_dropout_or_bias_and_concurrent_experts(device, bits, gs):
    """Many pairs over 8 experts (concurrent on the CPU), dx taking the LoRA term."""
    args, dense, q, idx = qmake(((40, 1, 1, 256), (40, 4), 8, 48, 6), f32, bits, gs,
                                bias=False, dropped=False)
    dy = mx.random.normal((40, 4, 1, 48), key=mx.random.key(1))
    got = qvjp(lora_switch_linear, args, q, idx, 0.5, [0, 2, 3], dy)
    ref = qvjp(lora_switch_linear_reference, args, q, idx, 0.5, [0, 2, 3], dy)
    want = oracle(dense, idx, 0.5, dy)
    for name in got:
        assert_close_to_oracle(got[name], ref[name], want[name], f32, what=f"d{name}")


@pytest.mark.parametrize("dt", [f32, bf16], ids=DT_IDS)
def test_quantized_compiled_value_and_grad(device, dt):
    args, _, q, idx = qmake(((3, 4, 1, 1, 128), (3, 4, 2), 6, 40, 8), dt, 4, 32, seed=4)
    x, _, a, b, bb, xd = args
    rargs, rq = qup(args, q) if half_on_cpu(args) else (args, q)

    def loss(fn, bb, q):
        def f(a, b, x, xd):
            y = qcall(fn, [x, None, a, b, bb, xd], q, idx, 1.3)
            return (y.astype(f32) ** 2).mean()
        return f

    fused = mx.compile(mx.value_and_grad(loss(lora_switch_linear, bb, q), [0, 1, 2, 3]))
    eager = mx.value_and_grad(loss(lora_switch_linear_reference, rargs[4], rq), [0, 1, 2, 3])
    for _ in range(2):  # the second call runs the cached compiled graph
        v, g = fused(a, b, x, xd)
        vr, gr = eager(a, b, rargs[0], rargs[5])
        assert abs(v.item() - vr.item()) <= 2e-2 * max(1.0, abs(vr.item()))
        for gi, ri, arg in zip(g, gr, [a, b, x, xd]):
            assert gi.dtype == arg.dtype and gi.shape == ri.shape
            tol = {f32: 1e-4, bf16: 5e-2}[dt] * max(1.0, float(mx.abs(ri.astype(f32)).max()))
            assert float(mx.abs(gi.astype(f32) - ri.astype(f32)).max()) <= tol


@pytest.mark.parametrize("name", ["scales", "biases"])
def test_quantized_base_is_frozen(name):
    if _extension.kernel_for("lora_switch", mx.cpu) is None:
        pytest.skip("extension not built")
    args, _, q, idx = qmake(QCASE, f32, 4, 64)

    def f(t):
        return qcall(lora_switch_linear, args, {**q, name: t}, idx, 1.0).sum()

    with pytest.raises(ValueError, match=rf"\[lora_switch_linear\] gradients with respect to "
                       rf"{name} are not supported: the quantized base is frozen"):
        mx.grad(f)(q[name])


def test_quantized_cpp_op_validates_directly():
    ext = _extension.extension()
    if ext is None or not hasattr(ext, "lora_switch_linear"):
        pytest.skip("extension not built")
    args, _, q, idx = qmake(QCASE, f32, 4, 64)
    x, _, a, b, bb, xd = args
    call_ = lambda **kw: ext.lora_switch_linear(  # noqa: E731
        x, q["weight"], a, b, idx, 1.0, **{**dict(scales=q["scales"], biases=q["biases"],
                                                  group_size=64, bits=4), **kw})
    for kw, match in [
        (dict(scales=q["scales"][:, :, :1]), r"scales must have shape \(5, 24, 2\) but got \(5, 24, 1\)"),
        (dict(biases=None), r"biases must be given with scales"),
        (dict(bits=7), r"bits must be one of 2, 3, 4, 5, 6, 8 but got 7"),
        (dict(group_size=16), r"group_size must be 32, 64 or 128 but got 16"),
    ]:
        with pytest.raises(ValueError, match=r"\[lora_switch_linear\] " + match):
            call_(**kw)


def test_quantized_peak_memory_stays_below_a_dequantized_weight():
    """16 experts x 1024 x 1024: a float32 copy of W would be 64 MiB; the fused forward and
    backward dequantize per-thread panels of W_e only."""
    if _extension.kernel_for("lora_switch", mx.cpu) is None:
        pytest.skip("extension not built")
    e, d, r = 16, 1024, 8
    k = mx.random.split(mx.random.key(0), 5)
    wq, sc, bi = mx.quantize(mx.random.normal((e, d, d), key=k[0]) / 32, 64, 4)
    x = mx.random.normal((8, 1, 1, d), key=k[1])
    a = mx.random.normal((e, r, d), key=k[2]) / 32
    b = mx.random.normal((e, d, r), key=k[3])
    idx = mx.random.randint(0, e, (8, 4), key=k[4]).astype(mx.uint32)
    mx.eval(wq, sc, bi, x, a, b, idx)
    f = lambda x, a, b: lora_switch_linear(x, wq, a, b, idx, 1.0, scales=sc, biases=bi,  # noqa: E731
                                           group_size=64, bits=4).sum()
    mx.eval(mx.value_and_grad(f, [0, 1, 2])(x, a, b))  # warm up
    mx.synchronize()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(mx.value_and_grad(f, [0, 1, 2])(x, a, b))
    extra = mx.get_peak_memory() - base
    assert extra < 16 * 2**20, f"peak {extra / 2**20:.1f} MiB over the inputs"


def test_other_quantizations_run_the_reference(device):
    args, _ = make(((5, 1, 1, 64), (5, 2), 4, 40, 4), f32, f32)
    x, w, a, b, bb, xd = args
    wq, sc = mx.quantize(w, 32, 4, mode="mxfp4")
    kw = dict(scales=sc, biases=None, group_size=32, bits=4, mode="mxfp4", x_dropped=xd)
    idx = mx.array([[0, 1]] * 5, dtype=mx.uint32)
    y = lora_switch_linear(x, wq, a, b, idx, 1.1, bb, **kw)
    ref = lora_switch_linear_reference(x, wq, a, b, idx, 1.1, bb, **kw)
    assert mx.array_equal(y, ref).item()
