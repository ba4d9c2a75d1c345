"""QLoRA linear: y = x dequant(Wq)^T + bias + scale * (x_d A) B, never dequantizing W.

Wq, scales, biases as `mx.quantize` lays them out (mode "affine": bits 2, 3, 4, 5, 6, 8;
group size 32/64/128). Gradients: x, x_dropped, A, B, bias. The quantized base is frozen:
asking for the gradient of weight, scales or biases raises a ValueError (mlx's
quantized_matmul would give scales/biases gradients; a frozen base never needs them).
Modes mxfp4, mxfp8 and nvfp4 have no fused kernel: they run the reference.
"""

from __future__ import annotations

import mlx.core as mx

from . import _extension
from ._checks import check_array, check_scalar, check_shape, empty_batch_result

QUANT_MODES = ("affine", "mxfp4", "mxfp8", "nvfp4")
# What backend_info() says about this op beyond which devices have a kernel.
BACKEND_NOTE = "fused for mode 'affine' only; modes mxfp4, mxfp8 and nvfp4 run the reference"


def quantized_in_dims(op, weight, bits):
    if weight.dtype != mx.uint32 or weight.ndim != 2:
        raise ValueError(
            f"[{op}] weight must be a 2-D uint32 array from mx.quantize but got "
            f"{weight.dtype} of shape {tuple(weight.shape)}."
        )
    return weight.shape[1] * 32 // bits


def _check(op, x, weight, scales, biases, lora_a, lora_b, scale, bias, x_dropped,
           group_size, bits, mode):
    if mode not in QUANT_MODES:
        raise ValueError(f"[{op}] mode must be one of {QUANT_MODES} but got {mode!r}.")
    if mode == "affine":
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"[{op}] bits must be one of 2, 3, 4, 5, 6, 8 but got {bits}.")
        if group_size not in (32, 64, 128):
            raise ValueError(f"[{op}] group_size must be 32, 64 or 128 but got {group_size}.")
        if biases is None:
            raise ValueError(f"[{op}] biases must be given for mode 'affine' but got None.")
    check_array(op, "x", x, ndim_min=1)
    in_dims = quantized_in_dims(op, weight, bits)
    out_dims = weight.shape[0]
    if x.shape[-1] != in_dims:
        raise ValueError(
            f"[{op}] x must have last dimension {in_dims} (from weight {tuple(weight.shape)} "
            f"at {bits} bits) but got shape {tuple(x.shape)}."
        )
    check_shape(op, "scales", scales, (out_dims, in_dims // group_size))
    if biases is not None:
        check_shape(op, "biases", biases, (out_dims, in_dims // group_size))
    check_array(op, "lora_a", lora_a, ndim=2)
    if lora_a.shape[0] != in_dims:
        raise ValueError(
            f"[{op}] lora_a must have shape ({in_dims}, r) but got {tuple(lora_a.shape)}.")
    r = lora_a.shape[1]
    check_array(op, "lora_b", lora_b, ndim=2)
    check_shape(op, "lora_b", lora_b, (r, out_dims))
    check_scalar(op, "scale", scale)
    if bias is not None:
        check_shape(op, "bias", bias, (out_dims,))
    if x_dropped is not None:
        check_shape(op, "x_dropped", x_dropped, tuple(x.shape))


def qlora_linear_reference(x, weight, scales, biases, lora_a, lora_b, scale, bias=None, *,
                           group_size=64, bits=4, mode="affine", x_dropped=None):
    """What mlx-lm's LoRALinear over an nn.QuantizedLinear computes."""
    _check("qlora_linear", x, weight, scales, biases, lora_a, lora_b, scale, bias, x_dropped,
           group_size, bits, mode)
    if x.size == 0:
        return empty_batch_result(qlora_linear_reference, x, weight, scales, biases, lora_a,
                                  lora_b, scale, bias, group_size=group_size, bits=bits,
                                  mode=mode)
    xd = x if x_dropped is None else x_dropped
    y = mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size,
                            bits=bits, mode=mode)
    if bias is not None:
        y = y + bias
    z = (xd @ lora_a) @ lora_b
    return y + (scale * z).astype(x.dtype)


def qlora_linear(x, weight, scales, biases, lora_a, lora_b, scale, bias=None, *,
                 group_size=64, bits=4, mode="affine", x_dropped=None, stream=None):
    """Fused QLoRA linear (falls back to ``qlora_linear_reference`` without a kernel)."""
    ext = _extension.kernel_for("qlora", stream) if mode == "affine" else None
    if ext is None or biases is None or not isinstance(x, mx.array) or x.size == 0:
        return qlora_linear_reference(x, weight, scales, biases, lora_a, lora_b, scale, bias,
                                      group_size=group_size, bits=bits, mode=mode,
                                      x_dropped=x_dropped)
    try:  # the op checks its arguments itself (csrc/ops/qlora.cpp), in the words of _check
        s = scale if type(scale) is float else check_scalar("qlora_linear", "scale", scale)
        return ext.qlora_linear(x, weight, scales, biases, lora_a, lora_b, s, bias, x_dropped,
                                group_size=group_size, bits=bits, stream=stream)
    except (TypeError, ValueError):
        _check("qlora_linear", x, weight, scales, biases, lora_a, lora_b, scale, bias,
               x_dropped, group_size, bits, mode)  # names the argument
        raise
