"""Every [[host_name]] instantiation in the project's metal/*.metal files must have been
run by at least one emulator test of this session (conftest.py runs this test last)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.metal.emulator import SESSION_RUNS, compile_metal, metal_include_dirs

pytestmark = pytest.mark.metal_emulator
ROOT = Path(__file__).resolve().parents[2]


def test_every_metal_instantiation_ran(request):
    partial = getattr(request.config, "_metalemu_partial", "the test ran out of its session order")
    if partial:
        pytest.skip(f"coverage needs the whole emulator suite: {partial}")
    missing = []
    for path in sorted((ROOT / "metal").glob("*.metal")):
        lib = compile_metal(path, metal_include_dirs())
        ran = {k for p, k in SESSION_RUNS if p == str(path.resolve())}
        missing += [f"metal/{path.name}: {k}" for k in lib.kernels() if k not in ran]
    assert not missing, (
        "these Metal kernel instantiations were never run in the emulator (add a test in "
        "tests/metal/test_<family>_metal.py):\n  " + "\n  ".join(missing))
