"""Tuner utilities, the same API as ``mlx_lm.tuner.utils``: schedules, converting a
model's layers to adapters, loading adapter files (checked), removing adapters, and
gradient checkpointing as a module wrapper (mlx-lm patches the layer's class instead)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as opt
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

from .dora import DoRAEmbedding, DoRALinear, DoRASwitchLinear
from .lora import LoRAEmbedding, LoRALinear, LoRASwitchLinear

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")
_LINEAR = (nn.Linear, nn.QuantizedLinear)
_SWITCH = (SwitchLinear, QuantizedSwitchLinear)
_EMBEDDING = (nn.Embedding, nn.QuantizedEmbedding)


def build_schedule(schedule_config: dict):
    """A learning-rate schedule from ``{"name", "arguments", "warmup"?, "warmup_init"?}``.

    ``name`` is a function of ``mlx.optimizers.schedulers`` called with ``arguments``;
    with ``warmup`` steps, a linear ramp from ``warmup_init`` to the first argument
    comes first.
    """
    schedule = getattr(opt.schedulers, schedule_config["name"])(*schedule_config["arguments"])
    warmup = schedule_config.get("warmup", 0)
    if not warmup:
        return schedule
    peak = schedule_config["arguments"][0]
    ramp = opt.schedulers.linear_schedule(schedule_config.get("warmup_init", 0.0), peak, warmup)
    return opt.schedulers.join_schedules([ramp, schedule], [warmup + 1])


def _adapter_class(layer: nn.Module, use_dora: bool):
    if isinstance(layer, _LINEAR):
        return DoRALinear if use_dora else LoRALinear
    if isinstance(layer, _SWITCH):  # DoRA here is mlx-tuner's own (mlx-lm refuses it)
        return DoRASwitchLinear if use_dora else LoRASwitchLinear
    if isinstance(layer, _EMBEDDING):
        return DoRAEmbedding if use_dora else LoRAEmbedding
    raise ValueError(f"Can't convert layer of type {type(layer).__name__} to LoRA")


def linear_to_lora_layers(model: nn.Module, num_layers: int, config: dict,
                          use_dora: bool = False):
    """Replace linear/embedding/switch layers of the last ``num_layers`` blocks (all of
    them when ``num_layers`` <= 0) by LoRA (or DoRA) layers, in place.

    ``config``: ``rank``, ``scale``, ``dropout`` and optionally ``keys``, the module paths
    inside a block (and, at the top level, inside the model) to convert; by default every
    convertible module of the blocks.
    """
    if "scale" not in config:
        hint = (" Found 'alpha': this config format (mlx-lm's) uses 'scale' instead."
                if "alpha" in config else "")
        raise KeyError(f"LoRA config is missing required key 'scale'.{hint}")
    blocks = model.layers
    if num_layers > len(blocks):
        raise ValueError(
            f"num_layers is {num_layers} but the model has only {len(blocks)} layers; "
            f"use at most {len(blocks)} (or -1 for all)."
        )
    kw = {"r": config["rank"], "scale": config["scale"], "dropout": config.get("dropout", 0.0)}

    def convert(layer):
        if not use_dora and hasattr(layer, "to_lora"):
            return layer.to_lora(**kw)
        return _adapter_class(layer, use_dora).from_base(layer, **kw)

    keys = config.get("keys")
    if keys is None:
        kinds = _LINEAR + _SWITCH + _EMBEDDING
        keys = {name for block in blocks for name, m in block.named_modules()
                if hasattr(m, "to_lora") or isinstance(m, kinds)}
    keys = set(keys)

    for block in blocks[-max(num_layers, 0):]:
        new = [(k, convert(m)) for k, m in block.named_modules() if k in keys]
        if new:
            block.update_modules(tree_unflatten(new))
    new = [(k, convert(m)) for k, m in model.named_modules() if k in keys]
    if new:
        model.update_modules(tree_unflatten(new))


def _check_adapter_weights(weights: dict, params: dict, full: bool, where) -> None:
    """Every tensor must name a parameter of the same shape and, for LoRA/DoRA, every
    adapter parameter must be present: no silent partial load."""
    allowed = params if full else {
        k: v for k, v in params.items() if k.rsplit(".", 1)[-1] in ADAPTER_LEAVES}
    errors = []
    for name in sorted(weights):
        if name not in allowed:
            errors.append(f"  {name}: not an adapter parameter of the model")
        elif tuple(weights[name].shape) != tuple(allowed[name].shape):
            errors.append(f"  {name}: shape {tuple(weights[name].shape)} in the file but "
                          f"{tuple(allowed[name].shape)} in the model")
    if not full:
        errors += [f"  {name}: in the model but missing from the file"
                   for name in sorted(set(allowed) - set(weights))]
    if errors:
        raise ValueError(f"Adapters at {where} do not match the model:\n" + "\n".join(errors))


def load_adapters(model: nn.Module, adapter_path: str) -> nn.Module:
    """Convert ``model`` as ``adapter_config.json`` says and load ``adapters.safetensors``.

    Raises FileNotFoundError for a missing path and ValueError, listing every offending
    name, when the file's tensors and the model's adapter parameters differ in names or
    shapes.
    """
    path = Path(adapter_path)
    if not path.exists():
        raise FileNotFoundError(f"The adapter path does not exist: {path}")
    with open(path / "adapter_config.json") as f:
        config = types.SimpleNamespace(**json.load(f))
    kind = getattr(config, "fine_tune_type", "lora")
    if kind not in ("lora", "dora", "full"):
        raise ValueError(f"fine_tune_type must be 'lora', 'dora' or 'full' but got {kind!r}.")
    if kind != "full":
        linear_to_lora_layers(model, config.num_layers, config.lora_parameters,
                              use_dora=kind == "dora")
    weights = mx.load(str(path / "adapters.safetensors"))
    _check_adapter_weights(weights, dict(tree_flatten(model.parameters())), kind == "full",
                           path)
    model.load_weights(list(weights.items()), strict=False)
    return model


def remove_lora_layers(model: nn.Module) -> nn.Module:
    """Put every adapter layer's base layer back in its place (the update is dropped)."""
    from mlx_lm.tuner import dora as mlx_dora, lora as mlx_lora

    wrapped = (LoRALinear, LoRASwitchLinear, DoRALinear, DoRASwitchLinear, mlx_lora.LoRALinear,
               mlx_lora.LoRASwitchLinear, mlx_dora.DoRALinear)
    tables = (LoRAEmbedding, DoRAEmbedding, mlx_lora.LoRAEmbedding, mlx_dora.DoRAEmbedding)
    bases = [(name, m.linear if isinstance(m, wrapped) else m.embedding)
             for name, m in model.named_modules() if isinstance(m, wrapped + tables)]
    if bases:
        model.update_modules(tree_unflatten(bases))
    return model


def print_trainable_parameters(model: nn.Module) -> None:
    from mlx_lm.utils import get_total_parameters  # counts quantized weights unpacked

    total = get_total_parameters(model) / 1e6
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters())) / 1e6
    if mx.distributed.init().rank() != 0:  # one line per job, not per worker
        return
    print(f"Trainable parameters: {trainable * 100 / total:.3f}% "
          f"({trainable:.3f}M/{total:.3f}M)")


class CheckpointedLayer(nn.Module):
    """Runs ``layer`` under mx.checkpoint: its activations are recomputed in the backward.

    The wrapper holds the layer's children and arrays under the same keys (shared, not
    copied), so the parameter tree and its paths are those of the unwrapped model and
    adapter files keep mlx-lm's names. The wrapper's dict is the source of truth: it is
    pushed into the layer at every call. Other attributes are read from the layer.
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "_wrapped", layer)
        for key, value in layer.items():
            self[key] = value
        self._no_grad = set(layer._no_grad)
        self._training = layer.training

    @property
    def layer(self) -> nn.Module:
        """The wrapped layer, in sync with the wrapper."""
        self._sync()
        return self._wrapped

    def __getattr__(self, key):
        if key in self:
            return self[key]
        wrapped = self.__dict__.get("_wrapped")
        if wrapped is None:
            raise AttributeError(key)
        return getattr(wrapped, key)

    def _sync(self):
        layer = self._wrapped
        for key in [k for k in layer if k not in self]:
            del layer[key]
        for key, value in self.items():
            dict.__setitem__(layer, key, value)
        layer._no_grad = set(self._no_grad)
        layer._training = self._training

    def __call__(self, *args, **kwargs):
        self._sync()
        layer = self._wrapped
        params = self.trainable_parameters()

        def run(params, *args, **kwargs):
            # Also run again for the backward: put back what was there each time, so
            # the model never keeps the checkpoint's inner arrays.
            saved = layer.trainable_parameters()
            layer.update(params)
            try:
                return layer(*args, **kwargs)
            finally:
                layer.update(saved)

        return mx.checkpoint(run)(params, *args, **kwargs)


def grad_checkpoint(layer: nn.Module) -> CheckpointedLayer:
    """``layer`` wrapped for gradient checkpointing (a wrapper is returned unchanged).

    Unlike mlx-lm's (which patches ``type(layer).__call__`` for every instance), this
    touches nothing else: put the result where the layer was, or use
    ``grad_checkpoint_layers(model)`` for all of ``model.layers``.
    """
    return layer if isinstance(layer, CheckpointedLayer) else CheckpointedLayer(layer)


def grad_checkpoint_layers(model: nn.Module) -> nn.Module:
    """Wrap every block of ``model.layers`` in place; parameter paths do not change."""
    blocks = model.layers
    for i, block in enumerate(blocks):
        blocks[i] = grad_checkpoint(block)
    return model
