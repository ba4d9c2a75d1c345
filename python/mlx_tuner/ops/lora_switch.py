"""LoRA over a mixture-of-experts switch layer, fused:

    y = gather_mm(x, W^T, indices) (+ bias[indices]) + scale * gather_mm(gather_mm(x_d, A^T), B^T)

with mx.gather_mm's broadcasting: x (..., M, in) and indices broadcast over the batch
dimensions, y (batch..., M, out). W (experts, out, in) the frozen base (or a quantized one
given with `scales`/`biases`), A (experts, r, in), B (experts, out, r) (mlx-lm's layout),
bias (experts, out); x_d = dropout(x) as `x_dropped`. Gradients: x, x_dropped, A, B, and
W / bias when asked (not for a quantized base, nor for indices).
"""

from __future__ import annotations

import mlx.core as mx

from . import _extension
from ._checks import check_array, check_scalar, check_shape
from .qlora import QUANT_MODES

OP = "lora_switch_linear"
# The affine quantizations the CPU kernel dequantizes itself.
FUSED_BITS = (2, 3, 4, 5, 6, 8)
FUSED_GROUP_SIZES = (32, 64, 128)
# What backend_info() says about this op beyond which devices have a kernel.
BACKEND_NOTE = ("CPU: dense and affine-quantized bases fused (bits 2, 3, 4, 5, 6, 8; group "
                "sizes 32, 64, 128; W_e dequantized a panel of rows at a time, never the whole "
                "weight); other quantization modes, bits or group sizes run the reference "
                "(gather_qmm). GPU: no GPU kernel: runs mlx-lm's gather_mm / gather_qmm maths")
GPU_MISSING = "no GPU kernel: runs mlx-lm's gather_mm / gather_qmm maths"


def _check(x, weight, lora_a, lora_b, indices, scale, bias, x_dropped, scales, biases,
           group_size, bits, mode):
    check_array(OP, "x", x, ndim_min=2)
    quantized = scales is not None
    if quantized:
        if mode not in QUANT_MODES:
            raise ValueError(f"[{OP}] mode must be one of {QUANT_MODES} but got {mode!r}.")
        if not isinstance(weight, mx.array) or weight.ndim != 3 or weight.dtype != mx.uint32:
            raise ValueError(f"[{OP}] weight must be a 3-D uint32 array from mx.quantize but "
                             f"got {getattr(weight, 'dtype', type(weight).__name__)} of shape "
                             f"{tuple(getattr(weight, 'shape', ()))}.")
        experts, out_dims = weight.shape[:2]
        in_dims = weight.shape[2] * 32 // bits
    else:
        check_array(OP, "weight", weight, ndim=3)
        experts, out_dims, in_dims = weight.shape
    if x.shape[-1] != in_dims:
        raise ValueError(f"[{OP}] x must have last dimension {in_dims} (weight is "
                         f"{tuple(weight.shape)}) but got shape {tuple(x.shape)}.")
    check_array(OP, "lora_a", lora_a, ndim=3)
    r = lora_a.shape[1]
    check_shape(OP, "lora_a", lora_a, (experts, r, in_dims))
    check_array(OP, "lora_b", lora_b, ndim=3)
    check_shape(OP, "lora_b", lora_b, (experts, out_dims, r))
    check_array(OP, "indices", indices, float_only=False)
    if not mx.issubdtype(indices.dtype, mx.integer):
        raise ValueError(f"[{OP}] indices must be an integer array but got "
                         f"{str(indices.dtype).replace('mlx.core.', '')}.")
    try:
        mx.broadcast_shapes(tuple(x.shape[:-2]), tuple(indices.shape))
    except ValueError:
        raise ValueError(f"[{OP}] indices must broadcast with x's batch dimensions "
                         f"{tuple(x.shape[:-2])} but got shape {tuple(indices.shape)}.") from None
    check_scalar(OP, "scale", scale)
    if bias is not None:
        check_array(OP, "bias", bias, ndim=2)
        check_shape(OP, "bias", bias, (experts, out_dims))
    if x_dropped is not None:
        check_array(OP, "x_dropped", x_dropped)
        check_shape(OP, "x_dropped", x_dropped, tuple(x.shape))


def lora_switch_linear_reference(x, weight, lora_a, lora_b, indices, scale, bias=None, *,
                                 sorted_indices=False, x_dropped=None, scales=None,
                                 biases=None, group_size=64, bits=4, mode="affine"):
    """What mlx-lm's LoRASwitchLinear over a (Quantized)SwitchLinear computes."""
    _check(x, weight, lora_a, lora_b, indices, scale, bias, x_dropped, scales, biases,
           group_size, bits, mode)
    if scales is not None:
        y = mx.gather_qmm(x, weight, scales, biases, rhs_indices=indices, transpose=True,
                          group_size=group_size, bits=bits, mode=mode,
                          sorted_indices=sorted_indices)
    else:
        y = mx.gather_mm(x, weight.swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
    if bias is not None:
        y = y + mx.expand_dims(bias[indices], -2)
    xd = x if x_dropped is None else x_dropped
    z = mx.gather_mm(xd, lora_a.swapaxes(-1, -2), rhs_indices=indices,
                     sorted_indices=sorted_indices)
    z = mx.gather_mm(z, lora_b.swapaxes(-1, -2), rhs_indices=indices,
                     sorted_indices=sorted_indices)
    return y + (scale * z).astype(x.dtype)


def lora_switch_linear(x, weight, lora_a, lora_b, indices, scale, bias=None, *,
                       sorted_indices=False, x_dropped=None, scales=None, biases=None,
                       group_size=64, bits=4, mode="affine", stream=None):
    """Fused LoRA switch layer (falls back to ``lora_switch_linear_reference`` without a
    kernel: on GPUs, and for quantized bases other than affine at ``FUSED_BITS`` x
    ``FUSED_GROUP_SIZES``).

    On the CPU one primitive groups the (token, slot) pairs by expert and runs per-expert
    BLAS GEMMs (saving x_d A^T for the backward); its vjp is a second fused primitive that
    computes only the gradients asked for. ``sorted_indices`` is only a hint there. An
    affine-quantized base is dequantized a panel of W_e's rows at a time and gets no
    gradient (asking for one raises).
    """
    _check(x, weight, lora_a, lora_b, indices, scale, bias, x_dropped, scales, biases,
           group_size, bits, mode)
    fusable = scales is None or (mode == "affine" and biases is not None
                                 and bits in FUSED_BITS and group_size in FUSED_GROUP_SIZES)
    ext = _extension.kernel_for("lora_switch", stream) if fusable else None
    if ext is None:  # (the CPU kernel takes an empty batch too)
        return lora_switch_linear_reference(
            x, weight, lora_a, lora_b, indices, scale, bias, sorted_indices=sorted_indices,
            x_dropped=x_dropped, scales=scales, biases=biases, group_size=group_size,
            bits=bits, mode=mode)
    return ext.lora_switch_linear(x, weight, lora_a, lora_b, indices,
                                  check_scalar(OP, "scale", scale), bias, x_dropped,
                                  scales=scales, biases=biases, group_size=group_size,
                                  bits=bits, stream=stream)
