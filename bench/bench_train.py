"""End-to-end training: LoRA, DoRA and QLoRA tokens/s and peak memory, mlx-tuner
("fused": mlx_tuner.trainer.train with mlx-tuner's layers) against mlx-lm ("reference":
mlx_lm.tuner.trainer.train with mlx_lm's layers) on the same tiny Llama, data, seed and
loss, in one run. The loss curves must agree; they are drawn overlaid in
bench/results/train_loss.png.

    PYTHONPATH=python python -m pytest bench/bench_train.py --benchmark-json=bench/results/train.json
"""

from __future__ import annotations

import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from common import QUICK, annotate, read_peak, reset_peak, run

from mlx_tuner import tiny
from mlx_tuner.datasets import CacheDataset, load_local_dataset
from mlx_tuner.trainer import default_loss

ITERS = 4 if QUICK else 30
SHAPE = dict(hidden_size=128 if QUICK else 256, num_hidden_layers=2 if QUICK else 4,
             intermediate_size=256 if QUICK else 768, num_attention_heads=4, num_key_value_heads=2)
BATCH = 8
RESULTS = Path(__file__).parent / "results"
CURVES: dict = {}


def _layers(provider):
    if provider == "reference":
        from mlx_lm.tuner.utils import linear_to_lora_layers
    else:
        from mlx_tuner.utils import linear_to_lora_layers
    return linear_to_lora_layers


def _setup(method, provider):
    mx.random.seed(0)
    np.random.seed(0)
    hf = tiny.build_tokenizer(vocab_size=512)
    config = tiny.model_config(len(hf), **SHAPE)
    model = tiny.build_model(config, seed=0)
    if method == "qlora":
        nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    _layers(provider)(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0}, use_dora=method == "dora")
    data, _, _ = load_local_dataset(tiny.SHIPPED_DATASET, tiny.wrap_tokenizer(hf), types.SimpleNamespace(mask_prompt=False))
    return model, CacheDataset(data)


def _train(method, provider, tmp):
    model, data = _setup(method, provider)
    curve, tokens = [], [0]

    if provider == "reference":
        from mlx_lm.tuner.callbacks import TrainingCallback
        from mlx_lm.tuner.trainer import TrainingArgs, train
        extra = {}
    else:
        from mlx_tuner.callbacks import TrainingCallback
        from mlx_tuner.trainer import TrainingArgs, train
        extra = {"progress": False}

    class Keep(TrainingCallback):
        def on_train_loss_report(self, info):
            curve.append(float(info["train_loss"]))
            tokens[0] = info["trained_tokens"]

    args = TrainingArgs(batch_size=BATCH, iters=ITERS, steps_per_report=1, steps_per_eval=10**6,
                        steps_per_save=10**6, adapter_file=str(tmp / f"{method}-{provider}.safetensors"), **extra)
    np.random.seed(0)  # both trainers draw their data order from numpy's global generator
    reset_peak()
    tic = time.perf_counter()
    train(model=model, optimizer=optim.Adam(learning_rate=1e-3), train_dataset=data, args=args,
          loss=default_loss, training_callback=Keep())
    seconds = time.perf_counter() - tic
    return curve, tokens[0] / seconds, read_peak()


@pytest.mark.parametrize("provider", ["reference", "fused"])
@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_train(benchmark, method, provider, tmp_path):
    out = {}

    def once():
        out["curve"], out["tps"], out["peak"] = _train(method, provider, tmp_path)
        return mx.array(0)

    run(benchmark, once, rounds=1, warmup=0)
    CURVES[(method, provider)] = out["curve"]
    annotate(benchmark, op=f"train_{method}", provider=provider, mode="fwd+bwd+update", dtype=mx.float32,
             shape={**SHAPE, "batch": BATCH, "iters": ITERS}, peak_bytes=int(out["peak"]),
             tokens_per_second=out["tps"])
    print(f"\n{method:6s} {provider:9s} {out['tps']:9.1f} tokens/s  peak {out['peak'] / 2**20:7.1f} MiB  "
          f"loss {out['curve'][0]:.3f} -> {out['curve'][-1]:.3f}")
    other = CURVES.get((method, "reference" if provider == "fused" else "fused"))
    if other is not None:  # same model, data, order and loss: the curves must agree
        np.testing.assert_allclose(out["curve"], other, rtol=2e-3, atol=2e-3)
        _plot()


def _plot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot")
        return
    methods = sorted({m for m, _ in CURVES})
    fig, axes = plt.subplots(1, len(methods), figsize=(4.5 * len(methods), 3.5), squeeze=False)
    for ax, m in zip(axes[0], methods):
        for p, style in [("reference", "-"), ("fused", "--")]:
            if (m, p) in CURVES:
                label = "mlx_lm.lora" if p == "reference" else "mlx-tuner"
                ax.plot(range(1, len(CURVES[m, p]) + 1), CURVES[m, p], style, label=label)
        ax.set_title(m)
        ax.set_xlabel("iteration")
        ax.set_ylabel("train loss")
        ax.legend()
    fig.tight_layout()
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(RESULTS / "train_loss.png", dpi=100)
    plt.close(fig)
