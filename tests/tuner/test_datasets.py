"""Datasets: record formats, prompt masking (last turn and every assistant turn), tools,
concatenation, caching, and clear errors for bad files."""

from __future__ import annotations

import json
import types

import pytest

from mlx_tuner import datasets as D


def cfg(**kw):
    return types.SimpleNamespace(**kw)


def test_text_appends_eos(tokenizer):
    ds = D.create_dataset([{"text": "the sky is blue"}], tokenizer, cfg())
    assert isinstance(ds, D.TextDataset)
    toks, off = ds.process(ds[0])
    assert off == 0 and toks[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(toks[:-1]) == "the sky is blue"


def test_completions_mask_prompt_offset(tokenizer):
    rec = {"prompt": "What does a cow say?", "completion": "A cow says moo."}
    ds = D.create_dataset([rec], tokenizer, cfg(mask_prompt=True))
    assert isinstance(ds, D.CompletionsDataset)
    toks, off = ds.process(rec)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": rec["prompt"]}], add_generation_prompt=True)
    assert off == len(prompt) and toks[:off] == list(prompt)
    assert "A cow says moo." in tokenizer.decode(toks[off:])
    assert D.create_dataset([rec], tokenizer, cfg()).process(rec)[1] == 0


def test_custom_feature_names(tokenizer):
    rec = {"q": "hi", "a": "hello"}
    ds = D.create_dataset([rec], tokenizer, cfg(prompt_feature="q", completion_feature="a"))
    assert isinstance(ds, D.CompletionsDataset)


def chat(n_turns=2, tools=None):
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    rec = {"messages": msgs}
    if tools:
        rec["tools"] = tools
    return rec


def test_chat_mask_last_turn(tokenizer):
    rec = chat()
    ds = D.create_dataset([rec], tokenizer, cfg(mask_prompt=True))
    toks, off = ds.process(rec)
    assert "answer 1" in tokenizer.decode(toks[off:]) and "answer 0" not in tokenizer.decode(toks[off:])


def test_chat_all_assistant_turns(tokenizer):
    rec = chat(3)
    ds = D.create_dataset([rec], tokenizer, cfg(mask_prompt=True, all_assistant_turns=True))
    toks, spans = ds.process(rec)
    assert len(spans) == 3
    trained = [tokenizer.decode(toks[s:e]) for s, e in spans]
    for i, text in enumerate(trained):
        assert f"answer {i}" in text and "question" not in text and "be brief" not in text


def test_chat_tools_are_rendered(tokenizer):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    rec = chat(1, tools)
    toks, _ = D.create_dataset([rec], tokenizer, cfg()).process(rec)
    assert "get_weather" in tokenizer.decode(toks)


def test_concatenated_and_cache(tokenizer):
    a = D.create_dataset([{"text": "a b"}, {"text": "c"}], tokenizer, cfg())
    b = D.create_dataset([{"prompt": "p", "completion": "q"}], tokenizer, cfg(mask_prompt=True))
    cat = D.ConcatenatedDataset([a, b])
    assert len(cat) == 3
    assert cat.process(cat[2]) == b.process(b[0])
    assert cat.process(cat[0]) == a.process(a[0])
    cache = D.CacheDataset(cat)
    assert cache[2] == b.process(b[0]) and cache.itemlen(2) == len(b.process(b[0])[0])
    with pytest.raises(IndexError):
        cat[3]


def write(path, lines):
    path.write_text("".join(ln + "\n" for ln in lines))


def test_local_splits(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"text": "x"}), "", json.dumps({"text": "y"})])
    train, valid, test = D.load_local_dataset(tmp_path, tokenizer, cfg())
    assert len(train) == 2 and valid == [] and test == []


def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"text": "x"}), json.dumps({"text": "y"}), '{"text": oops}'])
    with pytest.raises(D.DatasetError, match=r"train\.jsonl:3: malformed JSON"):
        D.load_local_dataset(tmp_path, tokenizer, cfg())


def test_unknown_format(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"foo": 1})])
    with pytest.raises(D.DatasetError, match=r"train\.jsonl:1: unsupported record format with keys \['foo'\]"):
        D.load_local_dataset(tmp_path, tokenizer, cfg())


def test_inconsistent_record(tmp_path, tokenizer):
    write(tmp_path / "train.jsonl", [json.dumps({"text": "a"}), json.dumps({"txt": "b"})])
    with pytest.raises(D.DatasetError, match=r"train\.jsonl:2: record has \['txt'\]"):
        D.load_local_dataset(tmp_path, tokenizer, cfg())


def test_text_with_mask_prompt_rejected(tokenizer):
    with pytest.raises(ValueError, match="Prompt masking not supported"):
        D.create_dataset([{"text": "a"}], tokenizer, cfg(mask_prompt=True))


def test_empty_train_split(tmp_path, tokenizer):
    (tmp_path / "train.jsonl").write_text("\n")
    args = cfg(data=str(tmp_path), train=True, test=False)
    with pytest.raises(D.DatasetError, match="training set .* missing or empty"):
        D.load_dataset(args, tokenizer)
    write(tmp_path / "train.jsonl", [json.dumps({"text": "a"})])
    with pytest.raises(D.DatasetError, match="test set .* missing or empty"):
        D.load_dataset(cfg(data=str(tmp_path), train=False, test=True), tokenizer)


def test_hub_dataset_offline_is_clear(tokenizer, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed here either way
    with pytest.raises(D.DatasetError, match="datasets"):
        D.load_dataset(cfg(data="someone/nonexistent-dataset", train=True, test=False), tokenizer)


def test_shipped_dataset_loads(tokenizer):
    from mlx_tuner import tiny

    train, valid, test = D.load_local_dataset(tiny.SHIPPED_DATASET, tokenizer, cfg(mask_prompt=True))
    assert len(train) >= 150 and len(valid) >= 8 and len(test) >= 8
    toks, off = train.process(train[0])
    assert 0 < off < len(toks)
