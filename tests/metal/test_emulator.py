"""Tests of the Metal emulator itself: correct kernels pass, planted bugs are caught."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.metal.emulator import (
    MetalCompileError,
    MetalRuntimeError,
    compile_metal,
    metal_include_dirs,
    run_seeds,
)

pytestmark = pytest.mark.metal_emulator
KERNELS = Path(__file__).parent / "kernels"
SEEDS = range(8)


@pytest.fixture(scope="module")
def basic():
    return compile_metal(KERNELS / "basic.metal")


@pytest.fixture(scope="module")
def bugs():
    return compile_metal(KERNELS / "bugs.metal")


@pytest.fixture(scope="module")
def simd():
    return compile_metal(KERNELS / "simd.metal")


def test_kernels_lists_host_names(basic):
    assert basic.kernels() == ["scale_float32", "scale_float16", "scale_bfloat16", "row_sum",
                               "positions"]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_scale_matches_numpy(basic, dtype):
    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}[dtype]
    n = 77  # not a multiple of the threadgroup: the tail threads must not write
    x32 = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    if dtype == "bfloat16":  # bfloat16 as its raw bits (numpy has no bfloat16)
        x = (x32.view(np.uint32) >> 16).astype(np.uint16)
        ref = (((x.astype(np.uint32) << 16).view(np.float32)) * 3).view(np.uint32)
        ref = ((ref + 0x7FFF + ((ref >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    else:
        x = x32.astype(np_dtype)
        ref = (3 * x.astype(np.float32)).astype(np_dtype)
    for out in run_seeds(basic, f"scale_{dtype}", seeds=SEEDS, threadgroups=(3, 1, 1),
                         threads=(32, 1, 1), buffers=[x, np.empty_like(x), np.float32(3), np.uint32(n)],
                         outputs=[1]):
        np.testing.assert_array_equal(out[1], ref)
        np.testing.assert_array_equal(out[0], x)  # inputs come back unchanged


def test_row_sum_and_schedules(basic):
    x = np.random.default_rng(1).random((5, 300)).astype(np.float32)
    for out in run_seeds(basic, "row_sum", seeds=SEEDS, deterministic=False, threadgroups=(5, 1, 1),
                         threads=(256, 1, 1), buffers=[x, np.empty(5, np.float32), np.int32(300)],
                         outputs=[1]):
        np.testing.assert_allclose(out[1], x.sum(1), rtol=1e-5)


def test_position_attributes(basic):
    tgs, tpg = (2, 3, 2), (16, 2, 2)
    grid = tuple(a * b for a, b in zip(tgs, tpg))
    n = int(np.prod(grid))
    (out,) = basic.run("positions", threadgroups=tgs, threads=tpg, buffers=[np.empty(n * 12, np.uint32)],
                       outputs=[0], seed=5)
    out = out.reshape(grid[2], grid[1], grid[0], 12)
    z, y, x = np.meshgrid(*[np.arange(g) for g in grid[::-1]], indexing="ij")
    np.testing.assert_array_equal(out[..., 0], x)
    np.testing.assert_array_equal(out[..., 1], y)
    np.testing.assert_array_equal(out[..., 2], z)
    np.testing.assert_array_equal(out[..., 3], x % tpg[0])
    np.testing.assert_array_equal(out[..., 4], y % tpg[1])
    np.testing.assert_array_equal(out[..., 6], x // tpg[0] + 100 * (y // tpg[1]) + 10000 * (z // tpg[2]))
    np.testing.assert_array_equal(out[..., 7], 64)
    np.testing.assert_array_equal(out[..., 8], 12)
    lid = (z % tpg[2] * tpg[1] + y % tpg[1]) * tpg[0] + x % tpg[0]
    np.testing.assert_array_equal(out[..., 9], lid)
    np.testing.assert_array_equal(out[..., 10], lid % 32)
    np.testing.assert_array_equal(out[..., 11], lid // 32)


# ---- planted bugs ----------------------------------------------------------------------
def test_missing_barrier_is_caught(bugs):
    x = np.random.default_rng(2).standard_normal((3, 1000)).astype(np.float32) * 3
    ref = np.log(np.exp(x.astype(np.float64)).sum(1))
    kw = dict(threadgroups=(3, 1, 1), threads=(1024, 1, 1),
              buffers=[x, np.empty(3, np.float32), np.int32(1000)], outputs=[1])
    for out in run_seeds(bugs, "row_lse_fixed", seeds=SEEDS, **kw):
        np.testing.assert_allclose(out[1], ref, rtol=1e-5)
    racy = [bugs.run("row_lse_racy", seed=s, **kw)[1] for s in SEEDS]
    wrong = [s for s, r in zip(SEEDS, racy) if not np.allclose(r, ref, rtol=1e-5)]
    assert len(wrong) >= 2, f"the race went unnoticed under seeds {list(SEEDS)}"
    with pytest.raises(MetalRuntimeError, match="differs between seed"):
        run_seeds(bugs, "row_lse_racy", seeds=SEEDS, **kw)


def test_wrong_index_is_caught(bugs):
    x = np.arange(128, dtype=np.float32)
    (_, y) = bugs.run("copy_wrong_index", threadgroups=(4, 1, 1), threads=(32, 1, 1),
                      buffers=[x, np.empty_like(x)], outputs=[1], seed=1)
    assert np.isnan(y[32:]).all()  # never written: still poisoned
    assert not np.array_equal(y, x)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_out_of_bounds_read_is_caught(bugs, seed):
    x = np.arange(100, dtype=np.float32)
    kw = dict(threadgroups=(4, 1, 1), threads=(32, 1, 1),
              buffers=[x, np.empty(100, np.float32), np.uint32(100)], outputs=[1], seed=seed)
    if seed % 2:  # buffers start-aligned: the stray read lands in slack (not caught here)
        bugs.run("diff_oob_read", **kw)
        return
    with pytest.raises(MetalRuntimeError, match=r"out-of-bounds read: buffer 0 .* at element 100") as e:
        bugs.run("diff_oob_read", **kw)
    assert "diff_oob_read" in str(e.value) and f"seed {seed}" in str(e.value)


@pytest.mark.parametrize("seed", [0, 1])
def test_out_of_bounds_write_is_caught(bugs, seed):
    with pytest.raises(MetalRuntimeError, match=r"out-of-bounds write.*buffer 0.*element 100"):
        bugs.run("fill_oob_write", threadgroups=(4, 1, 1), threads=(32, 1, 1),
                 buffers=[np.empty(100, np.float32)], outputs=[0], seed=seed)


def test_threadgroup_out_of_bounds_is_caught(bugs):
    x = np.arange(64, dtype=np.float32)
    with pytest.raises(MetalRuntimeError, match=r"threadgroup memory 'tile' \(256 bytes\): byte offset 256"):
        bugs.run("tile_oob_read", threadgroups=(1, 1, 1), threads=(64, 1, 1),
                 buffers=[x, np.empty_like(x)], outputs=[1])


def test_uninitialised_threadgroup_memory_is_poisoned(bugs):
    (y,) = bugs.run("uninitialised_tile", threads=(64, 1, 1), buffers=[np.zeros(64, np.float32)],
                    outputs=[0])
    assert (y[:32] == 1).all() and np.isnan(y[32:]).all()


@pytest.mark.parametrize("bug,message", [
    ("BUG_DEVICE_AS_THREADGROUP", "no matching function"),
    ("BUG_DROPPED_QUALIFIER", "cannot initialize.*__msl_device"),
    ("BUG_WRITE_CONST", "read-only variable is not assignable"),
])
def test_address_space_mistakes_do_not_compile(bug, message):
    path = KERNELS / "bug_address_space.metal"
    lib = compile_metal(path)  # the correct variant compiles and runs
    x = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(lib.run("address_space_bug", buffers=[x, np.empty_like(x)],
                                          outputs=[1])[1], x)
    with pytest.raises(MetalCompileError, match=message):
        compile_metal(path, defines=[bug])


def test_binding_mistakes_are_value_errors(basic):
    x = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match=r"\[\[buffer\(3\)\]\].*not bound"):
        basic.run("scale_float32", buffers=[x, x, np.float32(1)], outputs=[1])
    with pytest.raises(ValueError, match="elements of 4 bytes but got dtype float64"):
        basic.run("scale_float32", buffers=[x.astype(np.float64), x, np.float32(1), np.uint32(4)],
                  outputs=[1])
    with pytest.raises(KeyError, match="no kernel 'nope'"):
        basic.run("nope")


# ---- simd_* and simdgroup_matrix against numpy ---------------------------------------
def test_simd_functions(simd):
    n = 64
    x = np.random.default_rng(3).integers(0, 4, n).astype(np.float32)
    outs = run_seeds(simd, "simd_ops", seeds=SEEDS, threads=(n, 1, 1),
                     buffers=[x, np.empty(22 * n, np.float32), np.empty(3 * n, np.uint32)], outputs=[1, 2])
    out, votes = outs[0][1].reshape(22, 2, 32), outs[0][2].reshape(2, 32, 3)
    g = x.reshape(2, 32)
    lane = np.arange(32)
    one = lambda v: np.repeat(v[:, None], 32, 1)  # noqa: E731
    cp = np.cumprod(g, 1)
    expected = [
        one(g.sum(1)), one(g.max(1)), one(g.min(1)), one(g.prod(1)),
        np.cumsum(g, 1), np.cumsum(g, 1) - g, cp, np.concatenate([np.ones((2, 1)), cp[:, :-1]], 1),
        g[:, (lane * 7) % 32], g[:, lane ^ 5],
        np.where(lane + 3 < 32, g[:, np.minimum(lane + 3, 31)], g),
        np.where(lane >= 3, g[:, np.maximum(lane - 3, 0)], g),
        g[:, (lane + 3) % 32], g[:, (lane - 3) % 32], one(g[:, 9]), one(g[:, 0]),
    ]
    iv = g.astype(np.int64)
    expected += [one(np.bitwise_and.reduce(iv, 1)), one(np.bitwise_or.reduce(iv, 1)),
                 one(np.bitwise_xor.reduce(iv, 1))]
    s = g.sum(1)
    expected += [one(s + 20 * s + 100 * 32 - 1000 * s), one(s), one(s)]
    for k, e in enumerate(expected):
        np.testing.assert_allclose(out[k], e, rtol=1e-6, err_msg=f"simd op #{k}")
    ballot = [sum(1 << i for i in range(32) if g[sg, i] > 2) for sg in range(2)]
    np.testing.assert_array_equal(votes[:, :, 0], one(np.array(ballot)))
    np.testing.assert_array_equal(votes[:, :, 1], 1)
    np.testing.assert_array_equal(votes[:, :, 2], one((g > 3.5).any(1).astype(np.uint32)))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_simdgroup_matrix_multiply_accumulate(simd, dtype):
    rng = np.random.default_rng(4)
    a, b = (rng.standard_normal((8, 8)).astype(dtype) for _ in range(2))
    c = rng.standard_normal((8, 8)).astype(np.float32)
    name = "mma8_float32" if dtype == np.float32 else "mma8_float16"
    for out in run_seeds(simd, name, seeds=SEEDS, threads=(32, 1, 1),
                         buffers=[a, b, c, np.empty((8, 8), np.float32)], outputs=[3]):
        ref = a.astype(np.float64) @ b.astype(np.float64) + c.T
        np.testing.assert_allclose(out[3], ref, rtol=1e-5, atol=1e-5)


def test_atomics(simd):
    x = np.random.default_rng(5).integers(0, 100, 256).astype(np.uint32)
    (_, bins) = simd.run("histogram", threadgroups=(4, 1, 1), threads=(64, 1, 1),
                         buffers=[x, np.zeros(8, np.uint32)], seed=3)
    np.testing.assert_array_equal(bins, np.bincount(x % 8, minlength=8))


def test_mlx_kernel_headers_compile_and_run(tmp_path):
    src = tmp_path / "uses_mlx.metal"
    src.write_text(
        '#include "mlx/backend/metal/kernels/utils.h"\n'
        '#include "mlx/backend/metal/kernels/steel/gemm/gemm.h"\n'
        '#include "mlx/backend/metal/kernels/quantized.h"\n'
        "template <typename T>\n"
        "[[kernel]] void lse(device const T* x [[buffer(0)]], device T* y [[buffer(1)]],\n"
        "                    uint i [[thread_position_in_grid]]) {\n"
        "  y[i] = static_cast<T>(metal::max(float(x[i]), float(Limits<T>::finite_min)));\n"
        "}\n"
        'instantiate_kernel("lse_float32", lse, float)\n'
        'instantiate_kernel("lse_bfloat16", lse, bfloat16_t)\n')
    lib = compile_metal(src, metal_include_dirs())
    assert lib.kernels() == ["lse_float32", "lse_bfloat16"]
    x = np.array([1.0, -np.inf, 3.0, 4.0] * 8, np.float32)
    y = lib.run("lse_float32", threads=(32, 1, 1), buffers=[x, np.empty_like(x)], outputs=[1])[1]
    np.testing.assert_array_equal(y, np.where(np.isinf(x), np.finfo(np.float32).min, x))
