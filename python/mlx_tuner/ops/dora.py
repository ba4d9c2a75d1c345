"""DoRA linear: y = (m / n) * (x W^T + scale * (x_d A) B) + bias, without building W + s (AB)^T.

n_i = || W_i + scale * (A B)^T_i || (row norms of the adapted weight), a constant in the
backward as in mlx-lm (stop_gradient). W dense, or quantized when `scales` is given.
"""

from __future__ import annotations

import mlx.core as mx

from . import _extension
from ._checks import check_array, check_scalar, check_shape, empty_batch_result
from .qlora import QUANT_MODES, quantized_in_dims


def _check(op, x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped, scales, bits,
           biases=None, group_size=64, mode="affine", weight_sq_norm=None):
    check_array(op, "x", x, ndim_min=1)
    if scales is None:
        check_array(op, "weight", weight, ndim=2)
        out_dims, in_dims = weight.shape
    else:
        if mode not in QUANT_MODES:
            raise ValueError(f"[{op}] mode must be one of {QUANT_MODES} but got {mode!r}.")
        out_dims, in_dims = weight.shape[0], quantized_in_dims(op, weight, bits)
        if mode == "affine":
            if bits not in (2, 3, 4, 5, 6, 8):
                raise ValueError(f"[{op}] bits must be one of 2, 3, 4, 5, 6, 8 but got {bits}.")
            if group_size not in (32, 64, 128):
                raise ValueError(
                    f"[{op}] group_size must be 32, 64 or 128 but got {group_size}.")
            if biases is None:
                raise ValueError(f"[{op}] biases must be given for mode 'affine' but got None.")
            check_shape(op, "scales", scales, (out_dims, in_dims // group_size))
            check_shape(op, "biases", biases, (out_dims, in_dims // group_size))
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
        check_array(op, "x_dropped", x_dropped)
        check_shape(op, "x_dropped", x_dropped, tuple(x.shape))
    if weight_sq_norm is not None:
        check_shape(op, "weight_sq_norm", weight_sq_norm, (out_dims,))


def dora_linear_reference(x, weight, lora_a, lora_b, magnitude, scale, bias=None, *,
                          x_dropped=None, scales=None, biases=None, group_size=64, bits=4,
                          mode="affine"):
    """What mlx-lm's DoRALinear computes: it builds the adapted weight every call."""
    _check("dora_linear", x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped, scales,
           bits, biases, group_size, mode)
    if x.size == 0:
        return empty_batch_result(dora_linear_reference, x, weight, lora_a, lora_b, magnitude,
                                  scale, bias, scales=scales, biases=biases,
                                  group_size=group_size, bits=bits, mode=mode)
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


def dora_weight_sq_norm(weight, scales=None, biases=None, *, group_size=64, bits=4,
                        mode="affine"):
    """c_i = ||W_i||^2 in float32 (of the dequantized W when `scales` is given).

    W is frozen, so layers compute this once and pass it as ``weight_sq_norm``. Rows are
    taken in chunks so that no out x in float32 temporary is made.
    """
    ext = _extension.kernel_for("dora")
    if ext is not None and (scales is None or mode == "affine"):
        return ext.dora_weight_sq_norm(weight, scales, biases, group_size=group_size, bits=bits)
    out_dims = weight.shape[0]
    in_dims = weight.shape[1] if scales is None else weight.shape[1] * 32 // bits
    step = max(1, (1 << 22) // max(in_dims, 1))
    parts = []
    for r0 in range(0, out_dims, step):
        w = weight[r0:r0 + step]
        if scales is not None:
            w = mx.dequantize(w, scales[r0:r0 + step],
                              None if biases is None else biases[r0:r0 + step],
                              group_size=group_size, bits=bits, mode=mode)
        w = w.astype(mx.float32)
        parts.append((w * w).sum(axis=1))
    return mx.concatenate(parts) if parts else mx.zeros((0,), mx.float32)


def dora_linear(x, weight, lora_a, lora_b, magnitude, scale, bias=None, *, x_dropped=None,
                scales=None, biases=None, group_size=64, bits=4, mode="affine",
                weight_sq_norm=None, stream=None):
    """Fused DoRA linear (falls back to ``dora_linear_reference`` without a kernel).

    ``weight_sq_norm``: the cached ||W_i||^2 (``dora_weight_sq_norm``); computed when None.
    Quantized modes other than "affine" run the reference.
    """
    ext = _extension.kernel_for("dora", stream)
    if scales is not None and (mode != "affine" or biases is None or (
            _extension.device_of(stream) == mx.gpu
            and _extension.kernel_for("qlora", stream) is None)):
        # Modes other than affine run the reference; so does the GPU without the QLoRA
        # kernel, where the quantized path would compose MLX ops, measured 2x slower than
        # mlx-lm's own (BENCHMARKS.md).
        ext = None
    if ext is None or not isinstance(x, mx.array) or x.size == 0:
        _check("dora_linear", x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped,
               scales, bits, biases, group_size, mode, weight_sq_norm)
        return dora_linear_reference(x, weight, lora_a, lora_b, magnitude, scale, bias,
                                     x_dropped=x_dropped, scales=scales, biases=biases,
                                     group_size=group_size, bits=bits, mode=mode)
    try:  # the op checks its arguments itself (csrc/ops/dora.cpp), in the words of _check
        s = scale if type(scale) is float else check_scalar("dora_linear", "scale", scale)
        return ext.dora_linear(x, weight, lora_a, lora_b, magnitude, s, bias,
                               x_dropped=x_dropped, scales=scales, biases=biases,
                               group_size=group_size, bits=bits, weight_sq_norm=weight_sq_norm,
                               stream=stream)
    except (TypeError, ValueError):
        _check("dora_linear", x, weight, lora_a, lora_b, magnitude, scale, bias, x_dropped,
               scales, bits, biases, group_size, mode, weight_sq_norm)  # names the argument
        raise
