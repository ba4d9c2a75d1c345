"""Distillation losses, as ``mlx_lm.tuner.losses``: ``kl_div_loss`` and ``js_div_loss``.

Called exactly like mlx-lm's (``loss(logits_q, logits_p)`` returns the per-row loss,
shape ``logits_q.shape[:-1]``), backed by the fused ops of ``mlx_tuner.ops``. Unlike
mlx-lm, the teacher logits get their true gradient when one asks for it.

Keyword-only extras for distillation:
- ``temperature``: both logits are divided by it and the loss is multiplied by
  ``temperature ** 2``, so gradient magnitudes stay comparable across temperatures
  (Hinton et al., 2015). 1.0 is exactly mlx-lm's loss.
- ``mask``: per-row weights (bool or float) of shape ``logits_q.shape[:-1]``, e.g. the
  tokens that are not padding; masked rows contribute 0.
- ``reduction``: ``"none"`` (per row, in the logits' dtype), ``"sum"`` or ``"mean"``
  (float32; the mean is over unmasked rows).
"""

from __future__ import annotations

import mlx.core as mx

from .ops import js_div, kl_div

_REDUCTIONS = ("none", "mean", "sum")


def _loss(name, op, logits_q, logits_p, reduction, mask, temperature):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"[{name}] reduction must be one of {_REDUCTIONS} but got {reduction!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or (
        temperature <= 0
    ):
        raise ValueError(f"[{name}] temperature must be a positive float but got {temperature!r}.")
    if temperature != 1.0:
        logits_q = logits_q / temperature
        logits_p = logits_p / temperature
    loss = op(logits_q, logits_p)
    if temperature != 1.0:
        loss = loss * (temperature**2)
    if mask is not None:
        if not isinstance(mask, mx.array) or tuple(mask.shape) != tuple(loss.shape):
            got = tuple(mask.shape) if isinstance(mask, mx.array) else type(mask).__name__
            raise ValueError(
                f"[{name}] mask must be an mx.array of shape {tuple(loss.shape)} but got {got}."
            )
        # where, not a product: a masked row (e.g. all -inf padding) may hold NaN.
        weight = mask if mask.dtype == mx.bool_ else mask.astype(loss.dtype)
        loss = mx.where(mask != 0, loss * weight if mask.dtype != mx.bool_ else loss,
                        mx.zeros_like(loss))
    if reduction == "none":
        return loss
    total = mx.sum(loss.astype(mx.float32))
    if reduction == "sum":
        return total
    if mask is None:
        return total / max(loss.size, 1)
    return total / mx.maximum(mx.sum(mask.astype(mx.float32)), 1.0)


def kl_div_loss(logits_q: mx.array, logits_p: mx.array, *, reduction: str = "none",
                mask: mx.array | None = None, temperature: float = 1.0) -> mx.array:
    """KL(softmax(logits_p) || softmax(logits_q)) per row: q = student, p = teacher."""
    return _loss("kl_div_loss", kl_div, logits_q, logits_p, reduction, mask, temperature)


def js_div_loss(logits_q: mx.array, logits_p: mx.array, *, reduction: str = "none",
                mask: mx.array | None = None, temperature: float = 1.0) -> mx.array:
    """Jensen-Shannon divergence of softmax(logits_q) and softmax(logits_p) per row."""
    return _loss("js_div_loss", js_div, logits_q, logits_p, reduction, mask, temperature)
