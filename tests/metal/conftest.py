"""Fixtures of the Metal emulator tests: `metal_emu` (the emulator module) and the
session-wide record of which kernels ran (for test_coverage.py)."""

from __future__ import annotations

import pytest

from tests.metal import emulator


@pytest.fixture(scope="session")
def metal_emu():
    """The emulator module: metal_emu.compile_metal(path), metal_emu.run_seeds(...)."""
    return emulator
