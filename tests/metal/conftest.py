"""Fixtures of the Metal emulator tests: `metal_emu` (the emulator module), and the
ordering that makes test_coverage.py run after every other test of the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.metal import emulator

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="session")
def metal_emu():
    """The emulator module: metal_emu.compile_metal(path), metal_emu.run_seeds(...)."""
    return emulator


def pytest_collection_modifyitems(config, items):
    # The coverage check needs the runs of every other test: move it last, and note
    # whether the session selected all emulator tests (else it cannot judge coverage).
    last = [it for it in items if Path(str(it.fspath)).name == "test_coverage.py"]
    if not last:
        return
    items[:] = [it for it in items if it not in last] + last
    collected = {Path(str(it.fspath)).resolve() for it in items}
    modules = {p.resolve() for p in HERE.glob("test_*.py")}
    partial = None
    if config.option.keyword:
        partial = f"-k {config.option.keyword!r} selects only some tests"
    elif not modules <= collected:
        partial = "not every tests/metal/test_*.py module was collected"
    config._metalemu_partial = partial
