"""Linear cross-entropy, fused: the training loss of a language model's head without the
(N, V) logits.

For hidden states h (..., d), the head weight W (V, d) (optionally bias b (V,), or a
quantized W with scales/biases) and integer targets y (...):
    loss = logsumexp(h·Wᵀ + b) − (h·Wᵀ + b)[y]        per token, times mask
reduction "none" returns it per token (in the promoted dtype of h and the head, as mlx-lm's
``nn.losses.cross_entropy(logits, targets) * mask`` does); "sum" its float32 sum; "mean" the
sum over the number of tokens counted, mlx-lm's ``default_loss``.

Targets outside [0, V) (e.g. -100) are ignored: loss 0, no gradient, not counted by "mean".

The fused path computes the log-sum-exp blockwise over the vocabulary and recomputes each
logit tile in the backward (Cut Cross-Entropy), so its memory is O(N·d + V·d).
``grad_in_forward=True`` (a speed hint for training) lets the CUDA kernels also accumulate
∂loss/∂h in the forward, flash-attention style: with a frozen head the backward then
needs no GEMM (2 GEMMs of N·V·d per step instead of 3); an evaluation-only loss would pay
the extra GEMM for nothing, hence off by default.
``model_head`` and ``hidden_states`` let a trainer call it on an mlx-lm model;
``default_loss`` is mlx-lm's ``tuner.trainer.default_loss`` on top of them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import _extension
from ._checks import _fmt_dtype, check_array

_OP = "linear_cross_entropy"
_REDUCTIONS = ("none", "sum", "mean")


def _check(h, weight, targets, bias, mask, reduction, scales, grad_in_forward=False) -> None:
    if not isinstance(grad_in_forward, bool):
        raise ValueError(
            f"[{_OP}] grad_in_forward must be a bool but got {type(grad_in_forward).__name__}.")
    check_array(_OP, "h", h, ndim_min=1)
    check_array(_OP, "weight", weight, ndim=2, float_only=scales is None)
    if not isinstance(targets, mx.array) or not mx.issubdtype(targets.dtype, mx.integer):
        got = _fmt_dtype(targets.dtype) if isinstance(targets, mx.array) else type(targets).__name__
        raise ValueError(f"[{_OP}] targets must be an integer mx.array but got {got}.")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"[{_OP}] targets must have shape {tuple(h.shape[:-1])} (h's leading dimensions) "
            f"but got {tuple(targets.shape)}.")
    V, d = weight.shape[0], h.shape[-1]
    if scales is None and tuple(weight.shape) != (V, d):
        raise ValueError(f"[{_OP}] weight must have shape ({V}, {d}) but got {tuple(weight.shape)}.")
    if scales is not None and weight.dtype != mx.uint32:
        raise ValueError(
            f"[{_OP}] a quantized weight must be uint32 but got {_fmt_dtype(weight.dtype)}.")
    if bias is not None:
        check_array(_OP, "bias", bias, ndim=1)
        if bias.shape[0] != V:
            raise ValueError(f"[{_OP}] bias must have shape ({V},) but got {tuple(bias.shape)}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"[{_OP}] reduction must be one of {_REDUCTIONS} but got {reduction!r}.")
    if mask is not None:
        if not isinstance(mask, mx.array):
            raise ValueError(f"[{_OP}] mask must be an mx.array but got {type(mask).__name__}.")
        try:
            ok = mx.broadcast_shapes(mask.shape, targets.shape) == tuple(targets.shape)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"[{_OP}] mask must broadcast to the targets' shape {tuple(targets.shape)} "
                f"but got {tuple(mask.shape)}.")


def _result_dtype(h, weight, bias, scales):
    dts = [h.dtype, scales.dtype if scales is not None else weight.dtype]
    dts += [bias.dtype] if bias is not None else []
    return mx.result_type(*dts)


def _reduce(ce, targets, V, mask, reduction):
    # ce: per-token loss, already 0 for ignored targets.
    valid = mx.logical_and(targets >= 0, targets < V)
    if mask is not None:
        ce = ce * mask
    if reduction == "none":
        return ce
    total = ce.astype(mx.float32).sum()
    if reduction == "sum":
        return total
    weights = valid if mask is None else mask.astype(mx.float32) * valid
    return total / weights.astype(mx.float32).sum()


def linear_cross_entropy_reference(h, weight, targets, bias=None, *, mask=None,
                                   reduction="none", scales=None, biases=None, group_size=64,
                                   bits=4, mode="affine", grad_in_forward=False,
                                   stream=None) -> mx.array:
    """Pure-MLX twin: materializes the logits, then mlx-lm's ``nn.losses.cross_entropy``.
    ``grad_in_forward`` is accepted (and checked) for a signature like the fused op's."""
    _check(h, weight, targets, bias, mask, reduction, scales, grad_in_forward)
    if targets.size == 0:  # MLX 0.32.4's CUDA matmul crashes on an empty batch
        ce = mx.zeros(targets.shape, _result_dtype(h, weight, bias, scales))
        return _reduce(ce, targets, weight.shape[0], mask, reduction)
    with mx.stream(stream if stream is not None else mx.default_stream(mx.default_device())):
        if scales is not None:
            logits = mx.quantized_matmul(h, weight, scales, biases, transpose=True,
                                         group_size=group_size, bits=bits, mode=mode)
        else:
            logits = h @ weight.T
        if bias is not None:
            logits = logits + bias
        V = logits.shape[-1]
        valid = mx.logical_and(targets >= 0, targets < V)
        if targets.size == 0:  # mx.logsumexp rejects empty arrays
            ce = mx.zeros(targets.shape, logits.dtype)
        else:
            ce = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0)) * valid
        return _reduce(ce, targets, V, mask, reduction)


def linear_cross_entropy(h, weight, targets, bias=None, *, mask=None, reduction="none",
                         scales=None, biases=None, group_size=64, bits=4, mode="affine",
                         grad_in_forward: bool = False, stream=None) -> mx.array:
    """Fused cross-entropy of h·weightᵀ (+ bias) against targets (see the module doc).

    ``grad_in_forward`` is a speed hint for a training step: where the backend has the
    kernel (a CUDA build, a GPU stream; a quantized head is dequantized there) the forward
    also computes ∂loss/∂h, so that a gradient of h alone (a frozen head, as in LoRA)
    costs no GEMM in the backward; gradients of the head still recompute the logits.
    Elsewhere (CPU, Metal, the reference) it is ignored. Values are the same either way.

    Runs ``linear_cross_entropy_reference`` where this build has no kernel for the device.
    """
    _check(h, weight, targets, bias, mask, reduction, scales, grad_in_forward)
    ext = _extension.kernel_for("cross_entropy", stream)
    if ext is None or targets.size == 0:  # an empty batch needs no kernel
        return linear_cross_entropy_reference(
            h, weight, targets, bias, mask=mask, reduction=reduction, scales=scales,
            biases=biases, group_size=group_size, bits=bits, mode=mode, stream=stream)
    loss = ext.linear_cross_entropy(h, weight, targets, bias, scales, biases, group_size,
                                    bits, mode, grad_in_forward=grad_in_forward,
                                    stream=stream)
    if reduction == "none":
        loss = loss.astype(_result_dtype(h, weight, bias, scales))
    return _reduce(loss, targets, weight.shape[0], mask, reduction)


# ---------------------------------------------------------------- mlx-lm models
# Modules whose Model.__call__ is exactly `lm_head(model.model(x))`, or
# `model.embed_tokens.as_linear(model.model(x))` when there is no lm_head (tied weights).
_PLAIN_HEAD_MODULES = {"llama", "qwen2", "qwen3", "olmo2", "phi3", "gemma"}


def _plain(model) -> bool:
    mod = type(model).__module__
    return mod.startswith("mlx_lm.models.") and mod.rsplit(".", 1)[1] in _PLAIN_HEAD_MODULES


def _quant(layer) -> dict:
    return {"scales": layer["scales"], "biases": layer.get("biases"),
            "group_size": layer.group_size, "bits": layer.bits,
            "mode": getattr(layer, "mode", "affine")}


def model_head(model):
    """(weight, bias, quant or None, is_tied) of an mlx-lm model's output head, or None.

    quant is a dict of ``scales, biases, group_size, bits, mode`` (keyword arguments of
    ``linear_cross_entropy``). None when the logits are not a plain linear map of
    ``hidden_states(model, x)`` (an unknown architecture, logit scaling or soft-capping, a
    LoRA-wrapped head): the caller then computes ``model(x)`` and the reference loss.
    """
    if not _plain(model) or not hasattr(model, "model"):
        return None
    head = _head_module(model)
    if isinstance(head, nn.QuantizedLinear):
        return head["weight"], head.get("bias"), _quant(head), False
    if type(head) is nn.Linear:
        return head["weight"], head.get("bias"), None, False
    if isinstance(head, nn.QuantizedEmbedding):
        return head["weight"], None, _quant(head), True
    if type(head) is nn.Embedding:
        return head["weight"], None, None, True
    return None


def _head_module(model):
    """The module whose weight maps hidden states to logits: ``lm_head``, else the tied
    ``model.embed_tokens`` (None if neither)."""
    head = getattr(model, "lm_head", None)
    return head if head is not None else getattr(model.model, "embed_tokens", None)


def hidden_states(model, inputs: mx.array) -> mx.array:
    """The final-normed hidden states that an mlx-lm model's head maps to logits."""
    return model.model(inputs)


def _head_frozen(model) -> bool:
    """Whether the head that ``model_head`` found gets no gradient (no trainable weight or
    bias), as with LoRA: then only h needs one."""
    trainable = _head_module(model).trainable_parameters()
    return "weight" not in trainable and "bias" not in trainable


def masked_loss_sum(model, inputs: mx.array, targets: mx.array, keep: mx.array, *,
                    grad_in_forward: bool = False) -> mx.array:
    """Sum over kept targets of the cross-entropy of ``model(inputs)``, in float32: fused
    from the hidden states where ``model_head`` knows the head, else from the logits.

    ``grad_in_forward``: the caller takes gradients (a training step). It is passed on to
    ``linear_cross_entropy`` when the head is frozen; a trained head needs the backward's
    recomputed logits anyway, so the forward's extra GEMM would be wasted.
    """
    head = model_head(model)
    if head is None:
        ce = nn.losses.cross_entropy(model(inputs), targets) * keep
        return ce.astype(mx.float32).sum()
    weight, bias, quant, _ = head
    hint = grad_in_forward and _head_frozen(model)
    ce = linear_cross_entropy(hidden_states(model, inputs), weight, targets, bias, mask=keep,
                              reduction="sum", grad_in_forward=hint, **(quant or {}))
    return ce.astype(mx.float32)


def default_loss(model, batch: mx.array, lengths: mx.array):
    """mlx_lm.tuner.trainer.default_loss exactly (its mask included), same arguments and
    result ``(ce, ntoks)``, with the fused loss where ``model_head`` knows the head."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    ntoks = mask.sum()
    return masked_loss_sum(model, inputs, targets, mask) / ntoks, ntoks
