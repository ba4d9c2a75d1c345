"""Adapter files interchange with mlx-lm in both directions (LoRA, DoRA, QLoRA, tied
embeddings, MoE): trained by one, loaded by the other, same logits."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama, mixtral
from mlx_lm.tuner import utils as mlx_utils

from mlx_tuner import utils

CASES = {
    "lora": ("llama", "lora", {}),
    "dora": ("llama", "dora", {}),
    "qlora": ("qllama", "lora", {}),
    "qdora": ("qllama", "dora", {}),
    "lora-keys": ("llama", "lora", {"keys": ["self_attn.q_proj", "self_attn.v_proj",
                                             "model.embed_tokens"]}),
    "dora-embedding": ("tied", "dora", {"keys": ["mlp.down_proj", "model.embed_tokens"]}),
    "moe": ("mixtral", "lora", {}),
}


def build(kind):
    mx.random.seed(0)
    if kind == "mixtral":
        model = mixtral.Model(mixtral.ModelArgs(
            model_type="mixtral", vocab_size=50, hidden_size=64, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_local_experts=4, num_experts_per_tok=2))
    else:
        model = llama.Model(llama.ModelArgs(
            model_type="llama", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50,
            tie_word_embeddings=kind == "tied"))
        if kind == "qllama":
            nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


def convert_and_train(model, convert, num_layers, config, use_dora, steps=3):
    """Adapters as a short training run leaves them (B and m no longer at their init)."""
    convert(model, num_layers, config, use_dora=use_dora)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    opt = optim.Adam(learning_rate=5e-2)
    x = mx.random.randint(0, 50, (2, 12), key=mx.random.key(5))

    def loss(model, x):
        return nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean()

    for _ in range(steps):
        _, g = nn.value_and_grad(model, loss)(model, x)
        opt.update(model, g)
        mx.eval(model.parameters())
    model.eval()
    return model


def save(model, path, num_layers, config, fine_tune_type):
    """What mlx-lm's trainer writes: trainable parameters and the adapter config."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "adapters.safetensors"),
                        dict(tree_flatten(model.trainable_parameters())))
    (path / "adapter_config.json").write_text(json.dumps(
        {"fine_tune_type": fine_tune_type, "num_layers": num_layers,
         "lora_parameters": config}))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("direction", ["tuner_to_mlx_lm", "mlx_lm_to_tuner"])
def test_adapters_interchange(tmp_path, case, direction):
    kind, fine_tune_type, extra = CASES[case]
    config = {"rank": 4, "scale": 8.0, "dropout": 0.0, **extra}
    num_layers = 2
    use_dora = fine_tune_type == "dora"
    writer, reader = (utils, mlx_utils) if direction == "tuner_to_mlx_lm" else (mlx_utils, utils)

    src = convert_and_train(build(kind), writer.linear_to_lora_layers, num_layers, config,
                            use_dora)
    saved = dict(tree_flatten(src.trainable_parameters()))
    assert any(k.endswith("lora_b") for k in saved)
    assert all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for k in saved)
    assert use_dora == any(k.endswith(".m") for k in saved)
    save(src, tmp_path, num_layers, config, fine_tune_type)

    dst = reader.load_adapters(build(kind), str(tmp_path))
    dst.eval()
    loaded = dict(tree_flatten(dst.parameters()))
    for k, v in saved.items():
        assert mx.array_equal(loaded[k], v).item(), k
    x = mx.random.randint(0, 50, (2, 10), key=mx.random.key(9))
    a, b = src(x), dst(x)
    assert not mx.allclose(a, build(kind)(x), atol=1e-3).item()  # the adapters do something
    assert mx.allclose(a, b, atol=2e-5, rtol=1e-5).item(), float(mx.abs(a - b).max())
