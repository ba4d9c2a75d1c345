"""End-to-end training: LoRA, DoRA and QLoRA tokens/s and peak memory, mlx-tuner
("fused": mlx_tuner.trainer.train with mlx-tuner's layers) against mlx-lm ("reference":
mlx_lm.tuner.trainer.train with mlx_lm's layers) on the same model, data, seed and
loss, in one run. The loss curves must agree; they are drawn overlaid in
bench/results/train_loss<-config>.png. Peak memory: MLX's counter (plus, on CUDA, the
peak of mlx-tuner's own allocations: an upper bound) and, on CUDA, the device pool's
high-water mark over a few more steps with the caches off (one counter for both).

MLX_TUNER_BENCH_TRAIN picks the model: "tiny" (default; the shipped dataset, CPU),
"tinyllama" (TinyLlama-1.1B shape, random bf16 weights, batch 8 x 512 tokens of _Bigrams),
"qwen3" (Qwen3-0.6B shape, vocabulary 151,936, tied embeddings, batch 4 x 1024) or
"llama8b" (Llama-3-8B shape, vocabulary 128,256, batch 4 x 512, 15 iterations); the last
three are for the H200 (bench/device-run train, TRAIN_CONFIGS).

    PYTHONPATH=python python -m pytest bench/bench_train.py --benchmark-json=bench/results/train.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest

from common import QUICK, annotate, cuda_ext, device_pool_peak, read_peak, reset_peak, run
from mlx_tuner import tiny
from mlx_tuner.datasets import CacheDataset, load_local_dataset
from mlx_tuner.trainer import default_loss

CONFIG = os.environ.get("MLX_TUNER_BENCH_TRAIN", "tiny")
ITERS = 4 if QUICK else 30
SHAPE = dict(hidden_size=128 if QUICK else 256, num_hidden_layers=2 if QUICK else 4,
             intermediate_size=256 if QUICK else 768, num_attention_heads=4, num_key_value_heads=2)
BATCH = 8
SEQ = None  # the shipped dataset's own lengths
DTYPE = mx.float32
if CONFIG == "tinyllama":
    SHAPE = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                 tie_word_embeddings=False, max_position_embeddings=2048)
    BATCH, SEQ, ITERS, DTYPE = 8, 512, 25, mx.bfloat16
elif CONFIG == "qwen3":
    SHAPE = dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, intermediate_size=3072,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1e6)
    BATCH, SEQ, ITERS, DTYPE = 4, 1024, 25, mx.bfloat16
elif CONFIG == "llama8b":
    SHAPE = dict(hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=5e5)
    BATCH, SEQ, ITERS, DTYPE = 4, 512, 15, mx.bfloat16
# Adam's step size: on the learnable rows of the GPU configurations 1e-3 made the loss
# jump (a spike at step 14 in a small model), after which two runs follow different
# trajectories whatever their kernels; 2e-4 learns smoothly.
LR = float(os.environ.get("MLX_TUNER_BENCH_LR", 1e-3 if SEQ is None else 2e-4))
RESULTS = Path(__file__).parent / "results"
CURVES: dict = {}
HELDOUT: dict = {}


def _layers(provider):
    if provider == "reference":
        from mlx_lm.tuner.utils import linear_to_lora_layers
    else:
        from mlx_tuner.utils import linear_to_lora_layers
    return linear_to_lora_layers


def _random_model():
    """A model of the configured shape with random weights in DTYPE (no tokenizer needed)."""
    from mlx_lm.models import llama, qwen3

    module = qwen3 if SHAPE.get("model_type") == "qwen3" else llama
    cfg = {"model_type": "llama", "rms_norm_eps": 1e-6, **SHAPE}
    args = module.ModelArgs(**{k: v for k, v in cfg.items() if k in module.ModelArgs.__dataclass_fields__})
    mx.random.seed(0)
    model = module.Model(args)
    model.set_dtype(DTYPE)
    mx.eval(model.parameters())
    return model


class _Bigrams:
    """n rows of SEQ + 1 tokens from a fixed 16-token subset of the vocabulary, each token
    followed by its successor in a fixed random cycle through the subset, or, one time in
    four, by a random subset token: the loss can fall from ln V to 1.18 nats. The same rows
    for both providers. A random-weight model learns this within a few steps (a 4-layer,
    256-wide Llama in bf16 on the CPU: 10.64 -> 8.1 in 25 steps), so the two runs' curves
    and held-out losses compare learning, not noise: on uniformly random tokens the whole
    decrease over 25 steps was ~0.04, within the step-to-step noise."""

    SUBSET, NOISE = 16, 0.25

    def __init__(self, n, vocab, seed=0):
        shared = np.random.default_rng(12345)  # the task, the same for every row set
        self.tokens = shared.choice(vocab, self.SUBSET, replace=False)
        self.next = np.roll(np.arange(self.SUBSET), -1)[shared.permutation(self.SUBSET)]
        rng = np.random.default_rng(seed)
        self.rows = [self._row(rng) for _ in range(n)]

    def _row(self, rng):
        i = np.empty(SEQ + 1, np.int64)
        i[0] = rng.integers(self.SUBSET)
        noise = rng.random(SEQ) < self.NOISE
        jumps = rng.integers(self.SUBSET, size=SEQ)
        for t in range(SEQ):
            i[t + 1] = jumps[t] if noise[t] else self.next[i[t]]
        return self.tokens[i].tolist()

    def __getitem__(self, i):
        return self.rows[i], 0

    def itemlen(self, i):
        return len(self.rows[i])

    def __len__(self):
        return len(self.rows)


def _setup(method, provider):
    mx.random.seed(0)
    np.random.seed(0)
    if SEQ is not None:
        model = _random_model()
    else:
        hf = tiny.build_tokenizer(vocab_size=512)
        model = tiny.build_model(tiny.model_config(len(hf), **SHAPE), seed=0)
    if method in ("qlora", "qdora"):
        nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    _layers(provider)(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0},
                      use_dora=method in ("dora", "qdora"))
    if SEQ is not None:
        return model, _Bigrams(BATCH * (ITERS + 2), SHAPE["vocab_size"])
    data, _, _ = load_local_dataset(tiny.SHIPPED_DATASET, tiny.wrap_tokenizer(hf), types.SimpleNamespace(mask_prompt=False))
    return model, CacheDataset(data)


def _mlx_lm_loss_same_targets(model, batch, lengths):
    """mlx-lm's own loss (its logits, its cross-entropy) on the targets mlx-tuner trains.
    mlx-lm's mask ends at ``<= length`` and so also trains the first padding token of
    every row: here one target in 513, which a model learns to predict within a few steps,
    so that mlx-lm's curve sat ~0.01-0.02 below ours for a reason outside both kernels."""
    from mlx_lm.tuner.trainer import default_loss as mlx_lm_loss

    return mlx_lm_loss(model, batch, lengths - mx.array([0, 1]))


def _train(method, provider, tmp, iters=ITERS, on_start=None, score=True):
    """(loss curve, tokens/s, MLX peak, held-out loss or None without `score`; the device
    peak's run leaves the scoring out, whose float32 logits would land in its window)."""
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

    marks = []  # (seconds, trained tokens) at each report

    class Keep(TrainingCallback):
        def on_train_loss_report(self, info):
            curve.append(float(info["train_loss"]))
            tokens[0] = info["trained_tokens"]
            marks.append((time.perf_counter(), info["trained_tokens"]))

    loss = default_loss
    if SEQ is not None and provider == "reference":
        loss = _mlx_lm_loss_same_targets

    args = TrainingArgs(batch_size=BATCH, iters=iters, steps_per_report=1, steps_per_eval=10**6,
                        steps_per_save=10**6, adapter_file=str(tmp / f"{method}-{provider}.safetensors"), **extra)
    np.random.seed(0)  # both trainers draw their data order from numpy's global generator
    reset_peak()
    if on_start is not None:
        on_start()
    tic = time.perf_counter()
    train(model=model, optimizer=optim.Adam(learning_rate=LR), train_dataset=data, args=args,
          loss=loss, training_callback=Keep())
    seconds = time.perf_counter() - tic
    peak = read_peak()
    tps = tokens[0] / seconds
    if SEQ is not None and len(marks) > 6:  # steady state: leave out compilation and warm-up
        (t0, n0), (t1, n1) = marks[4], marks[-1]
        tps = (n1 - n0) / (t1 - t0)
    return curve, tps, peak, _heldout_loss(model) if score else None


def _heldout_loss(model):
    """The trained model's mean cross-entropy on BATCH rows neither run trained on, the
    logits in float32: one yardstick for both runs. The training curves are not quite
    that: mlx-lm's loss takes the cross-entropy of bf16 logits (its values rounded to bf16,
    a step of 0.0625 near 10), mlx-tuner's accumulates in float32."""
    if SEQ is not None:
        rows = mx.array(_Bigrams(BATCH, SHAPE["vocab_size"], seed=1).rows)
    else:
        hf = tiny.build_tokenizer(vocab_size=512)
        encoded = [hf.encode(f"held-out row {i}: the quick brown fox jumps over the lazy dog") for i in range(BATCH)]
        rows = mx.array([e[: min(map(len, encoded))] for e in encoded])
    model.eval()
    logits = model(rows[:, :-1]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, rows[:, 1:], reduction="mean")
    return float(ce.item())


def _device_peak(method, provider, tmp):
    """(peaks, start): the peak bytes in use on the CUDA device over a few training steps,
    one per run, and the bytes in use when they started (the model's weights), one counter
    for MLX's buffers and mlx-tuner's alike (the default memory pool both allocate from),
    with both caches off so that freed buffers count as free. Each run is a fresh process:
    one that has trained before still holds some of that run's device memory, which a
    later run may or may not reuse. The peak varies by ~0.5 GB from process to process (how
    far the host runs ahead of the GPU decides what is live at once), so
    MLX_TUNER_BENCH_PEAK_RUNS (default 1) runs it that many times. (None, None) off CUDA."""
    if cuda_ext() is None:
        return None, None
    env = {**os.environ, "MLX_TUNER_BENCH_TRAIN": CONFIG}
    peaks, start = [], None
    for _ in range(max(1, int(os.environ.get("MLX_TUNER_BENCH_PEAK_RUNS", "1")))):
        done = subprocess.run([sys.executable, __file__, method, provider, str(tmp)], env=env,
                              capture_output=True, text=True, timeout=600)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("DEVICE_PEAK ")]
        if done.returncode != 0 or not lines:
            raise RuntimeError(f"the device-peak run failed ({done.returncode}):\n{done.stderr[-3000:]}")
        peak, start = json.loads(lines[-1][len("DEVICE_PEAK "):])
        peaks.append(peak)
    return peaks, start


def _device_peak_here(method, provider, tmp):
    """The measurement _device_peak runs in its fresh process."""
    start = []
    with device_pool_peak() as pool:
        if pool is None:
            return None, None
        reset, high = pool
        _train(method, provider, tmp, iters=3, on_start=lambda: start.append(reset()), score=False)
        return high(), start[0]


@pytest.mark.parametrize("provider", ["reference", "fused"])
@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "qdora"])
def test_train(benchmark, method, provider, tmp_path):
    out = {}

    def once():
        out["curve"], out["tps"], out["peak"], out["heldout"] = _train(method, provider, tmp_path)
        return mx.array(0)

    run(benchmark, once, rounds=1, warmup=0)
    device_peaks, device_start = _device_peak(method, provider, tmp_path)
    device_peak = int(np.median(device_peaks)) if device_peaks else None
    CURVES[(method, provider)] = out["curve"]
    HELDOUT[(method, provider)] = out["heldout"]
    annotate(benchmark, op=f"train_{method}", provider=provider, mode="fwd+bwd+update", dtype=DTYPE,
             shape={**SHAPE, "batch": BATCH, "seq": SEQ, "iters": ITERS, "config": CONFIG}, peak_bytes=int(out["peak"]),
             tokens_per_second=out["tps"], losses=[float(v) for v in out["curve"]],
             device_peak_bytes=device_peak, device_peak_runs=device_peaks, device_start_bytes=device_start,
             heldout_loss=out["heldout"])
    spread = (f", {len(device_peaks)} runs {min(device_peaks) / 2**20:.0f}-{max(device_peaks) / 2**20:.0f}"
              if device_peaks and len(device_peaks) > 1 else "")
    dev = (f"  device peak {device_peak / 2**20:7.1f} MiB ({(device_peak - device_start) / 2**20:.1f} "
           f"above the start{spread})" if device_peak is not None else "")
    print(f"\n{method:6s} {provider:9s} {out['tps']:9.1f} tokens/s  peak {out['peak'] / 2**20:7.1f} MiB{dev}  "
          f"loss {out['curve'][0]:.3f} -> {out['curve'][-1]:.3f}  held-out {out['heldout']:.4f}")
    other = CURVES.get((method, "reference" if provider == "fused" else "fused"))
    if other is not None:  # same model, data, order and loss: the curves must agree
        tol = 2e-3 if DTYPE == mx.float32 else 3e-2  # bf16 rounding differs between the paths
        np.testing.assert_allclose(out["curve"], other, rtol=tol, atol=tol)
        # Both runs must also learn alike (the drop from the first 3 reports to the last
        # 5) where the drop stands out from the step-to-step noise, and score alike on
        # held-out rows (float32 logits for both: mlx-lm's curve is of bf16 logits).
        if len(other) >= 10:
            drop = [float(np.mean(c[:3]) - np.mean(c[-5:])) for c in (out["curve"], other)]
            # The drop's own noise: per-step sigma = std(diff) / sqrt(2), times sqrt(1/3 + 1/5).
            noise = max(float(np.std(np.diff(c))) for c in (out["curve"], other)) * 0.516
            if max(drop) > 3 * noise:
                assert min(drop) > 0 and min(drop) >= 0.5 * max(drop), f"loss drops differ: {drop}"
            else:
                print(f"loss drops {drop} within step noise {noise:.4f}: not compared")
        held = HELDOUT.get((method, "reference" if provider == "fused" else "fused"))
        if held is not None and out["heldout"] is not None:
            np.testing.assert_allclose(out["heldout"], held, rtol=tol)
        if not QUICK:  # the smoke test leaves the recorded plot alone
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
    fig.savefig(RESULTS / ("train_loss.png" if CONFIG == "tiny" else f"train_loss-{CONFIG}.png"), dpi=100)
    plt.close(fig)


if __name__ == "__main__":  # the fresh process of _device_peak: method provider tmp
    print("DEVICE_PEAK " + json.dumps(_device_peak_here(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
