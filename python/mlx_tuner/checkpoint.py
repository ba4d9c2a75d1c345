"""Atomic files and the full training state, so a killed run resumes exactly.

Every file is written to a temporary name in the same folder, flushed and fsync'ed, then
renamed over the target (and the folder fsync'ed): a crash leaves the old file or the new
one, never a torn one. The training state is one safetensors file: the trainable
parameters, the optimizer state, any half-accumulated gradient, MLX's and numpy's random
states and the position in the data order; a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

STATE_FORMAT = "mlx-tuner-training-state/1"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    _replace_atomically(tmp, path)


def atomic_save_safetensors(path, arrays: dict, metadata: dict | None = None) -> None:
    """``mx.save_safetensors`` that never leaves a partial file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata or {})
        _replace_atomically(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# MLX's global key is two uint32 words; mx.random.seed(s) sets it to (s >> 32, s & 0xffffffff),
# which is how an arbitrary saved key is put back.
def get_rng_key() -> tuple[int, int]:
    hi, lo = (int(v) for v in np.array(mx.random.state[0]).reshape(-1)[:2])
    return hi, lo


def set_rng_key(key: tuple[int, int]) -> None:
    hi, lo = key
    mx.random.seed((int(hi) << 32) | int(lo))


def _set_path(tree, path: str, value) -> bool:
    keys = path.split(".")
    node = tree
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node.get(k) if isinstance(node, dict) else None
        if node is None:
            return False
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        return False
    return True


def save_training_state(path, *, model, optimizer, iteration: int, grad_accum=None,
                        data_state: dict | None = None, extra: dict | None = None) -> None:
    """Write everything a resumed run needs (rank 0 calls this)."""
    arrays = {f"adapter.{k}": v for k, v in tree_flatten(model.trainable_parameters())}
    arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
    if grad_accum is not None:
        arrays.update({f"grad.{k}": v for k, v in tree_flatten(grad_accum)})
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    arrays["rng.numpy"] = mx.array(np.asarray(keys, dtype=np.uint32))
    data_state = dict(data_state or {})
    perm = data_state.pop("perm", None)
    if perm is not None:
        arrays["data.perm"] = mx.array(np.asarray(perm, dtype=np.int32))
    meta = {
        "format": STATE_FORMAT,
        "iteration": iteration,
        "mlx_key": list(get_rng_key()),
        "numpy": [kind, int(pos), int(has_gauss), float(gauss)],
        "data": data_state,
        "has_grad": grad_accum is not None,
        "extra": extra or {},
    }
    mx.eval(arrays)
    atomic_save_safetensors(path, arrays, {"mlx_tuner": json.dumps(meta)})


def load_training_state(path) -> tuple[dict, dict]:
    """(arrays, metadata) of a state file; ValueError if it is not one."""
    try:
        arrays, meta = mx.load(str(path), return_metadata=True)
        meta = json.loads(meta["mlx_tuner"])
    except Exception as e:  # unreadable, or not written by us
        raise ValueError(f"{path}: not an mlx-tuner training state ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: unknown training state format {meta.get('format')!r}")
    return arrays, meta


def restore_training_state(path, model, optimizer) -> dict:
    """Put a saved state back into ``model`` and ``optimizer`` and the random generators.

    Returns ``{"iteration", "grad_accum", "data", "extra"}``. Call before compiling the step:
    the optimizer's state dict is updated in place.
    """
    arrays, meta = load_training_state(path)
    params = dict(tree_flatten(model.trainable_parameters()))
    adapters = {k[len("adapter."):]: v for k, v in arrays.items() if k.startswith("adapter.")}
    if set(adapters) != set(params):
        missing = sorted(set(params) - set(adapters))[:3]
        extra = sorted(set(adapters) - set(params))[:3]
        raise ValueError(
            f"{path}: the saved state does not match the model's trainable parameters "
            f"(missing {missing}, unexpected {extra}); was it written by another configuration?"
        )
    for k, v in adapters.items():
        if v.shape != params[k].shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model's is {tuple(params[k].shape)}")
    model.load_weights(list(adapters.items()), strict=False)

    optimizer.init(model.trainable_parameters())
    for k, v in arrays.items():
        if k.startswith("optimizer.") and not _set_path(optimizer.state, k[len("optimizer."):], v):
            raise ValueError(f"{path}: optimizer state {k} does not fit this optimizer")

    grad = None
    if meta["has_grad"]:
        grad = model.trainable_parameters()
        grad = {k: v for k, v in grad.items()}
        from mlx.utils import tree_map

        grad = tree_map(lambda x: mx.zeros_like(x), grad)
        for k, v in arrays.items():
            if k.startswith("grad."):
                _set_path(grad, k[len("grad."):], v)

    set_rng_key(meta["mlx_key"])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.array(arrays["rng.numpy"]).astype(np.uint32), pos, has_gauss, gauss))
    data = dict(meta["data"])
    if "data.perm" in arrays:
        data["perm"] = np.array(arrays["data.perm"]).tolist()
    mx.eval(model.parameters(), optimizer.state)
    return {"iteration": int(meta["iteration"]), "grad_accum": grad, "data": data, "extra": meta["extra"]}
