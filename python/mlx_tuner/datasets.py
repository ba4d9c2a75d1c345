"""Datasets for fine-tuning, as in ``mlx_lm.tuner.datasets``: same classes, arguments and
record formats (``text``; ``messages`` with optional ``tools``; ``prompt`` + ``completion``).

``process(record)`` returns ``(tokens, offset)``: the loss covers tokens from ``offset`` on
(prompt masking). Beyond mlx-lm, ``ChatDataset(all_assistant_turns=True)`` trains every
assistant turn of a multi-turn chat: ``process`` then returns ``(tokens, spans)`` with the
``[start, end)`` token ranges of the assistant turns, and the batches carry a loss mask.
Bad input fails early with the file and line (``DatasetError``, a ``ValueError``).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

DOCS = "text, messages (+ tools), or prompt + completion; see mlx-lm's LORA.md#Data"


class DatasetError(ValueError):
    """A user's data is unusable; the message names the file/record and what is wrong."""


def _info(*args) -> None:
    import mlx.core as mx

    if mx.distributed.init().rank() == 0:
        print(*args, file=sys.stderr)


def _chat_tokens(tokenizer, messages, tools=None, add_generation_prompt=False) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    return list(out)


class _Records:
    def __init__(self, data):
        self._data = data

    def __getitem__(self, idx: int):
        return self._data[idx]

    def __len__(self) -> int:
        return len(self._data)


class TextDataset(_Records):
    """Records ``{"text": ...}``: the whole text is trained; an EOS is appended if missing."""

    def __init__(self, data: list[dict[str, str]], tokenizer, text_key: str = "text"):
        super().__init__(data)
        self.tokenizer = tokenizer
        self.text_key = text_key

    def process(self, d):
        tokens = list(self.tokenizer.encode(d[self.text_key]))
        eos = self.tokenizer.eos_token_id
        if eos is not None and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return (tokens, 0)


class ChatDataset(_Records):
    """Records ``{"messages": [...], "tools": [...]?}`` rendered by the chat template.

    ``mask_prompt``: train only the last message (mlx-lm). ``all_assistant_turns`` (ours):
    train every assistant message and nothing else.
    """

    def __init__(self, data, tokenizer, chat_key: str = "messages", mask_prompt: bool = False,
                 all_assistant_turns: bool = False):
        super().__init__(data)
        self.tokenizer = tokenizer
        self.chat_key = chat_key
        self.mask_prompt = mask_prompt
        self.all_assistant_turns = all_assistant_turns

    def process(self, d):
        messages, tools = d[self.chat_key], d.get("tools", None)
        tokens = _chat_tokens(self.tokenizer, messages, tools)
        if self.all_assistant_turns:
            spans = []
            for i, m in enumerate(messages):
                if m.get("role") != "assistant":
                    continue
                start = len(_chat_tokens(self.tokenizer, messages[:i], tools, True)) if i else 0
                end = len(_chat_tokens(self.tokenizer, messages[: i + 1], tools))
                spans.append((start, end))
            return (tokens, spans)
        if not self.mask_prompt:
            return (tokens, 0)
        gen_prompt = messages[-1].get("role") == "assistant"
        return (tokens, len(_chat_tokens(self.tokenizer, messages[:-1], tools, gen_prompt)))


class CompletionsDataset(_Records):
    """Records ``{prompt_key: ..., completion_key: ...}`` as a user/assistant exchange."""

    def __init__(self, data, tokenizer, prompt_key: str, completion_key: str, mask_prompt: bool):
        super().__init__(data)
        self.tokenizer = tokenizer
        self.prompt_key = prompt_key
        self.completion_key = completion_key
        self.mask_prompt = mask_prompt

    def process(self, d):
        tools = d.get("tools", None)
        messages = [
            {"role": "user", "content": d[self.prompt_key]},
            {"role": "assistant", "content": d[self.completion_key]},
        ]
        tokens = _chat_tokens(self.tokenizer, messages, tools)
        if not self.mask_prompt:
            return (tokens, 0)
        return (tokens, len(_chat_tokens(self.tokenizer, messages[:1], tools, True)))


class ConcatenatedDataset:
    """Several datasets end to end; each record is processed by the dataset it came from."""

    def __init__(self, data: list[Any]):
        self._data = list(data)
        self._len = sum(len(d) for d in self._data)

    def _locate(self, idx: int):
        if idx < 0:
            idx += self._len
        for k, part in enumerate(self._data):
            if idx < len(part):
                return k, idx
            idx -= len(part)
        raise IndexError("ConcatenatedDataset index out of range")

    def __getitem__(self, idx: int):
        k, j = self._locate(idx)
        record = self._data[k][j]
        record = dict(record) if isinstance(record, dict) else record
        record["_dataset"] = k
        return record

    def process(self, d):
        return self._data[d["_dataset"]].process(d)

    def __len__(self) -> int:
        return self._len


class CacheDataset:
    """Processes each record once, on first access. ``itemlen`` is its token count (mlx-lm
    returns the record's key count there, which makes its length sort a no-op)."""

    def __init__(self, data: Any):
        self._data = data
        self._proc_data = [None] * len(data)

    def itemlen(self, idx: int) -> int:
        return len(self[idx][0])

    def __getitem__(self, idx: int):
        if self._proc_data[idx] is None:
            self._proc_data[idx] = self._data.process(self._data[idx])
        return self._proc_data[idx]

    def __len__(self) -> int:
        return len(self._data)


def _where(source, line_numbers, i) -> str:
    if line_numbers is not None:
        return f"{source or 'data'}:{line_numbers[i]}"
    return f"{source + ' ' if source else ''}record {i}"


def create_dataset(data, tokenizer, config, *, source: str | None = None, line_numbers=None):
    """The dataset class that fits the first record; every record is checked for its keys."""
    mask_prompt = getattr(config, "mask_prompt", False)
    prompt_feature = getattr(config, "prompt_feature", "prompt")
    text_feature = getattr(config, "text_feature", "text")
    completion_feature = getattr(config, "completion_feature", "completion")
    chat_feature = getattr(config, "chat_feature", "messages")
    all_turns = getattr(config, "all_assistant_turns", False) or False
    if len(data) == 0:
        raise DatasetError(f"{source or 'dataset'}: no records")
    sample = data[0]
    if not isinstance(sample, dict):
        raise DatasetError(f"{_where(source, line_numbers, 0)}: a record must be a JSON object, got {type(sample).__name__}")
    if prompt_feature in sample and completion_feature in sample:
        needed = (prompt_feature, completion_feature)
        ds = CompletionsDataset(data, tokenizer, prompt_feature, completion_feature, mask_prompt)
    elif chat_feature in sample:
        needed = (chat_feature,)
        ds = ChatDataset(data, tokenizer, chat_key=chat_feature, mask_prompt=mask_prompt,
                         all_assistant_turns=all_turns)
    elif text_feature in sample:
        if mask_prompt:
            raise DatasetError("Prompt masking not supported for text dataset.")
        needed = (text_feature,)
        ds = TextDataset(data, tokenizer, text_key=text_feature)
    else:
        raise DatasetError(
            f"{_where(source, line_numbers, 0)}: unsupported record format with keys "
            f"{sorted(sample)}; expected {DOCS}"
        )
    if isinstance(data, list):  # Hugging Face datasets are checked by their own schema
        for i, rec in enumerate(data):
            if not isinstance(rec, dict) or any(k not in rec for k in needed):
                keys = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
                raise DatasetError(
                    f"{_where(source, line_numbers, i)}: record has {keys}, expected keys {list(needed)} like the first record"
                )
    return ds


def _read_jsonl(path: Path) -> tuple[list, list[int]]:
    records, lines = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
        lines.append(n)
    return records, lines


def load_local_dataset(data_path: Path, tokenizer, config):
    """``(train, valid, test)`` from ``data_path/{train,valid,test}.jsonl``; a missing or
    empty file gives ``[]``."""

    def load_subset(path: Path):
        if not path.exists():
            return []
        data, lines = _read_jsonl(path)
        if not data:
            return []
        return create_dataset(data, tokenizer, config, source=str(path), line_numbers=lines)

    data_path = Path(data_path)
    return tuple(load_subset(data_path / f"{n}.jsonl") for n in ("train", "valid", "test"))


def _hf_datasets():
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            "loading a Hugging Face dataset needs the `datasets` package: pip install datasets"
        ) from None
    return datasets


def load_hf_dataset(data_id: str, tokenizer, config):
    """``(train, valid, test)`` of a Hugging Face Hub dataset (its train/valid/test splits)."""
    datasets = _hf_datasets()
    try:
        dataset = datasets.load_dataset(data_id)
    except Exception as e:  # not found, or offline: say which, in one line
        kind = type(e).__name__
        raise DatasetError(
            f"cannot load Hugging Face dataset {data_id!r} ({kind}: {str(e).splitlines()[0] if str(e) else ''}); "
            "is it a local folder that does not exist, or is the Hub unreachable?"
        ) from None
    return tuple(
        create_dataset(dataset[n], tokenizer, config, source=f"{data_id}[{n}]") if n in dataset.keys() else []
        for n in ("train", "valid", "test")
    )


def load_custom_hf_dataset(args, tokenizer):
    """Datasets listed under ``hf_dataset`` in the config (one dict or a list), with their
    own keys and split expressions; several are concatenated split by split."""
    datasets = _hf_datasets()

    def split_of(path, config, split, hf_config):
        try:
            ds = datasets.load_dataset(path, split=split, **hf_config)
        except Exception as e:
            raise DatasetError(f"cannot load Hugging Face dataset {path!r} split {split!r} ({type(e).__name__}: {e})") from None
        return create_dataset(ds, tokenizer, config, source=f"{path}[{split}]")

    collection_cfg = args.hf_dataset
    if isinstance(collection_cfg, dict):
        collection_cfg = [collection_cfg]
    collection = []
    for ds in collection_cfg:
        ds = dict(ds)
        path = ds["path"]
        _info(f"Loading Hugging Face dataset {path}.")
        ds["mask_prompt"] = getattr(args, "mask_prompt", False)
        config = types.SimpleNamespace(**ds)
        hf_config = ds.get("config", {})
        train = valid = test = []
        if args.train:
            train = split_of(path, config, ds.get("train_split", "train[:80%]"), hf_config)
            valid = split_of(path, config, ds.get("valid_split", "train[-10%:]"), hf_config)
        if args.test:
            test = split_of(path, config, ds.get("test_split"), hf_config)
        collection.append((train, valid, test))
    if len(collection) == 1:
        return collection[0]
    return tuple(map(ConcatenatedDataset, zip(*collection)))


def load_dataset(args, tokenizer):
    """``(train, valid, test)`` from ``args.hf_dataset``, a local folder ``args.data`` or a
    Hub dataset id; errors when a split the run needs is empty."""
    if getattr(args, "hf_dataset", False):
        train, valid, test = load_custom_hf_dataset(args, tokenizer)
        where = "hf_dataset"
    else:
        data_path = Path(args.data)
        where = str(data_path)
        if data_path.exists():
            if not data_path.is_dir():
                raise DatasetError(f"{data_path}: --data must be a folder holding train.jsonl, valid.jsonl, test.jsonl")
            train, valid, test = load_local_dataset(data_path, tokenizer, args)
        else:
            _info(f"Loading Hugging Face dataset {args.data}.")
            train, valid, test = load_hf_dataset(args.data, tokenizer, args)
    if args.train and len(train) == 0:
        raise DatasetError(f"{where}: the training set (train.jsonl) is missing or empty; it is needed for --train")
    if args.train and len(valid) == 0:
        _info("Warning: Validation set not found or empty. Training will proceed without validation.")
    if getattr(args, "test", False) and len(test) == 0:
        raise DatasetError(f"{where}: the test set (test.jsonl) is missing or empty; it is needed for --test")
    return train, valid, test
