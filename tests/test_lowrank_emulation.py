"""The CUDA rank-r kernels (csrc/backend/cuda/lowrank.cu) cannot run here without a GPU;
tools/emulate_lowrank.py replays their fragment layout, index arithmetic, two-deep
prefetch and shared-memory staging lane by lane in float64 (shared tiles start as NaN, so
a read of an unwritten element shows). It is a transcription kept in step with the
kernels by hand: it proves the indexing, not the compiled code, which the GPU tests
(tests/ops/test_lora.py on the H200) check."""

from __future__ import annotations

import pathlib
import runpy


def test_lowrank_emulation_matches_float64_products(capsys):
    script = pathlib.Path(__file__).resolve().parents[1] / "tools" / "emulate_lowrank.py"
    runpy.run_path(str(script), run_name="__main__")  # asserts per shape
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8  # every shape ran (5 LoRA, 3 project_quant)
