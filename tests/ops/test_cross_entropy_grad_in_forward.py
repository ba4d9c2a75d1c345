"""linear_cross_entropy(grad_in_forward=True), a speed hint: where a backend honors it
(CUDA) the forward also computes dloss/dh, so dh needs no GEMM in the backward. The loss
and every gradient stay those of the plain call: bit for bit on the CPU (a no-op there),
within the float64 oracle's tolerance on a GPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension
from mlx_tuner.ops import linear_cross_entropy as lce
from mlx_tuner.ops import linear_cross_entropy_reference as lce_ref
from tests.conftest import assert_close_to_oracle
from tests.ops.test_cross_entropy import _inputs, oracle


def _hard_case(dtype, bias):
    # V = 1000 is 4 CUDA chunks of 256 (MLX_TUNER_CE_CHUNK), the last one partial; ignored
    # targets (-100, V), rows with g = 0, banned (-inf bias) vocabulary entries.
    lead, d, V = (3, 13), 40, 1000
    h, w, b, y = _inputs(lead, d, V, dtype, bias=bias)
    if bias:
        b = mx.where(mx.arange(V) % 7 == 3, -mx.inf, b).astype(dtype)
        y = mx.where(y % 7 == 3, y - 1, y)
    y = mx.where(mx.arange(13)[None] % 5 == 2, -100, y)
    y = mx.where(mx.arange(13)[None] == 7, V, y)
    g = mx.where(mx.arange(13)[None] % 6 == 0, 0.0, mx.random.uniform(shape=lead))
    return h, w, b, y, g


def _run(fn, h, w, b, y, g, argnums, compiled, **kw):
    def f(*params):
        out = fn(params[0], params[1], y, params[2] if b is not None else None, **kw)
        return (out.astype(mx.float32) * g).sum(), out

    step = mx.value_and_grad(f, argnums=argnums)
    if compiled:
        step = mx.compile(step)
    params = (h, w, b) if b is not None else (h, w)
    (_, loss), grads = step(*params)
    return loss, grads if isinstance(grads, (tuple, list)) else (grads,)


def _assert_same(device, dtype, got, plain, ref, want, names):
    for what, f, p, r, o in zip(names, got, plain, ref, want):
        assert f.dtype == p.dtype, what
        if device == mx.cpu:  # the hint is a no-op: the very same computation
            assert np.array_equal(np.array(f.astype(mx.float32)),
                                  np.array(p.astype(mx.float32)), equal_nan=True), what
        assert_close_to_oracle(f, r, o, dtype, what)


def _logit_chunks(device, dtype, logits, monkeypatch):
    # A CUDA setting (the CPU keeps no chunks): bfloat16 inputs get bfloat16 logit chunks
    # with P written over them, unless MLX_TUNER_CE_LOGITS=float32; other dtypes always
    # take float32 chunks, so the setting changes nothing for them.
    if logits == "default":
        return
    if device == mx.cpu or dtype != mx.bfloat16:
        pytest.skip("a setting of the CUDA kernels' bfloat16 path")
    monkeypatch.setenv("MLX_TUNER_CE_LOGITS", "float32")


@pytest.mark.parametrize("logits", ["default", "float32"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("grads", ["dh", "all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_same_loss_and_grads(device, dtype, bias, grads, compiled, logits, monkeypatch):
    _logit_chunks(device, dtype, logits, monkeypatch)
    monkeypatch.setenv("MLX_TUNER_CE_CHUNK", "256")
    h, w, b, y, g = _hard_case(dtype, bias)
    argnums = (0,) if grads == "dh" else ((0, 1, 2) if bias else (0, 1))
    loss, gr = _run(lce, h, w, b, y, g, argnums, compiled, grad_in_forward=True)
    ploss, pgr = _run(lce, h, w, b, y, g, argnums, compiled)
    rloss, rgr = _run(lce_ref, h, w, b, y, g, argnums, False)
    names = ("loss", "dh", "dW", "db")[: 1 + len(argnums)]
    assert all(a.dtype == dtype for a in (loss, *gr))
    _assert_same(device, dtype, (loss, *gr), (ploss, *pgr), (rloss, *rgr),
                 oracle(h, w, b, y, g), names)


@pytest.mark.parametrize("logits", ["default", "float32"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
def test_mask_and_mean(device, dtype, logits, monkeypatch):
    _logit_chunks(device, dtype, logits, monkeypatch)
    # The trainer's use: a masked mean, gradient of h only.
    B, L, d, V = 3, 11, 20, 300
    h, w, _, y = _inputs((B, L), d, V, dtype, bias=False)
    y = mx.where(mx.arange(L)[None] % 4 == 1, -100, y)
    lengths = mx.array([[0, 11], [2, 7], [1, 1]])
    steps = mx.arange(1, L + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])

    def step(fn, **kw):
        return mx.value_and_grad(lambda h: fn(h, w, y, mask=mask, reduction="mean", **kw))(h)

    got, plain, ref = step(lce, grad_in_forward=True), step(lce), step(lce_ref)
    valid = np.array(mx.logical_and(y >= 0, y < V) & mask)
    gw = valid.astype(np.float64) / valid.sum()
    ol, odh, _, _ = oracle(h, w, None, y, gw)
    want = (np.float64((ol * valid).sum() / valid.sum()), odh)
    _assert_same(device, dtype, got, plain, ref, want, ("loss", "dh"))


def test_both_flags_in_one_compiled_graph(device):
    # is_equivalent tells the two primitives apart where the hint is honored; their results
    # are equal either way.
    h, w, b, y = _inputs((9,), 16, 300, mx.float32)

    def f(h):
        return (lce(h, w, y, b, reduction="sum", grad_in_forward=True)
                - lce(h, w, y, b, reduction="sum"))

    val, dh = mx.compile(mx.value_and_grad(f))(h)
    assert abs(val.item()) < 1e-4 and float(mx.abs(dh).max()) < 1e-5


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_head(device, bits):
    # The GPU dequantizes the head, so there the hint is honored for it too.
    N, d, V, gs = 19, 128, 700, 64
    h = mx.random.normal((N, d))
    wq, s, qb = mx.quantize(mx.random.normal((V, d)), group_size=gs, bits=bits)
    y = mx.where(mx.arange(N) % 5 == 0, -100, mx.random.randint(0, V, (N,)))
    kw = dict(scales=s, biases=qb, group_size=gs, bits=bits)

    def step(fn, **extra):
        return mx.value_and_grad(lambda h: fn(h, wq, y, reduction="sum", **kw, **extra))(h)

    got, plain, ref = step(lce, grad_in_forward=True), step(lce), step(lce_ref)
    wdq = mx.dequantize(wq, s, qb, group_size=gs, bits=bits)
    ol, odh, _, _ = oracle(h, wdq, None, y, np.ones(N))
    _assert_same(device, mx.float32, got, plain, ref, (np.float64(ol.sum()), odh),
                 ("loss", "dh"))


def test_empty_batch(device):
    h, w, _, y = _inputs((0,), 16, 100, mx.float32, bias=False)
    val, dh = mx.value_and_grad(lambda h: lce(h, w, y, reduction="sum", grad_in_forward=True))(h)
    assert val.item() == 0.0 and dh.shape == (0, 16)


@pytest.mark.parametrize("fn", [lce, lce_ref], ids=["fused", "reference"])
@pytest.mark.parametrize("bad", [1, "yes", None, np.bool_(True)], ids=repr)
def test_flag_must_be_a_bool(fn, bad):
    h, w, _, y = _inputs((4,), 8, 50, mx.float32, bias=False)
    with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] grad_in_forward must be "
                                         r"a bool but got " + type(bad).__name__):
        fn(h, w, y, grad_in_forward=bad)


def test_extension_takes_the_flag():
    # The C++ op's keyword; on the CPU it leaves the graph as it is.
    ext = _extension.extension()
    if ext is None:
        pytest.skip("the extension is not loaded")
    h, w, b, y = _inputs((6,), 8, 50, mx.float32)
    with mx.stream(mx.cpu):
        a = ext.linear_cross_entropy(h, w, y, b, grad_in_forward=True)
        c = ext.linear_cross_entropy(h, w, y, b)
        assert np.array_equal(np.array(a), np.array(c))
