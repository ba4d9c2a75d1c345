"""metal/dora.metal in the Metal emulator: every DoRARowSqNorm instantiation (dense and
affine-quantized W, float32/float16/bfloat16) against numpy, over 8 schedules, with the
dispatch numbers of the host code (_ext.metal_launch_dora_row_sq_norm)."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_tuner.ops import _extension

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def ext():
    e = _extension.extension()
    if e is None or not hasattr(e, "metal_launch_dora_row_sq_norm"):
        pytest.skip("the extension (dora family) is not built")
    return e


def raw(a: mx.array) -> np.ndarray:
    """The bytes of an MLX array as numpy (bfloat16 as uint16)."""
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def dequantize_f64(wq, sc, bi, gs, bits):
    """mx.quantize's layout decoded in float64: a little-endian bit stream of codes."""
    rows = wq.shape[0]
    stream = np.unpackbits(np.array(wq).view(np.uint8).reshape(rows, -1), axis=1,
                           bitorder="little")
    codes = stream.reshape(rows, -1, bits) @ (1 << np.arange(bits))
    f64 = lambda a: np.array(a.astype(mx.float32), np.float64).repeat(gs, 1)  # noqa: E731
    return f64(sc) * codes + f64(bi)


@pytest.fixture(scope="module")
def lib(metal_emu):
    return metal_emu.compile_metal(ROOT / "metal/dora.metal",
                                   include_dirs=[str(ROOT / "metal")])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rows,k", [(3, 100), (5, 517)])
def test_row_sq_dense(metal_emu, lib, dtype, rows, k):
    w = mx.random.normal((rows, k)).astype(DTYPES[dtype])
    name, tg, th = ext().metal_launch_dora_row_sq_norm(rows, dtype, 0)
    res = metal_emu.run_seeds(lib, name, threadgroups=tg, threads=th,
                              buffers=[raw(w), np.empty(rows, np.float32), np.int32(k)],
                              outputs=[1])
    want = (np.array(w.astype(mx.float32), np.float64) ** 2).sum(1)
    np.testing.assert_allclose(res[0][1], want, rtol=2e-5)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_row_sq_quantized(metal_emu, lib, dtype, bits):
    rows, k, gs = 3, 384, 64 if bits % 2 else 128
    w = mx.random.normal((rows, k)).astype(DTYPES[dtype])
    wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
    name, tg, th = ext().metal_launch_dora_row_sq_norm(rows, dtype, bits)
    res = metal_emu.run_seeds(
        lib, name, threadgroups=tg, threads=th,
        buffers=[np.array(wq).view(np.uint8), raw(sc), raw(bi), np.empty(rows, np.float32),
                 np.int32(k), np.int32(gs)],
        outputs=[3])
    want = (dequantize_f64(wq, sc, bi, gs, bits) ** 2).sum(1)
    np.testing.assert_allclose(res[0][3], want, rtol=2e-4)
    # the CPU kernel of the same primitive agrees
    cpu = ext().dora_weight_sq_norm(wq, sc, bi, group_size=gs, bits=bits)
    np.testing.assert_allclose(np.array(cpu), want, rtol=2e-4)
