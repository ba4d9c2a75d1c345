"""Benchmarks: `pytest bench --benchmark-json=bench/results/<name>.json`.
MLX_TUNER_BENCH_QUICK=1 runs every benchmark once on tiny shapes (CI's smoke test)."""

import mlx.core as mx
import pytest


@pytest.fixture(autouse=True)
def _seed():
    mx.random.seed(0)
