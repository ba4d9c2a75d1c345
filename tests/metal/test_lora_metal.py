"""The Metal LoRA kernels (metal/lora.h) in the emulator: every instantiation, odd sizes
spanning several tiles, 8 simdgroup schedules each, against a float64 oracle. Launch
geometry and kernel names come from the host's own functions (through the bindings)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

emulator = pytest.importorskip("tests.metal.emulator")
ext = pytest.importorskip("mlx_tuner._ext")

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]
# (activation dtype, LoRA parameter dtype): every pair metal/lora.metal instantiates
PAIRS = [("float32", "float32"), ("float16", "float16"), ("float16", "float32"),
         ("bfloat16", "bfloat16"), ("bfloat16", "float32")]
TOL = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def encode(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values -> the bytes a Metal buffer of `dtype` holds (bf16 as uint16 bits)."""
    if dtype == "float32":
        return a.astype(np.float32)
    if dtype == "float16":
        return a.astype(np.float16)
    bits = a.astype(np.float32).view(np.uint32)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest even
    return (bits >> 16).astype(np.uint16)


def decode(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return a.astype(np.float64)


@pytest.fixture(scope="module")
def lib():
    return emulator.compile_metal(ROOT / "metal" / "lora.metal",
                                  include_dirs=emulator.metal_include_dirs())


@pytest.mark.parametrize("t,u", PAIRS)
@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("n,din,dout,r", [(37, 45, 41, 5), (9, 20, 70, 20)])
def test_lora_forward_kernels(lib, t, u, has_bias, n, din, dout, r):
    rng = np.random.default_rng(n + r)
    # Inputs rounded to their dtypes first: the oracle sees exactly what the kernel reads.
    xd = decode(encode(rng.standard_normal((n, din)), t), t)
    x = decode(encode(rng.standard_normal((n, din)), t), t)
    w = decode(encode(rng.standard_normal((dout, din)) / np.sqrt(din), t), t)
    a = decode(encode(rng.standard_normal((din, r)) / np.sqrt(din), u), u)
    b = decode(encode(rng.standard_normal((r, dout)), u), u)
    bias = decode(encode(rng.standard_normal(dout), t), t)
    scale = np.float32(1.5)

    name, tgs, threads = ext.metal_launch_lora_xa(n, r, t, u)
    runs = emulator.run_seeds(
        lib, name, seeds=range(8), threadgroups=tgs, threads=threads,
        buffers=[encode(xd, t), encode(a, u), np.empty((n, r), np.float32), np.int32(n),
                 np.int32(din), np.int32(r)], outputs=[2])
    xa = runs[0][2]
    xa_ref = xd @ a
    assert np.max(np.abs(xa - xa_ref)) <= 1e-5 * max(1.0, np.abs(xa_ref).max()) * np.sqrt(din)

    name, tgs, threads = ext.metal_launch_lora_linear(n, dout, t, u, has_bias)
    y_buf = encode(np.zeros((n, dout)), t)
    runs = emulator.run_seeds(
        lib, name, seeds=range(8), threadgroups=tgs, threads=threads,
        buffers=[encode(x, t), encode(w, t), xa, encode(b, u),
                 encode(bias if has_bias else np.zeros(1), t), y_buf, np.int32(n),
                 np.int32(din), np.int32(dout), np.int32(r), scale],
        outputs=[5])
    y = decode(runs[0][5], t)
    y_ref = x @ w.T + float(scale) * (xa.astype(np.float64) @ b) + (bias if has_bias else 0)
    err = np.max(np.abs(y - y_ref))
    # One rounding to t at the end (float accumulation), plus float32 sums over din.
    assert err <= TOL[t] * max(1.0, np.abs(y_ref).max()), (name, err)


def test_launch_rejects_unknown_dtype_pairs():
    with pytest.raises(ValueError, match=r"\[lora_linear\] no Metal kernel"):
        ext.metal_launch_lora_linear(4, 4, "bfloat16", "float16", False)
