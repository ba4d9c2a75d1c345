"""Argument checks shared by the fused ops and their references.

Every message starts with ``[op]``, names the argument and shows expected against got,
so a reference and a kernel reject bad input with the same words.
"""

from __future__ import annotations

import mlx.core as mx

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)


def _fmt_dtype(d) -> str:
    return str(d).replace("mlx.core.", "")


def check_array(op: str, name: str, a, *, ndim_min: int = 0, ndim: int | None = None,
                float_only: bool = True) -> None:
    if not isinstance(a, mx.array):
        raise ValueError(f"[{op}] {name} must be an mx.array but got {type(a).__name__}.")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"[{op}] {name} must have {ndim} dimensions but got shape {tuple(a.shape)}.")
    if a.ndim < ndim_min:
        raise ValueError(
            f"[{op}] {name} must have at least {ndim_min} dimension(s) but got shape {tuple(a.shape)}."
        )
    if float_only and a.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"[{op}] {name} must be float32, float16 or bfloat16 but got {_fmt_dtype(a.dtype)}."
        )


def check_shape(op: str, name: str, a, expected: tuple) -> None:
    if tuple(a.shape) != tuple(expected):
        raise ValueError(f"[{op}] {name} must have shape {tuple(expected)} but got {tuple(a.shape)}.")


def check_scalar(op: str, name: str, v) -> float:
    if isinstance(v, mx.array):
        if v.size != 1:
            raise ValueError(f"[{op}] {name} must be a scalar but got shape {tuple(v.shape)}.")
        return float(v.item())
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise ValueError(f"[{op}] {name} must be a float but got {type(v).__name__}.")
    return float(v)


def empty_batch_result(fn, x, *args, **kwargs):
    """The result of ``fn(x, *args, **kwargs)`` for an x with no rows, built without
    running a kernel: MLX 0.32.4's CUDA matmuls crash (SIGFPE) on an empty batch. A one-row
    probe gives the output's last dimension and dtype lazily; nothing is evaluated."""
    probe = fn(mx.zeros((1, x.shape[-1]), x.dtype), *args, **kwargs)
    return mx.zeros((*x.shape[:-1], probe.shape[-1]), probe.dtype)
