"""DoRA adapter layers, the same API as ``mlx_lm.tuner.dora`` over the fused op.

y = (m / ||W + s (A B)^T||_rows) * (x W^T + s (dropout(x) A) B) + bias, the row norms a
constant in the backward (mlx-lm's choice). ``m`` starts as the row norms of the base
weight, so a fresh layer equals its base. Beyond mlx-lm: quantized embeddings, and DoRA
over mixture-of-experts switch layers (``DoRASwitchLinear``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from . import ops
from .lora import (
    _input_dims,
    _uniform_init,
    dequantized_weight,
    dropped,
    fused_switch,
    quantization_of,
    switch_weight_kwargs,
)


def _dora_call(x, base, lora_a, lora_b, m, scale, x_dropped, bias=None, weight_sq_norm=None):
    """ops.dora_linear with the base (dense or quantized) unpacked into its arguments."""
    kwargs = {"x_dropped": x_dropped}
    if isinstance(base, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        kwargs.update(scales=base.scales, biases=getattr(base, "biases", None),
                      **quantization_of(base))
    if weight_sq_norm is not None:
        kwargs["weight_sq_norm"] = weight_sq_norm
    return ops.dora_linear(x, base.weight, lora_a, lora_b, m, scale, bias, **kwargs)


def _fold(weight, delta, m):
    """(W + delta) rescaled so that row i has norm m_i: the fused DoRA weight."""
    adapted = weight + delta.astype(weight.dtype)
    return (m / mx.linalg.norm(adapted, axis=1))[:, None] * adapted


class DoRALinear(nn.Module):
    """A linear layer (dense or quantized) with a weight-decomposed low-rank update."""

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        out_dims = linear.weight.shape[0]
        layer = DoRALinear(_input_dims(linear), out_dims, r=r, dropout=dropout, scale=scale)
        layer.set_linear(linear)
        return layer

    def __init__(self, input_dims: int, output_dims: int, r: int = 8, dropout: float = 0.0,
                 scale: float = 20.0, bias: bool = False):
        super().__init__()
        self.set_linear(nn.Linear(input_dims, output_dims, bias=bias))
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = _uniform_init(input_dims, (input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    def set_linear(self, linear: nn.Module):
        """Set the base layer and reset ``m`` to its row norms."""
        self.linear = linear
        self.m = mx.linalg.norm(self._dequantized_weight().astype(mx.float32), axis=1)
        # (weight, ||W_i||^2) cached outside the parameter tree, keyed by the weight array.
        object.__setattr__(self, "_sq_norm_cache", None)

    def _dequantized_weight(self):
        return dequantized_weight(self.linear)

    def _is_quantized(self):
        return isinstance(self.linear, nn.QuantizedLinear)

    def _weight_sq_norm(self):
        """||W_i||^2 in float32, recomputed only when the base weight array changes."""
        weight = self.linear.weight
        cache = self._sq_norm_cache
        if cache is None or cache[0] is not weight:
            w = self._dequantized_weight().astype(mx.float32)
            cache = (weight, mx.stop_gradient(mx.sum(w * w, axis=1)))
            object.__setattr__(self, "_sq_norm_cache", cache)
        return cache[1]

    def __call__(self, x):
        return _dora_call(x, self.linear, self.lora_a, self.lora_b, self.m, self.scale,
                          dropped(self.dropout, x), self.linear.get("bias"),
                          self._weight_sq_norm())

    def fuse(self, dequantize: bool = False):
        base = self.linear
        weight = self._dequantized_weight()
        out_dims, in_dims = weight.shape
        has_bias = "bias" in base
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = _fold(weight, (self.scale * self.lora_b.T) @ self.lora_a.T, self.m)
        if has_bias:
            fused.bias = base.bias
        if self._is_quantized() and not dequantize:
            fused = nn.QuantizedLinear.from_linear(fused, **quantization_of(base))
        return fused


class DoRAEmbedding(nn.Module):
    """An embedding (dense or quantized) with a weight-decomposed low-rank update."""

    @staticmethod
    def from_base(embedding: nn.Module, r: int = 8, dropout: float = 0.0,
                  scale: float = 20.0):
        num_embeddings = embedding.weight.shape[0]
        layer = DoRAEmbedding(num_embeddings, _input_dims(embedding), r=r, dropout=dropout,
                              scale=scale)
        layer.set_embedding(embedding)
        return layer

    def __init__(self, num_embeddings: int, dims: int, r: int = 8, dropout: float = 0.0,
                 scale: float = 20.0):
        super().__init__()
        self.set_embedding(nn.Embedding(num_embeddings, dims))
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = _uniform_init(num_embeddings, (num_embeddings, r))
        self.lora_b = mx.zeros((r, dims))

    def set_embedding(self, embedding: nn.Module):
        """Set the base embedding and reset ``m`` to the norms of its rows."""
        self.embedding = embedding
        self.m = mx.linalg.norm(dequantized_weight(embedding), axis=1)

    def __call__(self, x):
        # Per-token rows only: the norm of each looked-up adapted row, no op needed.
        y = self.embedding(x)
        z = self.scale * self.lora_a[x] @ self.lora_b
        out = y + self.dropout(z).astype(y.dtype)
        denom = mx.stop_gradient(mx.linalg.norm(y + z, axis=-1))
        return (self.m[x] / denom)[..., None] * out

    def as_linear(self, x):
        # The table is the weight (vocab, dims); (B^T, A^T) the low-rank pair.
        return _dora_call(x, self.embedding, self.lora_b.T, self.lora_a.T, self.m, self.scale,
                          dropped(self.dropout, x))

    def fuse(self, dequantize: bool = False):
        base = self.embedding
        weight = dequantized_weight(base)
        num_embeddings, dims = weight.shape
        fused = nn.Embedding(num_embeddings, dims)
        fused.weight = _fold(weight, (self.scale * self.lora_a) @ self.lora_b, self.m)
        if isinstance(base, nn.QuantizedEmbedding) and not dequantize:
            fused = nn.QuantizedEmbedding.from_embedding(fused, **quantization_of(base))
        return fused


class DoRASwitchLinear(nn.Module):
    """DoRA over a mixture-of-experts switch layer (dense or quantized): per expert e,
    y = (m_e / ||W_e + s B_e A_e||_rows) * (x W_e^T + s (dropout(x) A_e^T) B_e^T) + bias_e.

    mlx-lm has no such layer. Its parameters extend ``LoRASwitchLinear``'s (lora_a
    (experts, r, in), lora_b (experts, out, r)) with m (experts, out), the norms of the
    base experts' rows at the start. The low-rank term goes through the fused
    ``ops.lora_switch_linear``; the norms come from the low-rank identity
    ||W_i + s (B A)_i||^2 = ||W_i||^2 + 2 s B_i . P_i + s^2 B_i G B_i^T with P = W A^T
    (experts x out x r, a quantized product for a quantized base) and G = A A^T, in
    float32 and treated as constants in the backward (as DoRALinear's): no
    experts x out x in array is built.

    W A^T goes through the switch kernel's BLAS where it runs (the CPU; see ``_w_at``):
    MLX's batched matmul runs MLX's reference BLAS on a Linux CPU, where it took 205 of
    256 ms of a forward+backward (32 experts of 2048 -> 768, r 8, 2048 token-slots, 2
    cores); through the kernel W A^T takes 21 ms and the step 94 ms against the LoRA
    switch layer's 53 ms in the same run (bench/probe_dora_switch.py).
    """

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0):
        layer = DoRASwitchLinear(linear.input_dims, linear.output_dims, linear.num_experts,
                                 r=r, dropout=dropout, scale=scale)
        layer.set_linear(linear)
        return layer

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, r: int = 8,
                 dropout: float = 0.0, scale: float = 20.0, bias: bool = False):
        super().__init__()
        self.set_linear(SwitchLinear(input_dims, output_dims, num_experts, bias=bias))
        self.dropout = nn.Dropout(p=dropout)
        self.scale = scale
        self.lora_a = _uniform_init(input_dims, (num_experts, r, input_dims))
        self.lora_b = mx.zeros((num_experts, output_dims, r))
        self.num_experts = num_experts

    def set_linear(self, linear: nn.Module):
        """Set the base switch layer and reset ``m`` to its experts' row norms."""
        if not isinstance(linear, (SwitchLinear, QuantizedSwitchLinear)):
            raise TypeError("DoRASwitchLinear: linear must be a SwitchLinear or "
                            f"QuantizedSwitchLinear, got {type(linear).__name__}")
        if getattr(linear, "global_scale", None) is not None:
            # The fused op and the norms read scales and biases only: they would drop it.
            raise ValueError("DoRASwitchLinear: experts quantized with a global scale "
                             f"(mode {linear.mode!r}) are not supported; use LoRA there")
        self.linear = linear
        sq = self._expert_sq_norms(linear)
        self.m = mx.sqrt(sq)
        # (weight, ||W_e,i||^2) cached outside the parameter tree, keyed by the weight array.
        object.__setattr__(self, "_sq_norm_cache", (linear.weight, sq))

    @staticmethod
    def _expert_sq_norms(linear):
        """||W_e,i||^2 in float32, (experts, out): ops.dora_weight_sq_norm one expert at a
        time, so that no dequantized or float32 copy of every expert at once is made."""
        quant = isinstance(linear, QuantizedSwitchLinear)
        rows = []
        for e in range(linear.weight.shape[0]):
            if quant:
                biases = linear.get("biases")
                rows.append(ops.dora_weight_sq_norm(
                    linear.weight[e], linear.scales[e], None if biases is None else biases[e],
                    **quantization_of(linear)))
            else:
                rows.append(ops.dora_weight_sq_norm(linear.weight[e]))
        return mx.stop_gradient(mx.stack(rows))

    def _sq_norms(self):
        """The cached ||W_e,i||^2, recomputed only when the base weight array changes."""
        weight = self.linear.weight
        cache = self._sq_norm_cache
        if cache[0] is not weight:
            cache = (weight, self._expert_sq_norms(self.linear))
            object.__setattr__(self, "_sq_norm_cache", cache)
        return cache[1]

    def _w_at(self, a):
        """P = W_e A_e^T for every expert, (experts, out, r), in float32 (a constant).

        Where the switch kernel runs (the CPU), as a switch layer over the E * r rows of A
        (row k of A_e routed to expert e) with a zero adapter, so that its per-expert GEMMs
        go through the BLAS (see the class docstring). Elsewhere MLX's batched (quantized)
        matmul, as fast as the GPU makes it."""
        base = self.linear
        quant = isinstance(base, QuantizedSwitchLinear)
        dt = base.scales.dtype if quant else base.weight.dtype
        e, r, d = a.shape
        if ops._extension.kernel_for("lora_switch") is not None:
            rows = a.astype(dt).reshape(e * r, 1, d)
            idx = mx.repeat(mx.arange(e, dtype=mx.uint32), r)
            zero_a, zero_b = mx.zeros((e, 1, d), dt), mx.zeros((e, base.output_dims, 1), dt)
            pt = ops.lora_switch_linear(rows, base.weight, zero_a, zero_b, idx, 0.0,
                                        **switch_weight_kwargs(base))
            return pt.reshape(e, r, -1).swapaxes(-1, -2).astype(mx.float32)
        if quant:
            pt = mx.quantized_matmul(a.astype(dt), base.weight, base.scales, base.get("biases"),
                                     transpose=True, **quantization_of(base))  # (E, r, out)
            return pt.swapaxes(-1, -2).astype(mx.float32)
        return (base.weight @ a.astype(dt).swapaxes(-1, -2)).astype(mx.float32)

    def _inv_norm(self):
        """1 / ||W_e + s B_e A_e||_rows, (experts, out), float32, a constant."""
        s = self.scale
        a = mx.stop_gradient(self.lora_a).astype(mx.float32)  # (E, r, in)
        b = mx.stop_gradient(self.lora_b).astype(mx.float32)  # (E, out, r)
        p = self._w_at(a)  # (E, out, r)
        g = a @ a.swapaxes(-1, -2)  # (E, r, r)
        cross = mx.sum(b * p, axis=-1)
        quad = mx.sum((b @ g) * b, axis=-1)
        n2 = self._sq_norms() + 2 * s * cross + s * s * quad
        return mx.stop_gradient(mx.rsqrt(mx.maximum(n2, 1e-30)))

    def __call__(self, x, indices, sorted_indices=False):
        base = self.linear
        z = ops.lora_switch_linear(x, base.weight, self.lora_a, self.lora_b, indices,
                                   self.scale, None, sorted_indices=sorted_indices,
                                   x_dropped=dropped(self.dropout, x),
                                   **switch_weight_kwargs(base))
        # m / n per (token, slot): z is (..., slots, 1, out), as gather_mm lays it out
        sv = (self.m.astype(mx.float32) * self._inv_norm())[indices]
        y = mx.expand_dims(sv, -2).astype(z.dtype) * z
        if "bias" in base:
            y = y + mx.expand_dims(base.bias[indices], -2)
        return y

    def fuse(self, dequantize: bool = False):
        weight = dequantized_weight(self.linear)
        adapted = weight + ((self.scale * self.lora_b) @ self.lora_a).astype(weight.dtype)
        norm = mx.linalg.norm(adapted.astype(mx.float32), axis=-1)
        folded = ((self.m / norm)[..., None] * adapted).astype(weight.dtype)
        return fused_switch(self.linear, folded, dequantize)
