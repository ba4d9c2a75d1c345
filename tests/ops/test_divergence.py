"""Fused KL / JS divergence against a float64 numpy oracle: forward, both gradients,
eager and compiled, odd shapes, three dtypes, masked vocabularies, huge logits,
non-contiguous inputs, errors, and only the requested gradients computed."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from tests.conftest import DTYPES, assert_close_to_oracle, to_f64
from mlx_tuner import ops
from mlx_tuner.ops import _extension

OPS = {"kl": (ops.kl_div, ops.kl_div_reference), "js": (ops.js_div, ops.js_div_reference)}

SHAPES = [(1, 1), (3, 1), (2, 7), (4, 513), (2, 3, 100), (5, 4096), (3, 1000), (0, 17),
          (7,)]


# ------------------------------------------------------------------ float64 oracle
def _log_softmax(x):
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def _plogdiff(p, lp, lq):
    live = p > 0
    return np.where(live, p * (np.where(live, lp, 0) - np.where(live, lq, 0)), 0.0)


def oracle(op, q, p, cot=None):
    """(value, dq, dp) in float64; cot is the cotangent per row (ones when None)."""
    q, p = to_f64(q), to_f64(p)
    lq, lp = _log_softmax(q), _log_softmax(p)
    Q, P = np.exp(lq), np.exp(lp)
    c = np.ones(q.shape[:-1]) if cot is None else to_f64(cot)
    c = c[..., None]
    if op == "kl":
        val = _plogdiff(P, lp, lq).sum(-1)
        dq = c * (Q - P)
        dp = c * _plogdiff(P, lp, lq + val[..., None])
    else:
        with np.errstate(divide="ignore"):
            lm = np.log(0.5 * (P + Q))
        klp = _plogdiff(P, lp, lm).sum(-1)
        klq = _plogdiff(Q, lq, lm).sum(-1)
        val = 0.5 * (klp + klq)
        dq = 0.5 * c * _plogdiff(Q, lq, lm + klq[..., None])
        dp = 0.5 * c * _plogdiff(P, lp, lm + klp[..., None])
    return val, dq, dp


def _inputs(shape, dtype, scale=3.0):
    q = (scale * mx.random.normal(shape)).astype(dtype)
    p = (scale * mx.random.normal(shape)).astype(dtype)
    return q, p


def _grads(fn, q, p, cot, argnums):
    def f(q, p):
        return (fn(q, p).astype(mx.float32) * cot).sum()

    g = mx.grad(f, argnums=argnums)(q, p)
    return g if isinstance(g, (tuple, list)) else (g,)


def check_all(op, q, p, dtype, compile_=False, argnums=(0, 1)):
    fused, ref = OPS[op]
    cot = mx.random.uniform(0.5, 1.5, q.shape[:-1])
    val, dq, dp = oracle(op, q, p, cot)
    f = mx.compile(fused) if compile_ else fused
    out = f(q, p)
    assert out.dtype == dtype and out.shape == q.shape[:-1]
    assert_close_to_oracle(out, ref(q, p), val, dtype, what=f"{op} forward")
    gf = _grads(f, q, p, cot, argnums)
    gr = _grads(ref, q, p, cot, argnums)
    expect = {0: dq, 1: dp}
    for a, x, y in zip(argnums, gf, gr):
        assert x.dtype == dtype and x.shape == q.shape
        assert_close_to_oracle(x, y, expect[a], dtype, what=f"{op} grad {'qp'[a]}")


def test_kernel_is_used_where_built():
    # The fused op must not silently run the reference where a kernel exists.
    assert "cpu" in _extension.kernel_devices("divergence")
    assert _extension.kernel_for("divergence", mx.Device(mx.cpu)) is not None


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_grads(device, op, dtype, shape):
    check_all(op, *_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled(device, op, dtype):
    check_all(op, *_inputs((3, 2, 777), dtype), dtype, compile_=True)


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_vocabulary(device, op, dtype):
    check_all(op, *_inputs((3, 40013), dtype), dtype)


# The CUDA JS forward's paths (csrc/backend/cuda/divergence.cu, js_plan): with two CTAs an
# SM the V <= 4096 above take one CTA per row (C = 1), 40,013 a cluster of 2 (half types)
# or 4 (float32); here C = 2 (bfloat16 at 32k, whole 16-byte chunks and an odd V whose rows
# start at every offset), C = 8 (151,936 in each dtype, float32 at one CTA per SM; bfloat16
# at 262,147), and float32 at 262,144, which does not fit in 8 CTAs' shared memory: the
# two-pass kernel. With four CTAs an SM (128 threads each; the default plan) the half types
# keep 9 chunks a thread of each slice in registers: C = 2 at 32k (rows ending in the
# register part, partial at 32,001), 8 at 151,936, 16 at 262,147. All in shared memory
# (MLX_TUNER_JS_SPLIT=0) they take C = 16 at 151,936, and bfloat16 at 262,147 does not fit
# four an SM, nor does float32 at 151,936: forced (MLX_TUNER_JS_CTAS_PER_SM=4) these take
# C = 8 at one CTA an SM, by default the two-pass kernel. GPU only: the CPU kernels are
# covered above.
JS_GPU_SHAPES = [(mx.bfloat16, (9, 32000)), (mx.bfloat16, (9, 32001)),
                 (mx.bfloat16, (5, 151936)), (mx.float16, (3, 151936)),
                 (mx.float32, (3, 151936)), (mx.bfloat16, (2, 262147)),
                 (mx.float32, (2, 262144))]


def _gpu_only(device):
    if device != mx.gpu:
        pytest.skip("the CUDA JS forward's cluster sizes; the CPU kernels are tested above")


@pytest.fixture(params=["2", "4", "4-shared", "4-recompute"],
                ids=["2-per-sm", "4-per-sm", "4-shared", "4-recompute"])
def js_cluster(request, monkeypatch):
    """The one-read cluster kernel: one row per cluster, 2 or 4 CTAs an SM
    (MLX_TUNER_JS_CTAS_PER_SM); the half types keep their exps, at four CTAs an SM part of
    each slice in registers unless MLX_TUNER_JS_SPLIT=0 ("shared": all in shared memory),
    and take each exp once unless MLX_TUNER_JS_KEEP=0 ("recompute")."""
    ctas, _, mode = request.param.partition("-")
    monkeypatch.setenv("MLX_TUNER_JS_CTAS_PER_SM", ctas)
    if mode == "shared":
        monkeypatch.setenv("MLX_TUNER_JS_SPLIT", "0")
    if mode == "recompute":
        monkeypatch.setenv("MLX_TUNER_JS_KEEP", "0")


@pytest.mark.parametrize("dtype,shape", JS_GPU_SHAPES,
                         ids=[f"{str(d).split('.')[-1]}-{s}" for d, s in JS_GPU_SHAPES])
def test_js_row_split_on_gpu(device, js_cluster, dtype, shape):
    _gpu_only(device)
    check_all("js", *_inputs(shape, dtype), dtype)


@pytest.mark.parametrize("ctas", ["4", "2", "0"], ids=["cluster-16", "cluster", "two-pass"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
@pytest.mark.parametrize("V", [32001, 151936])
def test_js_row_split_masked_on_gpu(device, monkeypatch, ctas, dtype, V):
    # Masked entries on both sides and on either side alone, then whole rows masked on one
    # side, across the CTAs of a cluster (and in the two-pass kernel): finite, ln(2) / 2
    # for a fully masked row.
    _gpu_only(device)
    monkeypatch.setenv("MLX_TUNER_JS_CTAS_PER_SM", ctas)
    q, p = _inputs((6, V), dtype)
    both = mx.random.uniform(shape=q.shape) < 0.3
    p_only = mx.random.uniform(shape=q.shape) < 0.2
    q_only = (mx.random.uniform(shape=q.shape) < 0.2) & ~p_only
    q = mx.where(both | q_only, -mx.inf, q).astype(dtype)
    p = mx.where(both | p_only, -mx.inf, p).astype(dtype)
    check_all("js", q, p, dtype)
    rows = mx.arange(6)[:, None]
    qf = mx.where(rows == 1, -mx.inf, q).astype(dtype)
    pf = mx.where(rows == 4, -mx.inf, p).astype(dtype)
    out = to_f64(ops.js_div(qf, pf))
    gq, gp = mx.grad(lambda a, b: ops.js_div(a, b).astype(mx.float32).sum(), [0, 1])(qf, pf)
    gq, gp = to_f64(gq), to_f64(gp)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(gq)) and np.all(np.isfinite(gp))
    np.testing.assert_allclose(out[[1, 4]], np.log(2) / 2, atol=2e-3)
    assert np.abs(gp[1]).max() < 1e-5 and np.abs(gq[4]).max() < 1e-5
    np.testing.assert_array_equal(out[[0, 2, 3, 5]], to_f64(ops.js_div(q, p))[[0, 2, 3, 5]])


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16], ids=str)
def test_js_kept_exps_precision_on_gpu(device, js_cluster, dtype):
    # The half types' kernel keeps each exp in float16 between its passes: rows where that
    # rounding would show if the sums were not taken from the stored values: one confident
    # token (a peak 20 above the rest) in both inputs with a little noise, a tail 25 below
    # the maximum, and identical rows, whose JS is 0.
    _gpu_only(device)
    v = 151936
    base = mx.random.normal((4, v))
    peak = mx.zeros((4, v)).at[:, 1234].add(20.0)

    def tail(k):  # k logits at 0, the rest 25 below
        return mx.where(mx.arange(v) < k, 0.0, -25.0) * mx.ones((4, 1))

    q = mx.concatenate([base + peak, tail(40), base]).astype(dtype)
    p = mx.concatenate([base + peak + 0.05 * mx.random.normal((4, v)), tail(80),
                        base]).astype(dtype)
    check_all("js", q, p, dtype)
    same = to_f64(ops.js_div(q[8:], p[8:]))
    assert np.abs(same).max() < 1e-4, same


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_js_row_split_huge_logits_on_gpu(device, js_cluster, dtype):
    _gpu_only(device)
    q, p = _inputs((3, 151936), dtype, scale=1e4)
    check_all("js", q, p, dtype)
    p2 = (q.astype(mx.float32) + mx.random.normal(q.shape)).astype(dtype)
    check_all("js", q, p2, dtype)


@pytest.mark.parametrize("ctas", ["1", "0"])
def test_js_forced_plans_on_gpu(device, monkeypatch, ctas):
    # MLX_TUNER_JS_CTAS_PER_SM=1: the smallest cluster within 200 KB a CTA (C = 1 at 128 KB
    # for bfloat16 at 32k, 4 at 151,936, 2 for float32 at 40,013); 0: the two-pass kernel.
    _gpu_only(device)
    monkeypatch.setenv("MLX_TUNER_JS_CTAS_PER_SM", ctas)
    for dtype, shape in [(mx.bfloat16, (9, 32001)), (mx.bfloat16, (3, 151936)),
                         (mx.float32, (3, 40013))]:
        check_all("js", *_inputs(shape, dtype), dtype)


def test_js_cluster_sizes_alternate_on_gpu(device, js_cluster):
    # The same graph shape with another cluster size each call: MLX updates its cached
    # CUDA graph in place, which must carry the new cluster dimension along.
    _gpu_only(device)
    for V in [32000, 151936, 1000, 151936, 32000]:
        q, p = _inputs((4, V), mx.bfloat16)
        mx.eval(q, p)
        out = ops.js_div(q, p)
        mx.eval(out)
        assert_close_to_oracle(out, ops.js_div_reference(q, p), oracle("js", q, p)[0],
                               mx.bfloat16, what=f"js forward V={V}")


def test_js_row_offsets_on_gpu(device, js_cluster):
    # Rows that start off a 16-byte boundary (views one row into their buffers): the same
    # offset in q and p keeps the cluster kernel, different offsets take the two-pass one.
    _gpu_only(device)
    V = 32001
    a, b = _inputs((7, V), mx.bfloat16)
    mx.eval(a, b)
    for q, p in [(a[1:], b[1:]), (a[1:], b[:-1])]:
        mx.eval(q, p)
        check_all("js", q, p, mx.bfloat16)


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("argnums", [(0,), (1,), (1, 0)], ids=str)
def test_requested_argnums(device, op, argnums):
    q, p = _inputs((4, 300), mx.float32)
    check_all(op, q, p, mx.float32, argnums=argnums)


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_vocabulary(device, op, dtype):
    # -inf logits: the same masked entries in both, plus teacher-only masks (finite KL).
    q, p = _inputs((6, 1001), dtype)
    both = mx.random.uniform(shape=q.shape) < 0.3
    p_only = mx.random.uniform(shape=q.shape) < 0.2
    q = mx.where(both, -mx.inf, q).astype(dtype)
    p = mx.where(both | p_only, -mx.inf, p).astype(dtype)
    check_all(op, q, p, dtype)
    out = OPS[op][0](q, p)
    assert np.all(np.isfinite(to_f64(out)))
    if op == "js":  # JS stays finite even where only the student has mass
        q2 = mx.where(p_only, -mx.inf, _inputs((6, 1001), dtype)[0]).astype(dtype)
        p2 = mx.where(both, -mx.inf, p).astype(dtype)
        check_all(op, q2, p2, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", ["q", "p"])
def test_js_fully_masked_row(device, dtype, masked):
    # One input's row is all -inf (no mass): JS = ln(2) / 2, the other argument's gradient
    # is 0 there, and the neighbouring rows are untouched. Also at large V, where the
    # AVX-512 half-precision path first guesses its offsets and redoes failed rows.
    for v in (300, 40013):
        q, p = _inputs((3, v), dtype)
        full_q, full_p = q, p
        if masked == "q":
            q = mx.concatenate([q[:1], mx.full((1, v), -mx.inf, dtype), q[2:]])
        else:
            p = mx.concatenate([p[:1], mx.full((1, v), -mx.inf, dtype), p[2:]])
        out = ops.js_div(q, p)
        gq, gp = mx.grad(lambda a, b: ops.js_div(a, b).astype(mx.float32).sum(), [0, 1])(q, p)
        assert abs(out[1].item() - np.log(2) / 2) < 2e-3
        other = gp if masked == "q" else gq
        assert np.all(np.isfinite(to_f64(gq))) and np.all(np.isfinite(to_f64(gp)))
        assert np.abs(to_f64(other[1])).max() < 1e-5
        ref = ops.js_div(full_q, full_p)
        np.testing.assert_allclose(to_f64(out[0::2]), to_f64(ref[0::2]), rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_js_masked_row_start(device, dtype):
    # A side whose first entries are all -inf and the rest finite: the AVX-512
    # half-precision forward takes its offsets from the first entries and must not keep -inf.
    q, p = _inputs((3, 40013), dtype)
    head = mx.arange(40013) < 300
    q = mx.where(head, -mx.inf, q).astype(dtype)
    check_all("js", q, p, dtype)
    check_all("js", p, q, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 1), (4, 513), (5, 4096), (3, 40013)], ids=str)
def test_js_cpu_recomputed_exps_match_kept_ones(monkeypatch, dtype, shape):
    # The CPU JS forward keeps exp(x - max) in a row buffer up to an L2-sized V and
    # recomputes them above (MLX_TUNER_JS_CACHE_MAX_V moves the switch): the same values
    # in the same order, so the same bits. Masked entries and a fully masked row included.
    q0, p = _inputs(shape, dtype)
    q = mx.where(mx.random.uniform(shape=shape) < 0.2, -mx.inf, q0).astype(dtype)
    p_masked = mx.concatenate([p[:1], mx.full((1, shape[-1]), -mx.inf, dtype), p[2:]])
    results = []
    for cap in ("1000000000", "0"):
        monkeypatch.setenv("MLX_TUNER_JS_CACHE_MAX_V", cap)
        with mx.stream(mx.cpu):
            out = ops.js_div(q, p_masked)
            grads = mx.grad(lambda a, b: ops.js_div(a, b).astype(mx.float32).sum(),
                            [0, 1])(q, p_masked)
            mx.eval(out, grads)
        results.append([to_f64(out), *(to_f64(g) for g in grads)])
    for kept, recomputed in zip(*results):
        np.testing.assert_array_equal(kept, recomputed)
    with mx.stream(mx.cpu):  # and the recomputing path against the float64 oracle
        check_all("js", q0, p, dtype)


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_spread_large_vocabulary(device, op, dtype):
    # Logits far above the first entries of the row (the AVX-512 half-precision JS guesses
    # its offsets from them) and a wide spread: the redo path must give the oracle's values.
    q, p = _inputs((4, 40013), dtype, scale=3.0)
    # exp(120) overflows float32 unless the true maximum is the offset
    bump_q = mx.zeros((4, 40013)).at[:, 30000:30010].add(120.0)
    bump_p = mx.zeros((4, 40013)).at[:, 20000:20005].add(100.0)
    check_all(op, (q.astype(mx.float32) + bump_q).astype(dtype),
              (p.astype(mx.float32) + bump_p).astype(dtype), dtype)


@pytest.mark.parametrize("op", ["kl", "js"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_huge_logits(device, op, dtype):
    q, p = _inputs((4, 2049), dtype, scale=1e4)
    check_all(op, q, p, dtype)
    # Nearly equal huge logits: the divergence is small and must not cancel to garbage.
    p2 = (q.astype(mx.float32) + mx.random.normal(q.shape)).astype(dtype)
    check_all(op, q, p2, dtype)


@pytest.mark.parametrize("op", ["kl", "js"])
def test_non_contiguous(device, op):
    a = mx.random.normal((300, 8)) * 2
    b = mx.random.normal((8, 300)) * 2
    check_all(op, a.T, b, mx.float32)  # transposed
    c = mx.random.normal((5, 2, 602)) * 2
    check_all(op, c[:, 0, ::2], c[:, 1, 1::2], mx.float32)  # strided slices
    row = mx.random.normal((1, 50))
    check_all(op, mx.broadcast_to(row, (4, 50)), mx.random.normal((4, 50)), mx.float32)


def test_mixed_dtypes_promote(device):
    q = mx.random.normal((3, 64)).astype(mx.bfloat16)
    p = mx.random.normal((3, 64))
    out = ops.kl_div(q, p)
    assert out.dtype == mx.float32
    assert_close_to_oracle(out, ops.kl_div_reference(q, p), oracle("kl", q, p)[0], mx.float32)
    gq, gp = mx.grad(lambda a, b: ops.kl_div(a, b).sum(), argnums=(0, 1))(q, p)
    assert gq.dtype == mx.bfloat16 and gp.dtype == mx.float32


@pytest.mark.parametrize("op", ["kl", "js"])
def test_only_requested_gradient_is_computed(op):
    # The extra memory of a one-argument gradient is that gradient, not two of them.
    q, p = _inputs((64, 8192), mx.float32)
    mx.eval(q, p)
    fused = OPS[op][0]
    for argnums in [(0,), (1,)]:
        f = mx.grad(lambda a, b: fused(a, b).sum(), argnums=argnums)
        mx.eval(f(q, p))
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        g = f(q, p)
        mx.eval(g)
        extra = mx.get_peak_memory() - before
        assert extra < 1.25 * q.nbytes, (argnums, extra, q.nbytes)
        del g


@pytest.mark.parametrize("op", ["kl_div", "js_div"])
def test_errors(op):
    fn = getattr(ops, op)
    q = mx.zeros((2, 5))
    with pytest.raises(ValueError, match=rf"^\[{op}\] logits_p must have the shape of "
                                         r"logits_q \(2, 5\) but got \(2, 6\)"):
        fn(q, mx.zeros((2, 6)))
    with pytest.raises(ValueError, match=rf"^\[{op}\] logits_q must be float32, float16 or "
                                         r"bfloat16 but got int32"):
        fn(mx.zeros((2, 5), dtype=mx.int32), q)
    with pytest.raises(ValueError, match=rf"^\[{op}\] logits_p must have at least 1"):
        fn(q, mx.array(1.0))
    with pytest.raises(ValueError, match=rf"^\[{op}\] logits_q must have a last dimension "
                                         r"of at least 1 but got shape \(2, 0\)"):
        fn(mx.zeros((2, 0)), mx.zeros((2, 0)))
    with pytest.raises(ValueError, match=rf"^\[{op}\] logits_q must be an mx.array"):
        fn(np.zeros((2, 5)), q)


def test_cpp_errors_match_python_words():
    ext = _extension.extension()
    with pytest.raises(ValueError, match=r"^\[kl_div\] logits_p must have the shape of "
                                         r"logits_q \(2, 5\) but got \(2, 6\)"):
        ext.kl_div(mx.zeros((2, 5)), mx.zeros((2, 6)))
    with pytest.raises(ValueError, match=r"^\[js_div\] logits_q must be float32, float16 "
                                         r"or bfloat16 but got int32"):
        ext.js_div(mx.zeros((2, 5), dtype=mx.int32), mx.zeros((2, 5)))


def test_value_and_grad_through_nn(device):
    import mlx.nn as nn

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 33)

        def __call__(self, x):
            return self.proj(x)

    model = Student()
    x = mx.random.normal((2, 5, 16))
    teacher = mx.random.normal((2, 5, 33))

    def loss(fn):
        return lambda m: fn(m(x), teacher).mean()

    _, g1 = nn.value_and_grad(model, loss(ops.kl_div))(model)
    _, g2 = nn.value_and_grad(model, loss(ops.kl_div_reference))(model)
    np.testing.assert_allclose(np.array(g1["proj"]["weight"]), np.array(g2["proj"]["weight"]),
                               rtol=1e-4, atol=1e-6)
