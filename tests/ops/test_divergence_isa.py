"""The CPU divergence kernels are compiled three times (AVX-512, AVX2+FMA, generic) and
picked at run time; CI machines may lack AVX-512. MLX_TUNER_CPU_ISA caps the choice, so
every build runs the divergence tests here, each in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("isa", ["avx2", "generic"])
def test_divergence_tests_pass_on_every_cpu_build(isa):
    env = {**os.environ, "MLX_TUNER_CPU_ISA": isa}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
         str(HERE / "test_divergence.py"), "-k", "cpu and not 40013"],
        capture_output=True, text=True, env=env, timeout=900, cwd=HERE.parent.parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
