"""train(): learning, gradient accumulation, gradient checkpointing, NaN stop, callbacks,
metrics, and exact resume from the full state (in process; the SIGKILL test is separate)."""

from __future__ import annotations

import json
import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_tuner import tiny
from mlx_tuner.callbacks import TrainingCallback
from mlx_tuner.cli.lora import _utils
from mlx_tuner.datasets import CacheDataset, create_dataset, load_local_dataset
from mlx_tuner.trainer import TrainingArgs, TrainingDivergedError, train


def lora_model(config, dropout=0.0, seed=0):
    mx.random.seed(seed)
    np.random.seed(seed)
    model = tiny.build_model(config, seed=0)
    model.freeze()
    _utils().linear_to_lora_layers(model, -1, {"rank": 4, "scale": 4.0, "dropout": dropout})
    return model


def shipped(tokenizer):
    tr, va, _ = load_local_dataset(tiny.SHIPPED_DATASET, tokenizer, types.SimpleNamespace(mask_prompt=True))
    return CacheDataset(tr), CacheDataset(va)


def adapters(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def args(tmp_path, **kw):
    base = dict(batch_size=4, iters=6, steps_per_report=2, steps_per_eval=3, val_batches=2, steps_per_save=100,
                adapter_file=str(tmp_path / "adapters.safetensors"), progress=False)
    base.update(kw)
    return TrainingArgs(**base)


def test_training_args_match_mlx_lm():
    from dataclasses import fields

    from mlx_lm.tuner.trainer import TrainingArgs as Theirs

    ours = {f.name: (f.default, f.metadata.get("help")) for f in fields(TrainingArgs)}
    for f in fields(Theirs):
        assert ours[f.name] == (f.default, f.metadata.get("help")), f.name


def test_loss_falls_and_metrics_and_callbacks(tmp_path, tiny_parts, tokenizer):
    model = lora_model(tiny_parts[1])
    tr, va = shipped(tokenizer)
    seen = {"train": [], "val": []}

    class CB(TrainingCallback):
        def on_train_loss_report(self, info):
            seen["train"].append(info)

        def on_val_loss_report(self, info):
            seen["val"].append(info)

    metrics = tmp_path / "m.jsonl"
    a = args(tmp_path, iters=40, steps_per_report=10, steps_per_eval=20, metrics_file=str(metrics))
    train(model, optim.Adam(learning_rate=3e-3), tr, va, a, training_callback=CB())
    losses = [r["train_loss"] for r in seen["train"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    assert [r["iteration"] for r in seen["val"]] == [0, 19, 39]
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["type"] for r in rows].count("train") == 4 and rows[-1]["tokens_per_second"] > 0
    assert {"iteration", "train_loss", "learning_rate", "tokens_per_second", "peak_memory", "trained_tokens"} <= set(rows[-1])
    saved = mx.load(a.adapter_file)
    assert set(saved) == set(adapters(model))
    assert (tmp_path / "training_state.safetensors").exists()


def equal_length_data(tokenizer, n=4):
    recs = [{"text": f"w{i} w{i} w{i}"} for i in range(n)]
    ds = create_dataset(recs, tokenizer, types.SimpleNamespace())
    assert len({len(ds.process(r)[0]) for r in recs}) == 1
    return CacheDataset(ds)


def test_grad_accumulation_equals_big_batch(tmp_path, tiny_parts, tokenizer):
    data = equal_length_data(tokenizer)
    runs = []
    for bs, accum, iters in [(4, 1, 1), (2, 2, 2)]:
        model = lora_model(tiny_parts[1])
        train(model, optim.SGD(learning_rate=0.5), data, None,
              args(tmp_path, batch_size=bs, grad_accumulation_steps=accum, iters=iters))
        runs.append(adapters(model))
    for k in runs[0]:
        np.testing.assert_allclose(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert any(np.abs(runs[0][k]).max() > 0 for k in runs[0] if k.endswith("lora_b"))


def test_grad_checkpoint_same_result_and_classes_restored(tmp_path, tiny_parts, tokenizer):
    tr, _ = shipped(tokenizer)
    out = []
    for gc in (False, True):
        model = lora_model(tiny_parts[1])
        cls = type(model.layers[0])
        train(model, optim.Adam(learning_rate=1e-3), tr, None, args(tmp_path, iters=3, grad_checkpoint=gc))
        assert type(model.layers[0]) is cls
        out.append(adapters(model))
    for k in out[0]:
        np.testing.assert_allclose(out[0][k], out[1][k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_parts, tokenizer):
    tr, _ = shipped(tokenizer)
    model = lora_model(tiny_parts[1])

    class Poison(TrainingCallback):  # a weight turns NaN after iteration 5 (between saves)
        def on_train_loss_report(self, info):
            if info["iteration"] == 5:
                lin = model.layers[0].self_attn.q_proj
                lin.lora_b = mx.full(lin.lora_b.shape, float("nan"))

    a = args(tmp_path, iters=10, steps_per_save=2, steps_per_report=1)
    with pytest.raises(TrainingDivergedError, match=r"became nan at iteration 6.*iteration 4"):
        train(model, optim.Adam(learning_rate=1e-3), tr, None, a, training_callback=Poison())
    good = mx.load(str(tmp_path / "0000004_adapters.safetensors"))
    last = mx.load(a.adapter_file)
    assert all(np.array_equal(np.array(good[k]), np.array(last[k])) for k in good)
    assert all(np.isfinite(np.array(v)).all() for v in last.values())
    assert not (tmp_path / "0000006_adapters.safetensors").exists()


class Stop(Exception):
    pass


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_is_exact(tmp_path, tiny_parts, tokenizer, accum):
    """Stopped after the save at iteration 3 (dropout, validation and accumulation on), a
    resumed run ends with the very adapters and optimizer state of an uninterrupted one."""
    tr, va = shipped(tokenizer)
    kw = dict(iters=9, steps_per_save=3, steps_per_report=1, steps_per_eval=4, grad_accumulation_steps=accum)

    model = lora_model(tiny_parts[1], dropout=0.1)
    opt = optim.Adam(learning_rate=2e-3)
    train(model, opt, tr, va, args(tmp_path / "full", **kw))
    want = adapters(model)

    class Killer(TrainingCallback):
        def on_train_loss_report(self, info):
            if info["iteration"] == 5:
                raise Stop

    model = lora_model(tiny_parts[1], dropout=0.1)
    with pytest.raises(Stop):
        train(model, optim.Adam(learning_rate=2e-3), tr, va, args(tmp_path / "cut", **kw), training_callback=Killer())
    # a fresh process: other random states, a new model and optimizer
    mx.random.seed(123)
    np.random.seed(123)
    model = lora_model(tiny_parts[1], dropout=0.1, seed=5)
    opt2 = optim.Adam(learning_rate=2e-3)
    train(model, opt2, tr, va, args(tmp_path / "cut", resume=True, **kw))
    got = adapters(model)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert int(opt2.state["step"]) == int(opt.state["step"])
