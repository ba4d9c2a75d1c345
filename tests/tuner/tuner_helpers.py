"""Helpers shared by the training tests (run the CLI in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def run_cli(*args, timeout=240, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlx_tuner", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(), timeout=timeout, **kw)
