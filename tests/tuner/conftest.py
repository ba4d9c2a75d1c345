"""Fixtures of the training tests: a tiny Llama + offline tokenizer, saved once per session."""

from __future__ import annotations

import pytest

SMALL = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
             num_key_value_heads=1, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_parts():
    from mlx_tuner import tiny

    hf = tiny.build_tokenizer(vocab_size=SMALL["vocab_size"])
    config = tiny.model_config(len(hf), **{k: v for k, v in SMALL.items() if k != "vocab_size"})
    return hf, config


@pytest.fixture
def tokenizer(tiny_parts):
    from mlx_tuner import tiny

    return tiny.wrap_tokenizer(tiny_parts[0])


@pytest.fixture
def tiny_model(tiny_parts):
    from mlx_tuner import tiny

    return tiny.build_model(tiny_parts[1], seed=0)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tiny_parts):
    from mlx_tuner import tiny

    hf, config = tiny_parts
    path = tmp_path_factory.mktemp("tiny-model")
    tiny.save(path, tiny.build_model(config, seed=0), tiny.wrap_tokenizer(hf), config)
    return path
