"""SwiGLU, ``silu(gate) * up``, with a backward that keeps only its two inputs.

MLX's autograd of ``silu(gate) * up`` (mlx-lm's ``activations.swiglu``) keeps
``sigmoid(gate)`` and ``silu(gate)`` for the backward besides ``gate`` and ``up``: two more
(tokens, intermediate) arrays in every MLP of a training step, 48 MiB a layer at the
Qwen3-0.6B shape and 4 x 1024 tokens in bf16, 1.3 GB over its 28 layers. ``swiglu`` has
the same forward (the same MLX ops, so the same values) and a backward that recomputes
the sigmoid from ``gate``, in float32. On the CPU (Qwen3 layers, 512 tokens, bf16, rank-8
LoRA, compiled step) a layer's kept memory went from 43.5 to 34.0 MiB, a Llama layer's
from 3.47 to 2.47 MiB; eagerly in float32 the gain is the same. Not everywhere: under
mx.compile in float32 MLX's fusion already recomputes the two (equal memory), and a toy
bf16 MLP without LoRA kept more under mx.compile (65.8 against 47.2 MB over 4 blocks).

On the H200 (BENCHMARKS.md) the saving did not stand out from the run-to-run spread of a
LoRA step's device peak, and it cost speed (QLoRA about 20% of its tokens/s), while a
QLoRA step's peak did fall by 1.5 GB: so it stays opt-in.

``lean_swiglu(model)`` puts it in place of mlx-lm's ``swiglu`` in the modules that define
the model's layers for as long as the context lasts. mlx-tuner's ``train`` does so when
``MLX_TUNER_LEAN_SWIGLU=1``.
mlx-lm's models call the function through their module's global name, so that global is
what is swapped, and put back after.
"""

from __future__ import annotations

import contextlib
import os
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import activations as mlx_lm_activations


@partial(mx.compile, shapeless=True)
def swiglu_reference(gate: mx.array, up: mx.array) -> mx.array:
    """mlx-lm's ``swiglu`` (compiled the same way): ``silu(gate) * up``, differentiated by
    MLX's autograd. Also ``swiglu``'s forward."""
    return nn.silu(gate) * up


@partial(mx.compile, shapeless=True)
def _backward(gate, up, cotangent):
    s = mx.sigmoid(gate.astype(mx.float32))  # the products promote to float32 with it
    d_up = cotangent * (gate * s)
    d_gate = cotangent * up * (s * (1 + gate * (1 - s)))  # d silu / d gate
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


@mx.custom_function
def _swiglu(gate, up):
    return swiglu_reference(gate, up)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    return _backward(*primals, cotangent)


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    """``silu(gate) * up`` whose backward keeps only ``gate`` and ``up`` (module doc).
    Arrays of different shapes (broadcasting) take ``swiglu_reference``."""
    for name, a in (("gate", gate), ("up", up)):
        if not isinstance(a, mx.array):
            raise TypeError(f"[swiglu] {name} must be an mx.array but got {type(a).__name__}.")
    if gate.shape != up.shape:
        return swiglu_reference(gate, up)
    return _swiglu(gate, up)


@contextlib.contextmanager
def lean_swiglu(model, enabled: bool | None = None):
    """Within the context, the modules that define ``model``'s layers call ``swiglu``
    where they called mlx-lm's ``swiglu`` (same values, less memory in the backward).
    ``enabled=None`` reads MLX_TUNER_LEAN_SWIGLU (default off: "1" turns it on)."""
    if enabled is None:
        enabled = os.environ.get("MLX_TUNER_LEAN_SWIGLU", "0") == "1"
    theirs = mlx_lm_activations.swiglu
    patched = []
    if enabled:
        names = {type(m).__module__ for m in model.modules()}
        for name in sorted(names):
            mod = sys.modules.get(name)
            if mod is not None and getattr(mod, "swiglu", None) is theirs:
                mod.swiglu = swiglu
                patched.append(mod)
    try:
        yield patched
    finally:
        for mod in patched:
            mod.swiglu = theirs
