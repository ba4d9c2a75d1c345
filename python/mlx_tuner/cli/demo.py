"""``mlx-tuner demo``: LoRA fine-tuning end to end in about a minute on a laptop CPU, offline.

Builds a tiny Llama (mlx-lm's own model class) and a BPE tokenizer trained on the
dataset shipped in the package, shows what the untrained model answers, trains a LoRA on
the dataset with mlx-tuner's trainer, and shows the falling loss and the answers after.
Everything it writes (base model, adapters, metrics, loss plot) goes under ``--output``.
"""

from __future__ import annotations

import argparse
import json
import time
import types
from pathlib import Path

QUESTIONS = ["What does a cow say?", "What is the opposite of hot?", "Which day comes after Monday?"]


def register(sub) -> None:
    p = sub.add_parser("demo", help="train a LoRA on a tiny model in about a minute, offline")
    p.add_argument("--output", "-o", default="mlx-tuner-demo", help="folder for everything the demo writes (default: ./mlx-tuner-demo)")
    p.add_argument("--iters", type=int, default=1500, help="training iterations (default: 1500, about 20 s on 2 cores)")
    p.add_argument("--batch-size", type=int, default=8, help="minibatch size (default: 8)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (default: 1e-3)")
    p.add_argument("--fine-tune-type", choices=["lora", "dora"], default="lora", help="adapter type (default: lora)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data order and adapters (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (report lines only)")
    p.set_defaults(func=main)


def _answer(model, tokenizer, question: str) -> str:
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=20).strip() or "(nothing)"


def run(args: argparse.Namespace) -> None:
    import mlx.core as mx
    import mlx.optimizers as optim
    import numpy as np

    from .. import tiny
    from ..callbacks import plot_metrics_file, read_metrics
    from ..datasets import CacheDataset, load_local_dataset
    from ..trainer import TrainingArgs, train
    from .lora import _utils

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    mx.random.seed(args.seed)
    np.random.seed(args.seed)
    print(f"mlx-tuner demo: everything goes to {out.resolve()}")
    model, tokenizer, config = tiny.build(seed=args.seed, hidden_size=64, num_hidden_layers=2,
                                          intermediate_size=128, vocab_size=384)
    tiny.save(out / "base-model", model, tokenizer, config)
    n_params = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    print(f"Built a tiny Llama ({n_params / 1e3:.0f}k parameters, vocabulary {config['vocab_size']}) "
          f"and saved it to {out / 'base-model'}")

    data_cfg = types.SimpleNamespace(mask_prompt=True)
    train_set, valid_set, _ = load_local_dataset(tiny.SHIPPED_DATASET, tokenizer, data_cfg)
    print(f"Dataset: {len(train_set)} training and {len(valid_set)} validation records from {tiny.SHIPPED_DATASET}")

    before = {q: _answer(model, tokenizer, q) for q in QUESTIONS}

    model.freeze()
    lora_parameters = {"rank": 8, "scale": 2.0, "dropout": 0.0}
    _utils().linear_to_lora_layers(model, len(model.layers), lora_parameters,
                                   use_dora=args.fine_tune_type == "dora")
    adapters = out / "adapters"
    adapters.mkdir(exist_ok=True)
    (adapters / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": args.fine_tune_type, "num_layers": len(model.layers),
        "lora_parameters": lora_parameters, "model": str(out / "base-model"),
    }, indent=4))
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    targs = TrainingArgs(batch_size=args.batch_size, iters=args.iters, val_batches=-1,
                         steps_per_report=max(args.iters // 10, 1), steps_per_eval=max(args.iters // 3, 1),
                         steps_per_save=args.iters, adapter_file=str(adapters / "adapters.safetensors"),
                         max_seq_length=256, metrics_file=str(metrics), progress=not args.no_progress)
    train(model, optim.Adam(learning_rate=args.learning_rate), CacheDataset(train_set), CacheDataset(valid_set), targs)

    rows, vals = read_metrics(metrics)
    note = plot_metrics_file(metrics, out / "loss.png", title=f"mlx-tuner demo: {args.fine_tune_type} on a tiny Llama")
    print()
    print(f"Loss: train {rows[0]['train_loss']:.2f} -> {rows[-1]['train_loss']:.2f}, "
          f"validation {vals[0]['val_loss']:.2f} -> {vals[-1]['val_loss']:.2f}")
    for q in QUESTIONS:
        print(f"  {q}\n    before: {before[q]}\n    after:  {_answer(model, tokenizer, q)}")
    print(note or f"Loss curve: {out / 'loss.png'}")
    print(f"Adapters: {adapters} (use them with: mlx-tuner lora --model {out / 'base-model'} "
          f"--adapter-path {adapters} --data {tiny.SHIPPED_DATASET} --test)")
    print(f"Done in {time.perf_counter() - t0:.0f} s.")


def main(args: argparse.Namespace) -> int:
    from .lora import report_errors

    return report_errors(run, "mlx-tuner demo", args)
