"""Shared test fixtures: seeded randomness and the float-dtype tolerance rule of DESIGN.md."""

from __future__ import annotations

import os

# MLX's CUDA backend multiplies float32 matrices in TF32 unless MLX_ENABLE_TF32=0 (read at
# its first matmul). The float32 cases measure errors against exact float32 arithmetic,
# so the suite turns TF32 off; with it on, the parts of the fused GPU ops that are MLX
# matmuls (DoRA's W A for the norms) and the references carry TF32's ~1e-3 relative
# error, as mlx-lm's layers do. The QLoRA and DoRA GPU tests also take their references on
# the CPU (mx.stream(mx.cpu)): MLX's CUDA backend compiles a kernel for every new shape and
# dtype, its quantized matmuls in minutes, which made those files longer than a device
# call; the CPU reference is the same maths in the same dtype.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np
import pytest

DTYPES = [mx.float32, mx.float16, mx.bfloat16]
# The floor of the tolerance per dtype: DESIGN.md's rule is "fused error against a
# float64 reference at most twice the error of the same-dtype reference, with a floor".
TOL_FLOOR = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}


def pytest_sessionstart(session):
    # Without the compiled extension every fused op runs its reference and an op test
    # compares the reference with itself: stop here instead of passing vacuously.
    from mlx_tuner import ops

    info = ops.backend_info()["extension"]
    if not info["loaded"]:
        raise pytest.UsageError(f"mlx_tuner's compiled extension is not loaded: {info['reason']}")


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
    np.random.seed(0)


def to_f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32), dtype=np.float64)


def assert_close_to_oracle(fused, same_dtype_ref, oracle, dtype, what="output"):
    """fused vs oracle (float64): error <= 2 * error(same-dtype reference) + floor."""
    f, r, o = to_f64(fused), to_f64(same_dtype_ref), np.asarray(oracle, dtype=np.float64)
    assert f.shape == o.shape, f"{what}: shape {f.shape} != {o.shape}"
    assert np.all(np.isfinite(f) == np.isfinite(o)), f"{what}: non-finite mismatch"
    fin = np.isfinite(o)
    scale = max(1.0, float(np.max(np.abs(o[fin]), initial=0.0)))
    err_f = float(np.max(np.abs(f[fin] - o[fin]), initial=0.0))
    err_r = float(np.max(np.abs(r[fin] - o[fin]), initial=0.0))
    if not np.isfinite(err_r):  # MLX's ops gave NaN (seen on CUDA): the floor alone binds
        err_r = 0.0
    bound = 2 * err_r + TOL_FLOOR[dtype] * scale
    assert err_f <= bound, f"{what}: fused error {err_f:.3g} > bound {bound:.3g} (reference error {err_r:.3g})"


# Devices the suite runs on: the CPU always, the GPU (Metal or CUDA) when MLX has one.
DEVICES = [mx.cpu] + ([mx.gpu] if mx.is_available(mx.gpu) else [])


@pytest.fixture(params=DEVICES, ids=lambda d: "gpu" if d == mx.gpu else "cpu")
def device(request):
    """Runs the test once per available device, with that device as the default."""
    prev = mx.default_device()
    mx.set_default_device(request.param)
    try:
        yield request.param
    finally:
        mx.set_default_device(prev)
