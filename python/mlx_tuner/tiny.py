"""A tiny Llama-style model and a tokenizer built offline: what the demo, the tests and the
training benchmark run on, with no download.

The model is mlx-lm's own ``mlx_lm.models.llama.Model``; the tokenizer is a byte-level BPE
trained with the ``tokenizers`` library on the text it is given (by default the dataset
shipped in ``mlx_tuner/data``), wrapped as a ``PreTrainedTokenizerFast`` with a small chat
template and then in mlx-lm's ``TokenizerWrapper``, so ``mlx_lm.generate`` works on it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

DATA_DIR = Path(__file__).parent / "data"
SHIPPED_DATASET = DATA_DIR / "facts"

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|tool|>", "<|end|>"]

# Role markers, the content, then <|end|>; tools (if any) are listed first as JSON.
CHAT_TEMPLATE = (
    "{% if tools %}<|tool|>{{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def shipped_texts(path: Path = SHIPPED_DATASET) -> list[str]:
    """Every string of every record of the shipped dataset (tokenizer training text)."""
    texts = []
    for f in sorted(Path(path).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                texts.extend(str(v) for v in json.loads(line).values() if isinstance(v, str))
    return texts


def build_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 512):
    """A byte-level BPE trained on ``texts``, as a transformers ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts) if texts is not None else shipped_texts()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def wrap_tokenizer(hf_tokenizer):
    """mlx-lm's TokenizerWrapper around a transformers tokenizer (generate, stream, eos)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    end = hf_tokenizer.convert_tokens_to_ids("<|end|>")
    return TokenizerWrapper(hf_tokenizer, eos_token_ids=[end])


def model_config(vocab_size: int, **overrides) -> dict:
    cfg = dict(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=4,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab_size,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    )
    cfg.update(overrides)
    return cfg


def build_model(config: dict, seed: int = 0):
    """mlx-lm's Llama with freshly initialised weights (deterministic for a seed)."""
    from mlx_lm.models import llama

    args = llama.ModelArgs(**{k: v for k, v in config.items() if k in llama.ModelArgs.__dataclass_fields__})
    from .checkpoint import get_rng_key, set_rng_key

    saved = get_rng_key()  # leave the caller's random stream untouched
    mx.random.seed(seed)
    model = llama.Model(args)
    mx.eval(model.parameters())
    set_rng_key(saved)
    return model


def build(vocab_size: int = 512, seed: int = 0, texts=None, **overrides):
    """(model, TokenizerWrapper, config) of a tiny Llama on the shipped dataset's BPE."""
    hf = build_tokenizer(texts, vocab_size)
    config = model_config(len(hf), **overrides)
    return build_model(config, seed), wrap_tokenizer(hf), config


def save(path, model, tokenizer, config) -> Path:
    """Write a model folder that ``mlx_lm.utils.load`` (and ``mlx-tuner lora --model``) reads."""
    from mlx_lm.utils import save_config, save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(config), path / "config.json")
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    hf.save_pretrained(str(path))
    # mlx-lm reads eos_token_id from config.json too: make <|end|> stop generation there.
    cfg = json.loads((path / "config.json").read_text())
    cfg["eos_token_id"] = [hf.eos_token_id, hf.convert_tokens_to_ids("<|end|>")]
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path
