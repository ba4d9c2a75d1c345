"""LoRA linear: y = x W^T + bias + scale * (x_d A) B, fused.

x (..., in); W (out, in) the frozen base; A (in, r); B (r, out); x_d = dropout(x), given
as `x_dropped` (x itself when None). Gradients: x, A, B, and W / bias when asked.
"""

from __future__ import annotations

import mlx.core as mx

from . import _extension
from ._checks import check_array, check_scalar, check_shape, empty_batch_result


def _check(op, x, weight, lora_a, lora_b, scale, bias, x_dropped):
    check_array(op, "x", x, ndim_min=1)
    check_array(op, "weight", weight, ndim=2)
    out_dims, in_dims = weight.shape
    if x.shape[-1] != in_dims:
        raise ValueError(
            f"[{op}] x must have last dimension {in_dims} (weight is {tuple(weight.shape)}) "
            f"but got shape {tuple(x.shape)}."
        )
    check_array(op, "lora_a", lora_a, ndim=2)
    r = lora_a.shape[1]
    check_shape(op, "lora_a", lora_a, (in_dims, r))
    check_array(op, "lora_b", lora_b, ndim=2)
    check_shape(op, "lora_b", lora_b, (r, out_dims))
    check_scalar(op, "scale", scale)
    if bias is not None:
        check_array(op, "bias", bias, ndim=1)
        check_shape(op, "bias", bias, (out_dims,))
    if x_dropped is not None:
        check_array(op, "x_dropped", x_dropped)
        check_shape(op, "x_dropped", x_dropped, tuple(x.shape))


def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None, *, x_dropped=None):
    """What mlx-lm's LoRALinear computes, in plain MLX ops."""
    _check("lora_linear", x, weight, lora_a, lora_b, scale, bias, x_dropped)
    if x.size == 0:
        return empty_batch_result(lora_linear_reference, x, weight, lora_a, lora_b, scale, bias)
    xd = x if x_dropped is None else x_dropped
    y = x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)
    z = (xd @ lora_a) @ lora_b
    return y + (scale * z).astype(x.dtype)


def lora_linear(x, weight, lora_a, lora_b, scale, bias=None, *, x_dropped=None, stream=None):
    """Fused LoRA linear (falls back to ``lora_linear_reference`` without a kernel).

    One primitive computes the base GEMM with the rank-r term accumulated into the same
    output (saving ``x_dropped @ lora_a`` for the backward); its vjp is a second fused
    primitive that computes only the gradients asked for.
    """
    ext = _extension.kernel_for("lora", stream)
    if ext is None or not isinstance(x, mx.array) or x.size == 0:  # an empty batch: no kernel
        return lora_linear_reference(x, weight, lora_a, lora_b, scale, bias, x_dropped=x_dropped)
    try:  # the op checks its arguments itself (csrc/ops/lora.cpp), in the words of _check
        s = scale if type(scale) is float else check_scalar("lora_linear", "scale", scale)
        return ext.lora_linear(x, weight, lora_a, lora_b, s, bias, x_dropped, stream=stream)
    except (TypeError, ValueError):
        _check("lora_linear", x, weight, lora_a, lora_b, scale, bias, x_dropped)  # names it
        raise
