"""linear_cross_entropy: fused vs its reference vs a float64 oracle — loss, dh, dW, db —
over shapes, dtypes, masks, ignored targets, compiled, quantized and tied mlx-lm heads."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_tuner import ops
from mlx_tuner.ops import cross_entropy as ce_mod
from mlx_tuner.ops import linear_cross_entropy as lce
from mlx_tuner.ops import linear_cross_entropy_reference as lce_ref

from tests.conftest import DTYPES, assert_close_to_oracle, to_f64

# (leading shape, d, V): odd sizes, a block edge, leading batch dims, empty batch, big V.
SHAPES = [((5,), 7, 3), ((37,), 24, 1500), ((2, 3), 33, 513), ((0,), 16, 100),
          ((1,), 1, 1), ((130,), 40, 1024), ((3,), 16, 262144)]


def _inputs(lead, d, V, dtype, bias=True, scale=1.0):
    h = (mx.random.normal((*lead, d)) * scale).astype(dtype)
    w = (mx.random.normal((V, d)) * 0.5).astype(dtype)
    b = mx.random.normal((V,)).astype(dtype) if bias else None
    y = mx.random.randint(0, V, lead)
    return h, w, b, y


def oracle(h, w, b, y, g):
    """float64 loss, dh, dW, db for the cotangent g (per token); ignored targets give 0."""
    d, V = h.shape[-1], w.shape[0]
    h64, w64 = to_f64(h).reshape(-1, d), to_f64(w)
    z = h64 @ w64.T + (to_f64(b) if b is not None else 0.0)
    yy = np.array(y).reshape(-1)
    valid = (yy >= 0) & (yy < V)
    yc = np.where(valid, yy, 0)
    m = z.max(axis=1, initial=-np.inf, keepdims=True) if z.size else z[:, :1]
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0] if z.size else z[:, 0]
    rows = np.arange(len(yy))
    loss = np.where(valid, lse - z[rows, yc], 0.0)
    G = np.exp(z - lse[:, None])
    G[rows, yc] -= 1.0
    G *= (np.asarray(g, np.float64).reshape(-1) * valid)[:, None]
    return (loss.reshape(y.shape), (G @ w64).reshape(h.shape), G.T @ h64, G.sum(axis=0))


def _loss_and_grads(fn, h, w, b, y, g, compiled=False):
    def f(h, w, b):
        out = fn(h, w, y, b)
        return (out.astype(mx.float32) * g).sum(), out

    grad_fn = mx.value_and_grad(f, argnums=(0, 1, 2))
    if compiled:
        grad_fn = mx.compile(grad_fn)
    (_, loss), grads = grad_fn(h, w, b)
    return loss, grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}xV{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_loss_and_grads_match_oracle(device, shape, dtype, compiled):
    lead, d, V = shape
    if V > 100000 and (dtype != mx.float32 and compiled):
        pytest.skip("big-V covered eagerly in every dtype and compiled in float32")
    h, w, b, y = _inputs(lead, d, V, dtype)
    g = mx.random.uniform(shape=lead)
    loss, (dh, dw, db) = _loss_and_grads(lce, h, w, b, y, g, compiled)
    rloss, (rdh, rdw, rdb) = _loss_and_grads(lce_ref, h, w, b, y, g)
    o = oracle(h, w, b, y, g)
    assert loss.dtype == rloss.dtype == dtype and dh.dtype == dw.dtype == db.dtype == dtype
    for what, f, r, ref in zip(("loss", "dh", "dW", "db"), (loss, dh, dw, db),
                               (rloss, rdh, rdw, rdb), o):
        assert_close_to_oracle(f, r, ref, dtype, what)


def test_fused_path_does_not_fall_back(device, monkeypatch):
    # Every build has the CPU kernel; one built against a GPU flavour of MLX has the GPU's.
    info = ops.backend_info()
    if device == mx.gpu and info["extension"]["gpu_backend"] is None:
        pytest.skip("this build has no GPU backend")
    assert ("gpu" if device == mx.gpu else "cpu") in info["ops"]["linear_cross_entropy"]["kernels"]

    def boom(*a, **k):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(ce_mod, "linear_cross_entropy_reference", boom)
    h, w, b, y = _inputs((4,), 8, 50, mx.float32)
    with mx.stream(device):
        mx.eval(lce(h, w, y, b), mx.grad(lambda h, w, b: lce(h, w, y, b).sum(),
                                         argnums=(0, 1, 2))(h, w, b))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_mask_ignore_and_reductions(device, reduction, dtype):
    B, L, d, V = 3, 11, 20, 300
    h, w, _, y = _inputs((B, L), d, V, dtype, bias=False)
    # ignore patterns: -100 (Hugging Face's ignore_index), V and beyond, negative.
    y = mx.where(mx.arange(L)[None] % 4 == 1, -100, y)
    y = mx.where(mx.arange(L)[None] == 2, V, y)
    y = mx.where(mx.arange(L)[None] == 5, -1, y)
    lengths = mx.array([[0, 11], [2, 7], [1, 1]])
    steps = mx.arange(1, L + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])

    def f(fn):
        return lambda h, w: fn(h, w, y, mask=mask, reduction=reduction).astype(mx.float32).sum()

    val, (dh, dw) = mx.value_and_grad(f(lce), argnums=(0, 1))(h, w)
    rval, (rdh, rdw) = mx.value_and_grad(f(lce_ref), argnums=(0, 1))(h, w)
    valid = np.array(mx.logical_and(y >= 0, y < V) & mask)
    g = valid.astype(np.float64) / (valid.sum() if reduction == "mean" else 1.0)
    ol, odh, odw, _ = oracle(h, w, None, y, g)
    want = (ol * valid).sum() / (valid.sum() if reduction == "mean" else 1.0)
    assert_close_to_oracle(val, rval, np.float64(want), dtype, "loss")
    assert_close_to_oracle(dh, rdh, odh, dtype, "dh")
    assert_close_to_oracle(dw, rdw, odw, dtype, "dW")
    per_tok = lce(h, w, y, mask=mask)
    assert np.all(np.array(per_tok.astype(mx.float32))[~valid] == 0)


def test_mean_matches_mlx_lm_default_loss():
    # mlx_lm.tuner.trainer.default_loss: (ce * mask).sum() / mask.sum()
    B, L, d, V = 2, 9, 16, 257
    h, w, _, y = _inputs((B, L), d, V, mx.float32, bias=False)
    mask = mx.arange(L)[None] < mx.array([[9], [4]])
    want = (nn.losses.cross_entropy(h @ w.T, y) * mask).sum() / mask.sum()
    got = lce(h, w, y, mask=mask, reduction="mean")
    assert abs(got.item() - want.item()) < 1e-5


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_quantized_head(device, bits, dtype):
    N, d, V, gs = 19, 128, 700, 64
    h = mx.random.normal((N, d)).astype(dtype)
    wq, s, qb = mx.quantize(mx.random.normal((V, d)).astype(dtype), group_size=gs, bits=bits)
    y = mx.random.randint(0, V, (N,))
    kw = dict(scales=s, biases=qb, group_size=gs, bits=bits)
    loss, dh = mx.value_and_grad(lambda h: lce(h, wq, y, **kw).astype(mx.float32).sum())(h)
    rloss, rdh = mx.value_and_grad(lambda h: lce_ref(h, wq, y, **kw).astype(mx.float32).sum())(h)
    wdq = mx.dequantize(wq, s, qb, group_size=gs, bits=bits)
    ol, odh, _, _ = oracle(h, wdq, None, y, np.ones(N))
    assert_close_to_oracle(loss, rloss, np.float64(ol.sum()), dtype, "loss")
    assert_close_to_oracle(dh, rdh, odh, dtype, "dh")
    if device != mx.cpu:
        return  # the GPU path dequantizes the head in the graph: MLX's dequantize differentiates
    with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] no gradient"):
        mx.eval(mx.grad(lambda s: lce(h, wq, y, scales=s, biases=qb, group_size=gs,
                                      bits=bits).sum())(s))


def _tiny(model_type, tie, quantize=False):
    from mlx_lm.models import llama, qwen3
    common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  vocab_size=1000, tie_word_embeddings=tie, rope_theta=10000.0)
    if model_type == "qwen3":
        model = qwen3.Model(qwen3.ModelArgs(model_type="qwen3", head_dim=16,
                                            max_position_embeddings=512, **common))
    else:
        model = llama.Model(llama.ModelArgs(model_type="llama", **common))
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("model_type,tie,quantize", [
    ("qwen3", True, False), ("qwen3", True, True), ("llama", False, False),
    ("llama", False, True)])
def test_mlx_lm_models_through_the_helper(model_type, tie, quantize):
    model = _tiny(model_type, tie, quantize)
    inputs = mx.random.randint(0, 1000, (2, 12))
    targets = mx.random.randint(0, 1000, (2, 12))
    mask = mx.arange(12)[None] < mx.array([[12], [7]])
    w, b, q, tied = ce_mod.model_head(model)
    assert tied == tie and (q is not None) == quantize

    def fused(model):
        hs = ce_mod.hidden_states(model, inputs)
        w, b, q, _ = ce_mod.model_head(model)
        return lce(hs, w, targets, b, mask=mask, reduction="mean", **(q or {}))

    def ref(model):
        ce = nn.losses.cross_entropy(model(inputs), targets) * mask
        return ce.astype(mx.float32).sum() / mask.sum()

    if not quantize:  # full fine-tuning: gradients of every parameter, the head's included
        val, grads = nn.value_and_grad(model, fused)(model)
        rval, rgrads = nn.value_and_grad(model, ref)(model)
        from mlx.utils import tree_flatten
        for (k, a), (_, r) in zip(tree_flatten(grads), tree_flatten(rgrads)):
            np.testing.assert_allclose(np.array(a), np.array(r), atol=2e-5, rtol=1e-3, err_msg=k)
    else:
        model.freeze()
        val, rval = fused(model), ref(model)
    assert abs(val.item() - rval.item()) < 1e-4


def test_helper_declines_unknown_heads():
    model = _tiny("llama", False)
    model.lm_head = nn.Sequential(nn.Linear(64, 1000))
    assert ce_mod.model_head(model) is None
    assert ce_mod.model_head(nn.Linear(4, 4)) is None


@pytest.mark.parametrize("fn", [lce, lce_ref], ids=["fused", "reference"])
def test_errors(fn):
    h, w, b, y = _inputs((4,), 8, 50, mx.float32)
    cases = [
        (lambda: fn(h, w[:, :7], y), r"weight must have shape \(50, 8\)"),
        (lambda: fn(h, w, y[:3]), r"targets must have shape \(4,\)"),
        (lambda: fn(h, w, y.astype(mx.float32)), r"targets must be an integer"),
        (lambda: fn(h.astype(mx.int32), w, y), r"h must be float32"),
        (lambda: fn(h, w, y, b[:3]), r"bias must have shape \(50,\)"),
        (lambda: fn(h, w, y, reduction="avg"), r"reduction must be one of"),
        (lambda: fn(h, w, y, mask=mx.ones((5,))), r"mask must broadcast"),
        (lambda: fn(h, w[None], y), r"weight must have 2 dimensions"),
        (lambda: fn(h, w, y, scales=mx.ones((50, 1))), r"quantized weight must be uint32"),
    ]
    for call, msg in cases:
        with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] .*" + msg):
            call()


def test_extension_errors():
    from mlx_tuner.ops import _extension
    ext = _extension.extension()
    h, w, _, y = _inputs((4,), 128, 50, mx.float32)
    wq, s, qb = mx.quantize(w, group_size=64, bits=4)
    with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] scales must have shape"):
        ext.linear_cross_entropy(h, wq, y, None, s[:, :1], qb)
    with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] bits must be"):
        ext.linear_cross_entropy(h, wq, y, None, s, qb, 64, 7)
    with pytest.raises(ValueError, match=r"\[linear_cross_entropy\] weight must have shape"):
        ext.linear_cross_entropy(h, w[:, :3], y)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "4bit"])
def test_default_loss_matches_mlx_lm_with_lora(quantize):
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss as mlx_lm_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model = _tiny("qwen3", True, quantize)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    batch = mx.random.randint(0, 1000, (3, 14))
    lengths = mx.array([[0, 13], [3, 9], [1, 1]])
    (val, ntoks), grads = nn.value_and_grad(model, ce_mod.default_loss)(model, batch, lengths)
    (rval, rntoks), rgrads = nn.value_and_grad(model, mlx_lm_loss)(model, batch, lengths)
    assert ntoks.item() == rntoks.item() and abs(val.item() - rval.item()) < 1e-4
    flat, rflat = tree_flatten(grads), tree_flatten(rgrads)
    assert [k for k, _ in flat] == [k for k, _ in rflat] and len(flat) > 0
    for (k, a), (_, r) in zip(flat, rflat):
        np.testing.assert_allclose(np.array(a), np.array(r), atol=2e-5, rtol=1e-3, err_msg=k)


def test_default_loss_falls_back_for_unknown_heads():
    model = _tiny("llama", False)
    model.lm_head = nn.Sequential(nn.Linear(64, 1000))
    batch = mx.random.randint(0, 1000, (2, 8))
    lengths = mx.array([[0, 7], [2, 5]])
    from mlx_lm.tuner.trainer import default_loss as mlx_lm_loss
    assert abs(ce_mod.default_loss(model, batch, lengths)[0].item()
               - mlx_lm_loss(model, batch, lengths)[0].item()) < 1e-5


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
def test_strided_and_broadcast_inputs(device, dtype):
    d, V = 24, 777
    h = mx.random.normal((d, 9)).astype(dtype).T  # transposed: not row-contiguous
    w = mx.random.normal((d, V)).astype(dtype).T * 0.5
    b = mx.broadcast_to(mx.array(0.3, dtype), (V,))
    y = mx.random.randint(0, V, (9,))
    g = mx.random.uniform(shape=(9,))
    loss, grads = _loss_and_grads(lce, h, w, b, y, g)
    rloss, rgrads = _loss_and_grads(lce_ref, h, w, b, y, g)
    o = oracle(h, w, b, y, g)
    for what, f, r, ref in zip(("loss", "dh", "dW", "db"), (loss, *grads), (rloss, *rgrads), o):
        assert_close_to_oracle(f, r, ref, dtype, what)


def test_checkpoint_and_value_and_grad():
    h, w, b, y = _inputs((6, 5), 16, 300, mx.float32)
    f = lambda h, w: lce(h, w, y, reduction="mean")  # noqa: E731
    r = lambda h, w: lce_ref(h, w, y, reduction="mean")  # noqa: E731
    got = mx.grad(mx.checkpoint(f), argnums=(0, 1))(h, w)
    want = mx.grad(r, argnums=(0, 1))(h, w)
    for a, c in zip(got, want):
        np.testing.assert_allclose(np.array(a), np.array(c), atol=1e-6, rtol=1e-4)


def test_memory_does_not_grow_with_the_logits():
    # The fused loss + dh never holds the (N, V) logits: its peak stays far below them.
    N, d, V = 128, 32, 32000
    h, w, _, y = _inputs((N,), d, V, mx.float32, bias=False)
    mx.eval(h, w, y)
    logits_bytes = N * V * 4

    def peak(fn):
        step = mx.value_and_grad(lambda h: fn(h, w, y, reduction="mean"))
        mx.eval(step(h))
        mx.clear_cache()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        mx.eval(step(h))
        return mx.get_peak_memory() - before

    with mx.stream(mx.cpu):
        fused, ref = peak(lce), peak(lce_ref)
    assert ref > logits_bytes  # the reference materializes them
    assert fused < logits_bytes / 10, (fused, logits_bytes)


@pytest.mark.parametrize("grads", ["dh", "all"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_vocabulary_chunks(device, dtype, bias, grads, monkeypatch):
    # MLX_TUNER_CE_CHUNK=256: the CUDA kernels walk V = 1000 in 4 chunks, the last one partial
    # (232 columns); the CPU kernels ignore it. Ignored targets, g = 0 rows, -inf logits.
    monkeypatch.setenv("MLX_TUNER_CE_CHUNK", "256")
    lead, d, V = (3, 13), 40, 1000
    h, w, b, y = _inputs(lead, d, V, dtype, bias=bias)
    if bias:  # banned vocabulary entries (never targets)
        b = mx.where(mx.arange(V) % 7 == 3, -mx.inf, b).astype(dtype)
        y = mx.where(y % 7 == 3, y - 1, y)
    y = mx.where(mx.arange(13)[None] % 5 == 2, -100, y)
    y = mx.where(mx.arange(13)[None] == 7, V, y)
    g = mx.where(mx.arange(13)[None] % 6 == 0, 0.0, mx.random.uniform(shape=lead))
    argnums = (0,) if grads == "dh" else ((0, 1, 2) if bias else (0, 1))

    def run(fn):
        def f(*params):
            out = fn(params[0], params[1], y, params[2] if bias else None)
            return (out.astype(mx.float32) * g).sum(), out
        params = (h, w, b) if bias else (h, w)
        (_, loss), gr = mx.value_and_grad(f, argnums=argnums)(*params)
        return loss, gr if isinstance(gr, (tuple, list)) else (gr,)

    loss, gr = run(lce)
    rloss, rgr = run(lce_ref)
    o = oracle(h, w, b, y, g)
    names = ("loss", "dh", "dW", "db")[: 1 + len(argnums)]
    for what, f, r, ref in zip(names, (loss, *gr), (rloss, *rgr), o):
        assert f.dtype == dtype, what
        assert_close_to_oracle(f, r, ref, dtype, what)


@pytest.mark.parametrize("V", [200, 512, 513])
def test_large_logits_and_chunk_edges(device, V, monkeypatch):
    # Logits in the hundreds (exp would overflow without the running max); V below, at and
    # one past a chunk multiple (the last chunk one column wide); h a view at an odd offset.
    # The gradients go through exp(z − lse) with lse rounded at |z| ~ 300: a relative bound.
    monkeypatch.setenv("MLX_TUNER_CE_CHUNK", "256")
    d = 24
    h = (mx.random.normal((30, d)) * 20.0)[1:]
    w = mx.random.normal((V, d))
    b = mx.random.normal((V,)) * 50.0
    y = mx.random.randint(0, V, (29,))
    g = mx.random.uniform(shape=(29,))
    loss, grads = _loss_and_grads(lce, h, w, b, y, g)
    rloss, _ = _loss_and_grads(lce_ref, h, w, b, y, g)
    o = oracle(h, w, b, y, g)
    assert_close_to_oracle(loss, rloss, o[0], mx.float32, "loss")
    for what, f, ref in zip(("dh", "dW", "db"), grads, o[1:]):
        err = np.max(np.abs(to_f64(f) - ref))
        assert err <= 2e-4 * max(1.0, np.max(np.abs(ref))), (what, err)


def test_minus_inf_bias_bans_tokens(device):
    # A bias of -inf removes vocabulary entries (never targets): softmax 0, gradient 0.
    h, w, b, y = _inputs((17,), 12, 700, mx.float32)
    b = mx.where(mx.arange(700) % 3 == 0, -mx.inf, b)
    y = y - y % 3 + 1
    g = mx.random.uniform(shape=(17,))
    loss, grads = _loss_and_grads(lce, h, w, b, y, g)
    rloss, rgrads = _loss_and_grads(lce_ref, h, w, b, y, g)
    o = oracle(h, w, b, y, g)
    for what, f, r, ref in zip(("loss", "dh", "dW", "db"), (loss, *grads), (rloss, *rgrads), o):
        assert_close_to_oracle(f, r, ref, mx.float32, what)
