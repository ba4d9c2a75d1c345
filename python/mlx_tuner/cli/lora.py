"""``mlx-tuner lora``: ``mlx_lm.lora``'s command (same flags, YAML config keys and defaults)
on mlx-tuner's trainer. Beyond it: ``--resume`` continues a killed run exactly from the full
state saved beside the adapters, ``--all-assistant-turns`` trains every assistant turn of
a chat, metrics go to ``<adapter-path>/metrics.jsonl`` and the loss curve to ``loss.png``.
A user's mistake ends with one line on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import types
from pathlib import Path

CONFIG_DEFAULTS = {
    "model": "Qwen/Qwen3-0.6b",
    "train": False,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
    "data": "mlx-community/WikiSQL",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
    # Ours.
    "resume": False,
    "all_assistant_turns": False,
}


class UserError(Exception):
    """A mistake in the command line, config, model or data: one line, exit status 1."""


def _utils():
    from .. import utils as u

    return u


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)[bB]?\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 0, 512M, 2G)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _yaml_loader():
    import yaml

    # YAML 1.1 reads 1e-5 as a string; accept exponents without a dot as floats.
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+][0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )
    return Loader


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--model", type=str, help="The path to the local model directory or Hugging Face repo.")
    a("--train", action="store_true", default=None, help="Do training")
    a("--data", type=str, help="Directory with {train, valid, test}.jsonl files or the name of a Hugging Face dataset (e.g., 'mlx-community/wikisql')")
    a("--fine-tune-type", type=str, choices=["lora", "dora", "full"], help="Type of fine-tuning to perform: lora, dora, or full.")
    a("--optimizer", type=str, choices=["adam", "adamw", "muon", "sgd", "adafactor"], default=None, help="Optimizer to use for training: adam, adamw, sgd, or adafactor.")
    a("--mask-prompt", action="store_true", default=None, help="Mask the prompt in the loss when training")
    a("--num-layers", type=int, help="Number of layers to fine-tune. Default is 16, use -1 for all.")
    a("--batch-size", type=int, help="Minibatch size.")
    a("--iters", type=int, help="Iterations to train for.")
    a("--val-batches", type=int, help="Number of validation batches, -1 uses the entire validation set.")
    a("--learning-rate", type=float, help="Adam learning rate.")
    a("--steps-per-report", type=int, help="Number of training steps between loss reporting.")
    a("--steps-per-eval", type=int, help="Number of training steps between validations.")
    a("--grad-accumulation-steps", type=int, help="Number of steps to accumulate before each optimizer update.")
    a("--resume-adapter-file", type=str, help="Load path to resume training from the given fine-tuned weights.")
    a("--adapter-path", type=str, help="Save/load path for the fine-tuned weights.")
    a("--save-every", type=int, help="Save the model every N iterations.")
    a("--test", action="store_true", default=None, help="Evaluate on the test set after training")
    a("--test-batches", type=int, help="Number of test set batches, -1 uses the entire test set.")
    a("--max-seq-length", type=int, help="Maximum sequence length.")
    a("-c", "--config", type=str, help="A YAML configuration file with the training options")
    a("--grad-checkpoint", action="store_true", default=None, help="Use gradient checkpointing to reduce memory use.")
    a("--clear-cache-threshold", type=_parse_size, default=None, help="Clear the allocator cache between steps if it grows too large.")
    a("--report-to", type=str, default=None, help="Services to report logs to ('wandb', 'swanlab', or 'wandb,swanlab').")
    a("--project-name", type=str, default=None, help="Project name for logging. Defaults to the name of the root directory.")
    a("--seed", type=int, help="The PRNG seed")
    a("--trust-remote-code", action="store_true", default=None, help="Enable trusting remote code for tokenizer/model loading.")
    a("--resume", action="store_true", default=None, help="(mlx-tuner) Resume a stopped run from the full training state in --adapter-path.")
    a("--all-assistant-turns", action="store_true", default=None, help="(mlx-tuner) With chat data, train every assistant turn (not only the last).")


def register(sub) -> None:
    p = sub.add_parser("lora", help="LoRA, DoRA or QLoRA fine-tuning (mlx_lm.lora's flags)",
                       description="LoRA or QLoRA finetuning.")
    add_arguments(p)
    p.set_defaults(func=main)


def resolve(ns: argparse.Namespace) -> types.SimpleNamespace:
    """Command line over YAML config over defaults."""
    args = {k: v for k, v in vars(ns).items() if k != "func"}
    if args.get("config"):
        import yaml

        path = args["config"]
        try:
            with open(path) as f:
                config = yaml.load(f, _yaml_loader())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read config {path}: {' '.join(str(e).split())}") from None
        if not isinstance(config, dict):
            raise UserError(f"config {path} must be a YAML mapping of option: value, got {type(config).__name__}")
        for k, v in config.items():
            if args.get(k) is None:
                args[k] = v
    for k, v in CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    return types.SimpleNamespace(**args)


def _check_adapter_weights(model, path) -> list:
    """The (name, array) pairs of an adapter file, after checking them against the model."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    try:
        weights = mx.load(str(path))
    except Exception as e:
        raise UserError(f"cannot read adapter file {path}: {e}") from None
    params = dict(tree_flatten(model.trainable_parameters()))
    unknown = [k for k in weights if k not in params]
    if unknown:
        raise UserError(f"adapter file {path}: {len(unknown)} tensors are not trainable parameters of this model (e.g. {unknown[0]}); was it trained with other --num-layers, fine-tune type or keys?")
    for k, w in weights.items():
        if w.shape != params[k].shape:
            raise UserError(f"adapter file {path}: {k} has shape {tuple(w.shape)} but the model's is {tuple(params[k].shape)} (another rank or model?)")
    return list(weights.items())


def _optimizer(args, lr):
    import mlx.optimizers as optim

    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD, "adafactor": optim.Adafactor}
    name = str(args.optimizer).lower()
    if name not in classes:
        raise UserError(f"Unsupported optimizer: {name} (choose from {', '.join(classes)})")
    return classes[name](learning_rate=lr, **(args.optimizer_config or {}).get(name, {}))


def train_model(args, model, train_set, valid_set, training_callback=None):
    import mlx.core as mx

    from ..callbacks import plot_metrics_file
    from ..checkpoint import atomic_write_text
    from ..datasets import CacheDataset
    from ..trainer import TrainingArgs, train

    u = _utils()
    mx.random.seed(args.seed)
    model.freeze()
    if args.num_layers > len(model.layers):
        raise UserError(f"--num-layers {args.num_layers} is more than the model's {len(model.layers)} layers (use -1 for all)")
    if args.fine_tune_type == "full":
        for layer in model.layers[-max(args.num_layers, 0):]:
            layer.unfreeze()
        args.lora_parameters = None
    elif args.fine_tune_type in ("lora", "dora"):
        try:
            u.linear_to_lora_layers(model, args.num_layers, args.lora_parameters, use_dora=args.fine_tune_type == "dora")
        except KeyError as e:
            raise UserError(str(e).strip("'\"")) from None
    else:
        raise UserError(f"Received unknown fine-tune-type {args.fine_tune_type}")
    if args.resume_adapter_file is not None:
        print(f"Loading fine-tuned weights from {args.resume_adapter_file}")
        model.load_weights(_check_adapter_weights(model, args.resume_adapter_file), strict=False)
    u.print_trainable_parameters(model)

    adapter_path = Path(args.adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(adapter_path / "adapter_config.json", json.dumps(vars(args), indent=4, sort_keys=True, default=str))
    metrics = adapter_path / "metrics.jsonl"
    if not args.resume and metrics.exists():
        metrics.unlink()
    training_args = TrainingArgs(
        batch_size=args.batch_size, iters=args.iters, val_batches=args.val_batches,
        steps_per_report=args.steps_per_report, steps_per_eval=args.steps_per_eval,
        steps_per_save=args.save_every, adapter_file=str(adapter_path / "adapters.safetensors"),
        max_seq_length=args.max_seq_length, grad_checkpoint=args.grad_checkpoint,
        grad_accumulation_steps=args.grad_accumulation_steps, clear_cache_threshold=args.clear_cache_threshold,
        resume=bool(args.resume), metrics_file=str(metrics), progress=bool(getattr(args, "progress", True)),
    )
    lr = u.build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
    train(model=model, args=training_args, optimizer=_optimizer(args, lr), train_dataset=CacheDataset(train_set),
          val_dataset=CacheDataset(valid_set) if len(valid_set) else None, training_callback=training_callback)
    if mx.distributed.init().rank() == 0 and metrics.exists():
        note = plot_metrics_file(metrics, adapter_path / "loss.png", title=f"{args.fine_tune_type} on {args.model}")
        print(note or f"Loss curve: {adapter_path / 'loss.png'}")


def evaluate_model(args, model, test_set):
    from ..datasets import CacheDataset
    from ..trainer import evaluate

    loss = evaluate(model=model, dataset=CacheDataset(test_set), batch_size=args.batch_size,
                    num_batches=args.test_batches, max_seq_length=args.max_seq_length)
    print(f"Test loss {loss:.3f}, Test ppl {math.exp(loss):.3f}.")
    return loss


def load_model(args):
    from mlx_lm.utils import load

    if not Path(args.model).exists() and "/" not in str(args.model):
        raise UserError(f"model {args.model!r} is neither a local folder nor a Hugging Face repo id")
    try:
        return load(args.model, tokenizer_config={"trust_remote_code": args.trust_remote_code},
                    trust_remote_code=args.trust_remote_code)
    except Exception as e:  # offline, not found, a folder that is not a model
        msg = " ".join(str(e).split())[:300]
        raise UserError(f"cannot load model {args.model!r}: {type(e).__name__}: {msg}") from None


def run(args, training_callback=None):
    import numpy as np

    from ..callbacks import get_reporting_callbacks
    from ..datasets import load_dataset

    np.random.seed(args.seed)
    training_callback = get_reporting_callbacks(args.report_to, project_name=args.project_name,
                                                log_dir=args.adapter_path, config=vars(args)) or training_callback
    print("Loading pretrained model")
    model, tokenizer = load_model(args)
    print("Loading datasets")
    train_set, valid_set, test_set = load_dataset(args, tokenizer)
    if args.test and not args.train:
        if args.adapter_path != "":
            try:
                _utils().load_adapters(model, args.adapter_path)
            except (ValueError, FileNotFoundError) as e:
                raise UserError("; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())) from None
    elif args.train:
        print("Training")
        train_model(args, model, train_set, valid_set, training_callback)
    else:
        raise UserError("Must provide at least one of --train or --test")
    if args.test:
        print("Testing")
        evaluate_model(args, model, test_set)


def report_errors(fn, prog: str, *a) -> int:
    """Run ``fn``; a user's mistake becomes one line on stderr and exit status 1."""
    import sys

    from ..trainer import TrainingDivergedError

    try:
        fn(*a)
    except (UserError, ValueError, FileNotFoundError, ImportError, TrainingDivergedError) as e:
        print(f"{prog}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(ns: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    def go():
        run(resolve(ns))

    return report_errors(go, "mlx-tuner lora")
