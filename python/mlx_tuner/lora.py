"""LoRA adapter layers, the same API as ``mlx_lm.tuner.lora`` over fused ops.

y = base(x) + scale * (dropout(x) A) B with A (in, r) and B (r, out) (for embeddings,
A (vocab, r) and B (r, dims)). The dense and quantized linear paths call
``ops.lora_linear`` / ``ops.qlora_linear``; parameter names and shapes match mlx-lm's so
adapter files interchange.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import ops


def dropped(dropout: nn.Module, x: mx.array) -> mx.array | None:
    """The dropped-out input for an op's ``x_dropped``, or None when dropout is a no-op.

    nn.Dropout returns its input itself when p == 0 or in eval mode, so identity tells us
    (and works for any dropout-like module a user swaps in).
    """
    xd = dropout(x)
    return None if xd is x else xd


def quantization_of(module: nn.Module) -> dict:
    """The keyword arguments of mx.quantize / mx.dequantize that rebuild ``module``."""
    return {"group_size": module.group_size, "bits": module.bits, "mode": module.mode}


def dequantized_weight(module: nn.Module) -> mx.array:
    """The weight of a (possibly quantized) linear, embedding or switch layer, dense."""
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
        return mx.dequantize(module.weight, module.scales, getattr(module, "biases", None),
                             **quantization_of(module))
    return module.weight


def _runs_as(base: nn.Module, cls, method: str) -> bool:
    """``base`` is a ``cls`` whose ``method`` is cls's own (so its weight layout says all)."""
    return isinstance(base, cls) and getattr(type(base), method) is getattr(cls, method)


def linear_call(x, base, lora_a, lora_b, scale, x_dropped, method="__call__"):
    """base.<method>(x) + scale * (x_dropped A) B through the fused op for the base layer."""
    bias = base.get("bias")
    if _runs_as(base, nn.QuantizedLinear, method) or _runs_as(base, nn.QuantizedEmbedding, method):
        return ops.qlora_linear(x, base.weight, base.scales, getattr(base, "biases", None),
                                lora_a, lora_b, scale, bias, x_dropped=x_dropped,
                                **quantization_of(base))
    if _runs_as(base, nn.Linear, method) or _runs_as(base, nn.Embedding, method):
        return ops.lora_linear(x, base.weight, lora_a, lora_b, scale, bias, x_dropped=x_dropped)
    # A layer whose forward we do not know (a subclass overriding it, or a linear-like
    # module): keep its own forward and add the update.
    xd = x if x_dropped is None else x_dropped
    y = getattr(base, method)(x)
    return y + (scale * ((xd @ lora_a) @ lora_b)).astype(x.dtype)


def switch_weight_kwargs(base: nn.Module) -> dict:
    """ops.lora_switch_linear's keyword arguments for a switch layer's weight: none for a
    SwitchLinear; scales, biases and the quantization of a QuantizedSwitchLinear."""
    if isinstance(base, QuantizedSwitchLinear):
        return {"scales": base.scales, "biases": base.get("biases"), **quantization_of(base)}
    return {}


def switch_call(x, indices, base, lora_a, lora_b, scale, x_dropped, sorted_indices=False):
    """base(x, indices) + scale * the per-expert low-rank update, through the fused op."""
    bias = base.get("bias")
    if _runs_as(base, SwitchLinear, "__call__"):
        return ops.lora_switch_linear(x, base.weight, lora_a, lora_b, indices, scale, bias,
                                      sorted_indices=sorted_indices, x_dropped=x_dropped)
    if (_runs_as(base, QuantizedSwitchLinear, "__call__")
            and getattr(base, "global_scale", None) is None):
        return ops.lora_switch_linear(x, base.weight, lora_a, lora_b, indices, scale, bias,
                                      sorted_indices=sorted_indices, x_dropped=x_dropped,
                                      **switch_weight_kwargs(base))
    # A switch layer whose forward we do not know: keep it and add the update.
    xd = x if x_dropped is None else x_dropped
    y = base(x, indices, sorted_indices=sorted_indices)
    z = mx.gather_mm(xd, lora_a.swapaxes(-1, -2), rhs_indices=indices,
                     sorted_indices=sorted_indices)
    z = mx.gather_mm(z, lora_b.swapaxes(-1, -2), rhs_indices=indices,
                     sorted_indices=sorted_indices)
    return y + (scale * z).astype(x.dtype)


def fused_switch(base: nn.Module, weight: mx.array, dequantize: bool) -> nn.Module:
    """A SwitchLinear holding ``weight`` (experts, out, in) and ``base``'s bias,
    re-quantized like ``base`` unless ``dequantize``: a switch adapter's ``fuse``."""
    experts, out_dims, in_dims = weight.shape
    has_bias = "bias" in base
    fused = SwitchLinear(in_dims, out_dims, experts, bias=has_bias)
    fused.weight = weight
    if has_bias:
        fused.bias = base.bias
    if isinstance(base, QuantizedSwitchLinear) and not dequantize:
        fused = fused.to_quantized(**quantization_of(base))
    return fused


def _uniform_init(fan_in: int, shape: tuple) -> mx.array:
    bound = 1 / math.sqrt(fan_in)
    return mx.random.uniform(low=-bound, high=bound, shape=shape)


def _input_dims(linear: nn.Module) -> int:
    in_dims = linear.weight.shape[-1]
    if isinstance(linear, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear)):
        in_dims = in_dims * 32 // linear.bits
    return in_dims


class LoRALinear(nn.Module):
    """A linear layer (dense or quantized) with a low-rank update."""

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        out_dims = linear.weight.shape[0]
        layer = LoRALinear(_input_dims(linear), out_dims, r=r, dropout=dropout, scale=scale)
        layer.linear = linear
        return layer

    def __init__(self, input_dims: int, output_dims: int, r: int = 8, dropout: float = 0.0,
                 scale: float = 20.0, bias: bool = False):
        super().__init__()
        self.linear = nn.Linear(input_dims, output_dims, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = _uniform_init(input_dims, (input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    def __call__(self, x):
        return linear_call(x, self.linear, self.lora_a, self.lora_b, self.scale,
                           dropped(self.dropout, x))

    def fuse(self, dequantize: bool = False):
        """The base layer with the update folded in; re-quantized unless ``dequantize``."""
        base = self.linear
        weight = dequantized_weight(base)
        out_dims, in_dims = weight.shape
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        delta = (self.scale * self.lora_b.T) @ self.lora_a.T
        fused.weight = weight + delta.astype(weight.dtype)
        if has_bias:
            fused.bias = base.bias
        if isinstance(base, nn.QuantizedLinear) and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, **quantization_of(base))
        return fused


class LoRASwitchLinear(nn.Module):
    """LoRA over a mixture-of-experts switch layer: one (A, B) pair per expert.

    Calls ``ops.lora_switch_linear`` (dense or affine-quantized base).
    lora_a is (experts, r, in) and lora_b (experts, out, r), mlx-lm's layout.
    """

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        layer = LoRASwitchLinear(linear.input_dims, linear.output_dims, linear.num_experts,
                                 r=r, dropout=dropout, scale=scale)
        layer.linear = linear
        return layer

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, r: int = 8,
                 dropout: float = 0.0, scale: float = 20.0, bias: bool = False):
        super().__init__()
        self.linear = SwitchLinear(input_dims, output_dims, num_experts, bias=bias)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = _uniform_init(input_dims, (num_experts, r, input_dims))
        self.lora_b = mx.zeros((num_experts, output_dims, r))
        self.num_experts = num_experts

    def __call__(self, x, indices, sorted_indices=False):
        return switch_call(x, indices, self.linear, self.lora_a, self.lora_b, self.scale,
                           dropped(self.dropout, x), sorted_indices)

    def fuse(self, dequantize: bool = False):
        weight = dequantized_weight(self.linear)
        delta = (self.scale * self.lora_b) @ self.lora_a  # (experts, out, in)
        return fused_switch(self.linear, weight + delta.astype(weight.dtype), dequantize)


class LoRAEmbedding(nn.Module):
    """An embedding (dense or quantized) with a low-rank update of its table.

    ``as_linear`` (tied output projection) runs the fused linear op with the table as the
    weight and (B^T, A^T) as the low-rank pair.
    """

    @staticmethod
    def from_base(embedding: nn.Module, r: int = 8, dropout: float = 0.0,
                  scale: float = 20.0):
        num_embeddings = embedding.weight.shape[0]
        layer = LoRAEmbedding(num_embeddings, _input_dims(embedding), r=r, dropout=dropout,
                              scale=scale)
        layer.embedding = embedding
        return layer

    def __init__(self, num_embeddings: int, dims: int, r: int = 8, dropout: float = 0.0,
                 scale: float = 20.0):
        super().__init__()
        self.embedding = nn.Embedding(num_embeddings, dims)
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = _uniform_init(num_embeddings, (num_embeddings, r))
        self.lora_b = mx.zeros((r, dims))

    def __call__(self, x):
        # A row gather and an (r, dims) product: nothing here worth a fused op.
        y = self.embedding(x)
        z = self.dropout(self.lora_a[x] @ self.lora_b)
        return y + (self.scale * z).astype(y.dtype)

    def as_linear(self, x):
        return linear_call(x, self.embedding, self.lora_b.T, self.lora_a.T, self.scale,
                           dropped(self.dropout, x), method="as_linear")

    def fuse(self, dequantize: bool = False):
        base = self.embedding
        weight = dequantized_weight(base)
        num_embeddings, dims = weight.shape
        fused = nn.Embedding(num_embeddings, dims)
        delta = (self.scale * self.lora_a) @ self.lora_b
        fused.weight = weight + delta.astype(weight.dtype)
        if isinstance(base, nn.QuantizedEmbedding) and not dequantize:
            fused = nn.QuantizedEmbedding.from_embedding(fused, **quantization_of(base))
        return fused
