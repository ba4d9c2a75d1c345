"""`mlx-tuner lora`: YAML config, training + test, and one-line errors (exit 1, no traceback)
for a user's mistakes."""

from __future__ import annotations

import json
import shutil

import pytest
from tuner_helpers import run_cli

from mlx_tuner import tiny


def one_line_error(proc, pattern):
    import re

    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model_dir):
    """A short run configured by YAML (rank 4 on all layers) with --test after it."""
    root = tmp_path_factory.mktemp("cli")
    cfg = root / "cfg.yaml"
    cfg.write_text(
        f"model: {model_dir}\ntrain: true\ndata: {tiny.SHIPPED_DATASET}\nnum_layers: -1\n"
        "batch_size: 4\niters: 4\nlearning_rate: 1e-3\nsteps_per_eval: 100\nval_batches: 1\n"
        "test_batches: 2\nlora_parameters:\n  rank: 4\n  scale: 4.0\n  dropout: 0.0\n"
    )
    proc = run_cli("lora", "-c", cfg, "--test", "--adapter-path", root / "adapters", "--iters", 3)
    return root, proc


def test_yaml_train_and_test(trained):
    root, proc = trained
    assert proc.returncode == 0, proc.stderr
    assert "Test loss" in proc.stdout
    config = json.loads((root / "adapters" / "adapter_config.json").read_text())
    assert config["iters"] == 3 and config["learning_rate"] == 1e-3 and config["lora_parameters"]["rank"] == 4
    assert (root / "adapters" / "adapters.safetensors").exists()
    rows = (root / "adapters" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["iteration"] == 3
    assert (root / "adapters" / "loss.png").exists() or "matplotlib is not installed" in proc.stdout


def test_adapter_shape_mismatch(trained, model_dir, tmp_path):
    root, _ = trained
    bad = tmp_path / "adapters"
    shutil.copytree(root / "adapters", bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_parameters"]["rank"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    proc = run_cli("lora", "--model", model_dir, "--data", tiny.SHIPPED_DATASET, "--test", "--adapter-path", bad)
    one_line_error(proc, r"shape")


def test_resume_adapter_file_names_mismatch(trained, model_dir, tmp_path):
    root, _ = trained  # trained on every layer; resuming into a 1-layer LoRA must refuse
    proc = run_cli("lora", "--model", model_dir, "--data", tiny.SHIPPED_DATASET, "--train", "--iters", 1,
                   "--num-layers", 1, "--resume-adapter-file", root / "adapters" / "adapters.safetensors",
                   "--adapter-path", tmp_path / "a")
    one_line_error(proc, r"not trainable parameters of this model")


def test_num_layers_beyond_model(model_dir, tmp_path):
    proc = run_cli("lora", "--model", model_dir, "--data", tiny.SHIPPED_DATASET, "--train", "--num-layers", 9,
                   "--adapter-path", tmp_path / "a")
    one_line_error(proc, r"--num-layers 9 is more than the model's 2 layers")


@pytest.mark.parametrize("content,pattern", [
    ('{"text": "a"}\n{"text": broken\n', r"train\.jsonl:2: malformed JSON"),
    ('{"question": "a"}\n', r"train\.jsonl:1: unsupported record format"),
    ("\n", r"training set .* missing or empty"),
])
def test_bad_data(model_dir, tmp_path, content, pattern):
    (tmp_path / "train.jsonl").write_text(content)
    proc = run_cli("lora", "--model", model_dir, "--data", tmp_path, "--train", "--adapter-path", tmp_path / "a")
    one_line_error(proc, pattern)


def test_unreadable_yaml(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: [unclosed\n  iters: 3\n")
    one_line_error(run_cli("lora", "-c", cfg), r"cannot read config .*bad\.yaml")
    one_line_error(run_cli("lora", "-c", tmp_path / "missing.yaml"), r"cannot read config .*missing\.yaml")


def test_missing_model_offline(tmp_path):
    proc = run_cli("lora", "--model", tmp_path / "nope", "--train", "--data", tiny.SHIPPED_DATASET)
    one_line_error(proc, r"cannot load model|neither a local folder")
