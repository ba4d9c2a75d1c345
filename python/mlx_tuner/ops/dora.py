"""DoRA linear: y = (m / n) * (x W^T + scale * (x_d A) B) + bias, without building W + s (AB)^T.

n_i = || W_i + scale * (A B)^T_i || (row norms of the adapted weight), a constant in the
backward as in mlx-lm (stop_gradient). W dense, or quantized when `scales` is given.
"""

from __future__ import annotations

import mlx.core as mx

from ._checks import check_array, check_scalar, check_shape
from .qlora import quantized_in_dims


def _check(op, x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped, scales, bits):
    check_array(op, "x", x, ndim_min=1)
    if scales is None:
        check_array(op, "weight", weight, ndim=2)
        out_dims, in_dims = weight.shape
    else:
        out_dims, in_dims = weight.shape[0], quantized_in_dims(op, weight, bits)
    if x.shape[-1] != in_dims:
        raise ValueError(
            f"[{op}] x must have last dimension {in_dims} but got shape {tuple(x.shape)}."
        )
    check_array(op, "lora_a", lora_a, ndim=2)
    r = lora_a.shape[1]
    check_shape(op, "lora_a", lora_a, (in_dims, r))
    check_array(op, "lora_b", lora_b, ndim=2)
    check_shape(op, "lora_b", lora_b, (r, out_dims))
    check_array(op, "magnitude", magnitude, ndim=1)
    check_shape(op, "magnitude", magnitude, (out_dims,))
    check_scalar(op, "scale", scale)
    if bias is not None:
        check_shape(op, "bias", bias, (out_dims,))
    if x_dropped is not None:
        check_shape(op, "x_dropped", x_dropped, tuple(x.shape))


def dora_linear_reference(x, weight, lora_a, lora_b, magnitude, scale, bias=None, *,
                          x_dropped=None, scales=None, biases=None, group_size=64, bits=4,
                          mode="affine"):
    """What mlx-lm's DoRALinear computes: it builds the adapted weight every call."""
    _check("dora_linear", x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped, scales,
           bits)
    w = weight
    if scales is not None:
        w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits, mode=mode)
    xd = x if x_dropped is None else x_dropped
    y = x @ w.T
    z = (xd @ lora_a) @ lora_b
    out = y + (scale * z).astype(x.dtype)
    adapted = w + (scale * lora_b.T) @ lora_a.T
    denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
    out = (magnitude / denom).astype(x.dtype) * out
    if bias is not None:
        out = out + bias
    return out


def dora_linear(x, weight, lora_a, lora_b, magnitude, scale, bias=None, *, x_dropped=None,
                scales=None, biases=None, group_size=64, bits=4, mode="affine", stream=None):
    """Fused DoRA linear (falls back to ``dora_linear_reference`` without a kernel)."""
    return dora_linear_reference(x, weight, lora_a, lora_b, magnitude, scale, bias,
                                 x_dropped=x_dropped, scales=scales, biases=biases,
                                 group_size=group_size, bits=bits, mode=mode)
