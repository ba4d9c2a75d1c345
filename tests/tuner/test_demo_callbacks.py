"""`mlx-tuner demo` end to end (short), the reporters' lazy imports, and the loss plot."""

from __future__ import annotations

import json
import sys
import types

import pytest
from tuner_helpers import run_cli

from mlx_tuner import callbacks


def test_demo_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--output", out, "--iters", 30, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert "before:" in proc.stdout and "after:" in proc.stdout and "Loss: train" in proc.stdout
    for name in ["adapters/adapters.safetensors", "adapters/adapter_config.json", "metrics.jsonl", "base-model/config.json"]:
        assert (out / name).exists(), name
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["train_loss"] for r in rows if r["type"] == "train"]
    assert train[-1] < train[0]
    assert (out / "loss.png").exists() or "matplotlib is not installed" in proc.stdout


def test_unknown_reporter():
    with pytest.raises(ValueError, match="nope callback doesn't exist"):
        callbacks.get_reporting_callbacks("nope", project_name="p", log_dir="d", config={})
    assert callbacks.get_reporting_callbacks(None) is None


def test_missing_wandb_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match="pip install wandb"):
        callbacks.get_reporting_callbacks("wandb", project_name="p", log_dir="d", config={})


def test_wandb_and_swanlab_chain(monkeypatch, tmp_path):
    logs = []

    def fake(name):
        m = types.ModuleType(name)
        m.init = lambda **kw: logs.append((name, "init", kw))
        m.log = lambda data, step=None: logs.append((name, "log", data, step))
        return m

    monkeypatch.setitem(sys.modules, "wandb", fake("wandb"))
    monkeypatch.setitem(sys.modules, "swanlab", fake("swanlab"))
    cb = callbacks.get_reporting_callbacks("wandb, swanlab", project_name="p", log_dir=str(tmp_path / "run"), config={"a": 1})
    import mlx.core as mx

    cb.on_train_loss_report({"iteration": 5, "train_loss": mx.array(1.5)})
    cb.on_val_loss_report({"iteration": 4, "val_loss": 2.0})
    assert [x[:2] for x in logs] == [("wandb", "init"), ("swanlab", "init"), ("swanlab", "log"), ("wandb", "log"),
                                     ("swanlab", "log"), ("wandb", "log")]
    assert logs[2][2] == {"iteration": 5, "train_loss": 1.5} and logs[2][3] == 5
    assert logs[0][2]["name"] == "run" and logs[1][2]["experiment_name"] == "run"


def test_plot_or_note(tmp_path, monkeypatch):
    m = tmp_path / "m.jsonl"
    m.write_text('{"type": "train", "iteration": 1, "train_loss": 3}\n{"type": "val", "iteration": 0, "val_loss": 4}\n')
    note = callbacks.plot_metrics_file(m, tmp_path / "a.png")
    assert (note is None and (tmp_path / "a.png").stat().st_size > 1000) or "matplotlib" in note
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert callbacks.plot_metrics_file(m, tmp_path / "b.png") == "matplotlib is not installed: no loss plot (pip install matplotlib)"
