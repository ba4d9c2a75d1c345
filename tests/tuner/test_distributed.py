"""Data-parallel training: 2 processes (mlx.launch, ring backend on 127.0.0.1), each with
half of every batch, end with the adapters of 1 process with the whole batch."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tuner_helpers import cli_env

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.argv[0] = 'mlx.launch'; sys.exit(main())"


def test_two_ranks_equal_one_process_with_the_whole_batch(tmp_path):
    single = subprocess.run([sys.executable, WORKER, tmp_path / "one.safetensors"], env=cli_env(),
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    port = random.randint(40000, 55000)
    proc = subprocess.run([sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(port),
                           sys.executable, str(WORKER), str(tmp_path / "two.safetensors")],
                          env=cli_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "rank 0 of 2 done" not in proc.stdout and "Address already in use" in proc.stderr:
        pytest.skip(f"ring backend could not listen on 127.0.0.1:{port}: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "rank 0 of 2 done" in proc.stdout and "rank 1 of 2 done" in proc.stdout
    one = mx.load(str(tmp_path / "one.safetensors"))
    two = mx.load(str(tmp_path / "two.safetensors"))
    assert set(one) == set(two)
    moved = 0  # Adam divides by sqrt(v): float rounding of the all-reduce shows up near 1e-5
    for k in one:
        np.testing.assert_allclose(np.array(two[k]), np.array(one[k]), rtol=1e-3, atol=3e-5, err_msg=k)
        moved += k.endswith("lora_b") and float(np.abs(np.array(one[k])).max()) > 0
    assert moved
