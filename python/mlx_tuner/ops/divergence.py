"""KL and JS divergence between two sets of logits, per row, fused.

For student logits q and teacher logits p of shape (..., V):
    kl_div(q, p) = sum_v softmax(p)_v * (log_softmax(p)_v - log_softmax(q)_v)
    js_div(q, p) = 1/2 KL(p || m) + 1/2 KL(q || m),  m = (softmax p + softmax q) / 2
Output shape (...), in the promoted input dtype; accumulated in float32. Gradients flow
to both q and p (mlx-lm returns zeros for p); only the requested ones are computed.
"""

from __future__ import annotations

import mlx.core as mx

from . import _extension
from ._checks import check_array


def _check(op: str, logits_q, logits_p) -> None:
    check_array(op, "logits_q", logits_q, ndim_min=1)
    check_array(op, "logits_p", logits_p, ndim_min=1)
    if logits_q.shape != logits_p.shape:
        raise ValueError(
            f"[{op}] logits_p must have the shape of logits_q {tuple(logits_q.shape)} "
            f"but got {tuple(logits_p.shape)}."
        )
    if logits_q.shape[-1] < 1:
        raise ValueError(
            f"[{op}] logits_q must have a last dimension of at least 1 but got shape "
            f"{tuple(logits_q.shape)}."
        )


def _log_probs(logits_q, logits_p):
    lq = logits_q.astype(mx.float32)
    lp = logits_p.astype(mx.float32)
    return lq - mx.logsumexp(lq, axis=-1, keepdims=True), lp - mx.logsumexp(
        lp, axis=-1, keepdims=True)


def _xlogy_diff(p, lp, lq):
    # p * (lp - lq), 0 where p == 0: masked (-inf) entries contribute nothing, and the
    # substituted zeros keep their gradient 0 instead of 0 * inf = NaN.
    live = p > 0
    return mx.where(live, p * (mx.where(live, lp, 0.0) - mx.where(live, lq, 0.0)), 0.0)


def kl_div_reference(logits_q: mx.array, logits_p: mx.array) -> mx.array:
    """Pure-MLX KL(p || q) per row; what mlx-lm computes, with -inf logits made safe."""
    _check("kl_div", logits_q, logits_p)
    dtype = mx.result_type(logits_q.dtype, logits_p.dtype)
    if logits_q.size == 0:  # mx.logsumexp rejects empty arrays
        return mx.zeros(logits_q.shape[:-1], dtype)
    lq, lp = _log_probs(logits_q, logits_p)
    return mx.sum(_xlogy_diff(mx.exp(lp), lp, lq), axis=-1).astype(dtype)


def js_div_reference(logits_q: mx.array, logits_p: mx.array) -> mx.array:
    """Pure-MLX Jensen-Shannon divergence per row."""
    _check("js_div", logits_q, logits_p)
    dtype = mx.result_type(logits_q.dtype, logits_p.dtype)
    if logits_q.size == 0:  # mx.logsumexp rejects empty arrays
        return mx.zeros(logits_q.shape[:-1], dtype)
    lq, lp = _log_probs(logits_q, logits_p)
    pq, pp = mx.exp(lq), mx.exp(lp)
    s = pp + pq
    lm = mx.log(0.5 * mx.where(s > 0, s, 1.0))
    js = 0.5 * (_xlogy_diff(pp, lp, lm) + _xlogy_diff(pq, lq, lm))
    return mx.sum(js, axis=-1).astype(dtype)


def kl_div(logits_q: mx.array, logits_p: mx.array, *, stream=None) -> mx.array:
    """Fused KL(p || q) per row (falls back to ``kl_div_reference`` without a kernel)."""
    _check("kl_div", logits_q, logits_p)
    ext = _extension.kernel_for("divergence", stream)
    if ext is None:
        return kl_div_reference(logits_q, logits_p)
    return ext.kl_div(logits_q, logits_p, stream=stream)


def js_div(logits_q: mx.array, logits_p: mx.array, *, stream=None) -> mx.array:
    """Fused Jensen-Shannon divergence per row (falls back to ``js_div_reference``)."""
    _check("js_div", logits_q, logits_p)
    ext = _extension.kernel_for("divergence", stream)
    if ext is None:
        return js_div_reference(logits_q, logits_p)
    return ext.js_div(logits_q, logits_p, stream=stream)
