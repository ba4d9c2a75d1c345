"""A real `mlx-tuner lora` process killed with SIGKILL mid-run and resumed with --resume
ends with exactly the adapters of an uninterrupted run (CPU, fixed seed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
from tuner_helpers import cli_env, run_cli

from mlx_tuner import tiny


def cmd(model_dir, out):
    return ["lora", "--model", model_dir, "--data", tiny.SHIPPED_DATASET, "--train", "--num-layers", -1,
            "--batch-size", 4, "--iters", 40, "--save-every", 3, "--steps-per-report", 5, "--steps-per-eval", 15,
            "--val-batches", 1, "--learning-rate", 2e-3, "--seed", 7, "--adapter-path", out]


def saved_iteration(path):
    try:
        _, meta = mx.load(str(path), return_metadata=True)
        return json.loads(meta["mlx_tuner"])["iteration"]
    except Exception:
        return -1


def test_sigkill_then_resume_matches_uninterrupted(model_dir, tmp_path):
    full = run_cli(*cmd(model_dir, tmp_path / "full"))
    assert full.returncode == 0, full.stderr

    cut = tmp_path / "cut"
    args = [sys.executable, "-m", "mlx_tuner", *map(str, cmd(model_dir, cut))]
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = cut / "training_state.safetensors"
    deadline = time.time() + 180
    while saved_iteration(state) < 9 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)  # somewhere between two saves, or inside one
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = saved_iteration(state)
    assert 9 <= killed_at < 40

    resumed = run_cli(*cmd(model_dir, cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resuming from {state} at iteration {killed_at}" in resumed.stdout
    want = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    got = mx.load(str(cut / "adapters.safetensors"))
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]), err_msg=k)
    rows = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    its = [r["iteration"] for r in rows if r["type"] == "train"]
    assert its == sorted(set(its)) and its[-1] == 40  # no duplicate reports after the resume
