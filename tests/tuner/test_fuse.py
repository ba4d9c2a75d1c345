"""`mlx-tuner fuse` end to end on a tiny Llama saved with mlx-lm's own utilities and an
offline tokenizer: the fused model loads with mlx_lm.load and gives the adapted logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import utils as lm
from mlx_lm.models import llama

from mlx_tuner import utils
from mlx_tuner.cli import main

ROOT = Path(__file__).resolve().parents[2]
LORA = {"rank": 4, "scale": 8.0, "dropout": 0.0}
TOKENS = mx.array([[1, 5, 9, 14, 2, 7, 30, 41]])


def save_tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(str(path))


def save_tiny_model(path: Path, quantize: bool = False) -> Path:
    mx.random.seed(0)
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3,
              "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "vocab_size": 50, "tie_word_embeddings": False}
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantize:
        model, config = lm.quantize_model(model, config, group_size=32, bits=4)
    mx.eval(model.parameters())
    path.mkdir(parents=True)
    lm.save_model(path, model)
    lm.save_config(config, path / "config.json")
    save_tokenizer(path, config["vocab_size"])
    return path


def save_adapters(model_dir: Path, path: Path, fine_tune_type: str, keys=None) -> Path:
    """Adapters written the way a training run leaves them (random, non-zero)."""
    model, _ = lm.load(str(model_dir))
    config = dict(LORA, **({"keys": keys} if keys else {}))
    utils.linear_to_lora_layers(model, 2, config, use_dora=fine_tune_type == "dora")
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    params = dict(tree_flatten(model.trainable_parameters()))
    for k, v in params.items():
        if k.endswith("lora_b"):
            params[k] = mx.random.normal(v.shape) * 0.2
        elif k.endswith(".m"):
            params[k] = v * (1 + 0.1 * mx.random.normal(v.shape))
    path.mkdir(parents=True)
    mx.save_safetensors(str(path / "adapters.safetensors"), params)
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": fine_tune_type, "num_layers": 2, "lora_parameters": config}))
    return path


def adapted_logits(model_dir, adapter_dir):
    """mlx-lm's own loading of base + adapters: the reference for the fused model."""
    model, _ = lm.load(str(model_dir), adapter_path=str(adapter_dir))
    return model(TOKENS)


def mlx_lm_fused_logits(model_dir, adapter_dir):
    """What mlx_lm.fuse's model computes: its layers' fuse() over its own loading."""
    model, _ = lm.load(str(model_dir), adapter_path=str(adapter_dir))
    model.update_modules(tree_unflatten(
        [(n, m.fuse()) for n, m in model.named_modules() if hasattr(m, "fuse")]))
    return model(TOKENS)


@pytest.mark.parametrize("quantize", [False, True], ids=["dense", "q4"])
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_fuse_end_to_end(tmp_path, quantize, fine_tune_type):
    model_dir = save_tiny_model(tmp_path / "model", quantize)
    adapters = save_adapters(model_dir, tmp_path / "adapters", fine_tune_type)
    ref = adapted_logits(model_dir, adapters)
    base, _ = lm.load(str(model_dir))
    assert not mx.allclose(ref, base(TOKENS), atol=1e-3).item()

    out = tmp_path / "fused"
    assert main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
                 "--save-path", str(out)]) == 0
    fused, tok, config = lm.load(str(out), return_config=True)
    assert not any(hasattr(m, "lora_a") for _, m in fused.named_modules())
    assert tok.encode("w5 w6", add_special_tokens=False) == [5, 6]
    assert ("quantization" in config) == quantize
    q_proj = fused.layers[2].self_attn.q_proj
    assert isinstance(q_proj, nn.QuantizedLinear if quantize else nn.Linear)
    # Re-quantizing the fused weight rounds it: then compare with mlx-lm's own fuse.
    want = mlx_lm_fused_logits(model_dir, adapters) if quantize else ref
    assert mx.allclose(fused(TOKENS), want, atol=1e-4).item()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fused")]

    if quantize:
        dq = tmp_path / "fused-dq"
        assert main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
                     "--save-path", str(dq), "--de-quantize"]) == 0
        dense, _, config = lm.load(str(dq), return_config=True)
        assert "quantization" not in config and "quantization_config" not in config
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in dense.named_modules())
        assert mx.allclose(dense(TOKENS), ref, atol=1e-4).item()


def test_fuse_is_atomic(tmp_path, monkeypatch):
    model_dir = save_tiny_model(tmp_path / "model")
    adapters = save_adapters(model_dir, tmp_path / "adapters", "lora")
    out = tmp_path / "fused"
    out.mkdir()
    (out / "marker").write_text("previous model")

    real_save = lm.save_model

    def crash(path, model, **kw):  # dies after writing part of the model
        real_save(path, model, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
              "--save-path", str(out)])
    assert [p.name for p in out.iterdir()] == ["marker"]  # the old model is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "fused", "model"]

    monkeypatch.setattr(lm, "save_model", real_save)
    assert main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
                 "--save-path", str(out)]) == 0
    assert not (out / "marker").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters", "fused", "model"]
    mode = (out).stat().st_mode & 0o777
    assert mode == 0o777 & ~_umask()
    fused, _ = lm.load(str(out))
    assert mx.allclose(fused(TOKENS), adapted_logits(model_dir, adapters), atol=1e-4).item()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


def test_fuse_errors(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    wrong = save_adapters(model_dir, tmp_path / "adapters", "lora")
    weights = mx.load(str(wrong / "adapters.safetensors"))
    weights["model.layers.2.self_attn.q_proj.lora_a"] = mx.zeros((64, 5))
    mx.save_safetensors(str(wrong / "adapters.safetensors"), weights)
    with pytest.raises(ValueError, match=r"q_proj.lora_a: shape \(64, 5\) in the file"):
        main(["fuse", "--model", str(model_dir), "--adapter-path", str(wrong),
              "--save-path", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError):
        main(["fuse", "--model", str(model_dir), "--adapter-path", str(tmp_path / "none"),
              "--save-path", str(tmp_path / "out")])


def test_fuse_cli_subprocess_with_gguf(tmp_path):
    """`python -m mlx_tuner fuse` as a user runs it, with the optional GGUF export."""
    model_dir = save_tiny_model(tmp_path / "model")
    adapters = save_adapters(model_dir, tmp_path / "adapters", "lora",
                             keys=["self_attn.q_proj", "self_attn.v_proj"])
    out = tmp_path / "fused"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    help_text = subprocess.run([sys.executable, "-m", "mlx_tuner", "fuse", "--help"], env=env,
                               capture_output=True, text=True, check=True).stdout
    for flag in ("--model", "--save-path", "--adapter-path", "--hf-path", "--upload-repo",
                 "--dequantize", "--de-quantize", "--export-gguf", "--gguf-path"):
        assert flag in help_text
    r = subprocess.run([sys.executable, "-m", "mlx_tuner", "fuse", "--model", str(model_dir),
                        "--adapter-path", str(adapters), "--save-path", str(out),
                        "--export-gguf"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (out / "ggml-model-f16.gguf").stat().st_size > 0
    fused, _ = lm.load(str(out))
    assert mx.allclose(fused(TOKENS), adapted_logits(model_dir, adapters), atol=1e-4).item()


def test_gguf_refuses_quantized(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", quantize=True)
    adapters = save_adapters(model_dir, tmp_path / "adapters", "lora")
    with pytest.raises(SystemExit, match="--export-gguf needs a dense model"):
        main(["fuse", "--model", str(model_dir), "--adapter-path", str(adapters),
              "--save-path", str(tmp_path / "out"), "--export-gguf"])
    assert not (tmp_path / "out").exists()
