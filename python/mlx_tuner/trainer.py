"""The training loop of ``mlx_lm.tuner.trainer`` (same names, arguments and defaults), made
robust: full-state atomic checkpoints and exact resume, a stop with a clear message on a
NaN/inf loss, token-weighted gradient averaging across ``mx.distributed`` ranks (so N
processes equal one process with the N-times batch), a rich progress bar and JSON-lines
metrics.

Loss mask: target ``j`` is token ``j + 1``; it is trained when ``offset <= j + 1 < length``.
(mlx-lm's mask ends at ``<= length`` and so also trains the first padding token.)

Padding: a batch's model input (all tokens but the last) is padded to a multiple of 32,
of 128 on CUDA, where MLX's attention backward is fused only for such lengths; mlx-lm
pads the whole row to a multiple of 32, so its model reads 32k - 1 tokens.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map

from .activations import lean_swiglu
from .callbacks import TrainingCallback
from .checkpoint import atomic_save_safetensors, atomic_write_text, restore_training_state, save_training_state
from .datasets import CacheDataset


class TrainingDivergedError(FloatingPointError):
    """The loss became NaN or infinite; the files on disk are from the last good save."""


@dataclass
class TrainingArgs:
    batch_size: int = field(default=4, metadata={"help": "Minibatch size."})
    iters: int = field(default=100, metadata={"help": "Iterations to train for."})
    val_batches: int = field(default=25, metadata={"help": "Number of validation batches, -1 uses the entire validation set."})
    steps_per_report: int = field(default=10, metadata={"help": "Number of training steps between loss reporting."})
    steps_per_eval: int = field(default=200, metadata={"help": "Number of training steps between validations."})
    steps_per_save: int = field(default=100, metadata={"help": "Save the model every number steps"})
    max_seq_length: int = field(default=2048, metadata={"help": "Maximum sequence length."})
    adapter_file: str = field(default="adapters.safetensors", metadata={"help": "Save/load path for the trained adapter weights."})
    grad_checkpoint: bool = field(default=False, metadata={"help": "Use gradient checkpointing to reduce memory use."})
    grad_accumulation_steps: int = field(default=1, metadata={"help": "Number of steps to accumulate gradients before applying an optimizer update."})
    clear_cache_threshold: int = field(default=0, metadata={"help": "Clear the allocator cache between steps if it grows too large."})
    # Beyond mlx-lm (all off or automatic by default).
    resume: bool = field(default=False, metadata={"help": "Resume from the full training state saved beside the adapters, if there is one."})
    state_file: str | None = field(default=None, metadata={"help": "Training-state file (default: training_state.safetensors beside adapter_file)."})
    metrics_file: str | None = field(default=None, metadata={"help": "Append every train/val report to this file as JSON lines."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})


def _clear_cache(threshold: int) -> None:
    if threshold and mx.get_cache_memory() > threshold:
        mx.clear_cache()


def _say(*args, file=None) -> None:
    if mx.distributed.init().rank() == 0:
        print(*args, file=file or sys.stdout, flush=True)


def default_loss(model, batch, lengths, mask=None, *, fused: bool | None = None,
                 grad_in_forward: bool = False):
    """Mean cross-entropy over the trained targets and their count. ``lengths`` rows are
    ``(offset, length)``; ``mask`` (optional, ``(B, T-1)``) selects targets further.

    The loss is computed from the hidden states and the head weight without materializing
    the logits (``ops.linear_cross_entropy``) where the model's head allows; ``fused=False``
    (or MLX_TUNER_FUSED_CE=0) computes it from the logits instead. The values are the same.
    ``grad_in_forward=True`` (``train`` passes it for its gradient step, ``evaluate`` does
    not) lets the fused loss compute dh in the forward where that saves a GEMM.
    """
    from .ops.cross_entropy import masked_loss_sum

    inputs, targets = batch[:, :-1], batch[:, 1:]
    steps = mx.arange(1, targets.shape[1] + 1)
    keep = mx.logical_and(steps >= lengths[:, 0:1], steps < lengths[:, 1:])
    if mask is not None:
        keep = mx.logical_and(keep, mask)
    ntoks = keep.sum()
    if fused is None:
        fused = os.environ.get("MLX_TUNER_FUSED_CE", "1") != "0"
    if fused:
        return masked_loss_sum(model, inputs, targets, keep, grad_in_forward=grad_in_forward) / ntoks, ntoks
    ce = nn.losses.cross_entropy(model(inputs), targets) * keep
    return ce.astype(mx.float32).sum() / ntoks, ntoks


# ---------------------------------------------------------------------------- batches


def _item_len(dataset, i: int) -> int:
    return dataset.itemlen(i) if hasattr(dataset, "itemlen") else len(dataset[i][0])


def _plan(dataset, batch_size: int, max_seq_length: int, comm_group) -> list[list[int]]:
    """Length-sorted batches of indices, each rank taking every size-th row of a batch."""
    if len(dataset) < batch_size:
        raise ValueError(f"Dataset must have at least batch_size={batch_size} examples but only has {len(dataset)}.")
    offset, step = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % step != 0:
        raise ValueError(f"The batch size ({batch_size}) must be divisible by the number of workers ({step})")
    lengths = [_item_len(dataset, i) for i in range(len(dataset))]
    too_long = [n for n in lengths if n > max_seq_length]
    if too_long and not getattr(dataset, "_warned_long", False):
        _say(f"[WARNING] {len(too_long)} of {len(lengths)} sequences are longer than max_seq_length="
             f"{max_seq_length} tokens (the longest has {max(too_long)}); they are truncated.", file=sys.stderr)
        with contextlib.suppress(AttributeError):
            dataset._warned_long = True
    idx = sorted(range(len(dataset)), key=lambda i: lengths[i])
    return [idx[i + offset : i + offset + batch_size : step] for i in range(0, len(idx) - batch_size + 1, batch_size)]


def _input_multiple() -> int:
    """What a batch's model input length is padded to a multiple of."""
    cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
    return 128 if cuda else 32


def _collate(rows, max_seq_length: int):
    tokens = [r[0] for r in rows]
    marks = [r[1] if len(r) == 2 else 0 for r in rows]
    lengths = [min(len(t), max_seq_length) for t in tokens]
    # The model reads width - 1 tokens (the last one is only a target): that count is
    # padded to a multiple of pad_to, 128 on CUDA, where MLX's attention backward is fused
    # only for such lengths (otherwise it saves the whole score matrix of every layer:
    # 4.5 GB more at Qwen3-0.6B, 4 x 1024 tokens). mlx-lm pads the full row instead, so
    # its models read 32k - 1 tokens.
    pad_to = _input_multiple()
    width = min(1 + pad_to * max(1, (max(len(t) for t in tokens) - 1 + pad_to - 1) // pad_to), max_seq_length)
    arr = np.zeros((len(rows), width), np.int32)
    for j, t in enumerate(tokens):
        arr[j, : lengths[j]] = t[: lengths[j]]
    if not any(isinstance(m, (list, tuple)) for m in marks):
        return mx.array(arr), mx.array([[int(m), n] for m, n in zip(marks, lengths)])
    # Per-token loss mask (every assistant turn): target j is token j + 1.
    mask = np.zeros((len(rows), width - 1), bool)
    for j, m in enumerate(marks):
        spans = m if isinstance(m, (list, tuple)) else [(int(m), lengths[j])]
        for s, e in spans:
            mask[j, max(s - 1, 0) : max(e - 1, 0)] = True
    return mx.array(arr), mx.array([[0, n] for n in lengths]), mx.array(mask)


class _BatchStream:
    """iterate_batches' order with a state (permutation, position) that a checkpoint can save."""

    def __init__(self, dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None, state=None):
        self.dataset, self.max_seq_length, self.loop, self.seed = dataset, max_seq_length, loop, seed
        self.batches = _plan(dataset, batch_size, max_seq_length, comm_group)
        self.perm = state.get("perm") if state else None
        self.pos = int(state.get("pos", 0)) if state else 0

    def state(self) -> dict:
        return {"perm": self.perm, "pos": self.pos}

    def __iter__(self):
        if self.seed is not None:
            np.random.seed(self.seed)
        while True:
            if self.perm is None or self.pos >= len(self.perm):
                if self.perm is not None and not self.loop:
                    return
                self.perm, self.pos = np.random.permutation(len(self.batches)).tolist(), 0
            i = self.perm[self.pos]
            self.pos += 1
            yield _collate([self.dataset[j] for j in self.batches[i]], self.max_seq_length)


def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None):
    """Batches ``(tokens, lengths[, mask])`` of length-sorted records in a random order
    (numpy's global generator, seeded by ``seed`` if given); with ``comm_group`` each rank
    gets its share of every batch."""
    yield from _BatchStream(dataset, batch_size, max_seq_length, loop, seed, comm_group)


# ------------------------------------------------------------------------- evaluation


def evaluate(model, dataset, batch_size, num_batches, max_seq_length=2048, loss: callable = default_loss,
             iterate_batches: callable = iterate_batches, clear_cache_threshold: int = 0,
             progress_callback: callable | None = None):
    """Token-weighted mean loss over ``num_batches`` batches (-1: all), summed over ranks."""
    model.eval()
    all_losses, ntokens = mx.array(0.0), mx.array(0)
    batches = iterate_batches(dataset=dataset, batch_size=batch_size, max_seq_length=max_seq_length,
                              comm_group=mx.distributed.init())
    index = iter(range(num_batches)) if num_batches != -1 else iter(int, 1)
    for _, batch in zip(index, batches):
        losses, toks = loss(model, *batch)
        all_losses += losses * toks
        ntokens += toks
        mx.eval(all_losses, ntokens)
        _clear_cache(clear_cache_threshold)
        if progress_callback is not None:
            progress_callback()
    all_losses = mx.distributed.all_sum(all_losses, stream=mx.cpu)
    ntokens = mx.distributed.all_sum(ntokens, stream=mx.cpu)
    return (all_losses / ntokens).item()


# --------------------------------------------------------------------------- training


@contextlib.contextmanager
def _checkpointed_layers(model, enabled: bool):
    """Gradient checkpointing on each of ``model.layers`` for the duration of training.

    Each block is replaced by a ``utils.CheckpointedLayer`` wrapper (no class is patched;
    parameter paths are unchanged), and the original blocks, kept in sync, come back after.
    """
    if not enabled:
        yield
        return
    from .utils import grad_checkpoint

    blocks = model.layers
    wrapped = [grad_checkpoint(b) for b in blocks]
    for i, w in enumerate(wrapped):
        blocks[i] = w
    try:
        yield
    finally:
        for i, w in enumerate(wrapped):
            blocks[i] = w.layer  # .layer syncs the wrapper's arrays back into the block


class _Reporter:
    """Progress bar (rich) and report lines on rank 0; JSON-lines metrics if asked."""

    def __init__(self, total: int, start: int, rank: int, args: TrainingArgs):
        self.rank, self.metrics = rank, (Path(args.metrics_file) if args.metrics_file and rank == 0 else None)
        self.progress = None
        if rank == 0 and args.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def line(self, text: str) -> None:
        if self.rank != 0:
            return
        if self.progress is not None:
            self.progress.console.print(text, highlight=False)
        else:
            print(text, flush=True)

    def advance(self, info: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, **({"info": info} if info else {}))

    def record(self, kind: str, info: dict) -> None:
        if self.metrics is not None:
            row = {"type": kind, **{k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}}
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")


def _truncate_metrics(path, last_iteration: int) -> None:
    """Drop records a killed run wrote after the state it is resumed from."""
    path = Path(path)
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("iteration", 0) <= last_iteration]
    atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def train(model, optimizer, train_dataset, val_dataset=None, args: TrainingArgs = TrainingArgs(),
          loss: callable = default_loss, iterate_batches: callable = iterate_batches,
          training_callback: TrainingCallback = None):
    """Train the model's trainable parameters (see ``TrainingArgs``); saves the adapters
    every ``steps_per_save`` iterations and at the end, with the full state beside them."""
    world = mx.distributed.init()
    world_size, rank = world.size(), world.rank()
    accum = args.grad_accumulation_steps
    if accum < 1:
        raise ValueError("grad_accumulation_steps must be at least 1")
    adapter_file = Path(args.adapter_file)
    state_file = Path(args.state_file) if args.state_file else adapter_file.parent / "training_state.safetensors"

    start, grad_accum, data_state = 0, None, None
    if args.resume and state_file.exists():
        restored = restore_training_state(state_file, model, optimizer)
        start, grad_accum, data_state = restored["iteration"], restored["grad_accum"], restored["data"]
        _say(f"Resuming from {state_file} at iteration {start}.")
        if args.metrics_file and rank == 0:
            _truncate_metrics(args.metrics_file, start)
    elif args.resume:
        _say(f"No training state at {state_file}; starting from iteration 0.")

    default_order = getattr(iterate_batches, "__code__", None) is globals()["iterate_batches"].__code__
    if default_order:
        stream = _BatchStream(train_dataset, args.batch_size, args.max_seq_length, loop=True,
                              comm_group=world, state=data_state)
        batches = iter(stream)
    else:  # a user's iterator: resume by skipping the batches already seen
        stream = None
        batches = iterate_batches(dataset=train_dataset, batch_size=args.batch_size,
                                  max_seq_length=args.max_seq_length, loop=True, comm_group=world)
        for _ in range(start):
            next(batches)

    def save(it: int) -> None:
        if rank != 0:
            return
        weights = dict(tree_flatten(model.trainable_parameters()))
        atomic_save_safetensors(adapter_file, weights)
        if it % args.steps_per_save == 0:
            numbered = adapter_file.parent / f"{it:07d}_adapters.safetensors"
            atomic_save_safetensors(numbered, weights)
        save_training_state(state_file, model=model, optimizer=optimizer, iteration=it, grad_accum=grad_accum,
                            data_state=stream.state() if stream else {})

    last_saved = start if start else None
    with _checkpointed_layers(model, args.grad_checkpoint), lean_swiglu(model):
        # The gradient step's loss computes dh in its forward (evaluate keeps `loss` as is).
        train_loss = partial(default_loss, grad_in_forward=True) if loss is default_loss else loss
        loss_value_and_grad = nn.value_and_grad(model, train_loss)
        state = [model.state, optimizer.state, mx.random.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(batch, prev_grad, do_update):
            (lvalue, toks), grad = loss_value_and_grad(model, *batch)
            if world_size > 1:  # weight each rank by its token count: N ranks == one N-times batch
                grad = average_gradients(tree_map(lambda g: g * toks, grad))
                total = mx.distributed.all_sum(toks.astype(mx.float32))
                grad = tree_map(lambda g: g * (world_size / total), grad)
            if prev_grad is not None:
                grad = tree_map(lambda x, y: x + y, grad, prev_grad)
            if do_update:
                if accum > 1:
                    grad = tree_map(lambda x: x / accum, grad)
                optimizer.update(model, grad)
                grad = None
            return lvalue, toks, grad

        model.train()
        losses, n_tokens, steps, trained_tokens, train_time = 0, 0, 0, 0, 0.0
        with _Reporter(args.iters, start, rank, args) as ui:
            for it in range(start + 1, args.iters + 1):
                batch = next(batches)
                tic = time.perf_counter()
                if val_dataset and (it == 1 or it % args.steps_per_eval == 0 or it == args.iters):
                    val_loss = evaluate(model=model, dataset=val_dataset, loss=loss, batch_size=args.batch_size,
                                        num_batches=args.val_batches,
                                        max_seq_length=args.max_seq_length, iterate_batches=iterate_batches)
                    model.train()
                    val_time = time.perf_counter() - tic
                    ui.line(f"Iter {it}: Val loss {val_loss:.3f}, Val took {val_time:.3f}s")
                    info = {"iteration": it - 1, "val_loss": val_loss, "val_time": val_time}
                    ui.record("val", info)
                    if training_callback is not None:
                        training_callback.on_val_loss_report(info)
                    tic = time.perf_counter()

                lvalue, toks, grad_accum = step(batch, grad_accum, it % accum == 0)
                losses += lvalue
                n_tokens += toks
                steps += 1
                mx.eval(state, losses, n_tokens, grad_accum)
                _clear_cache(args.clear_cache_threshold)
                train_time += time.perf_counter() - tic
                lv = lvalue.item()
                if not math.isfinite(lv):
                    kept = f"the last good checkpoint is {state_file} (iteration {last_saved})" if last_saved else "no checkpoint had been saved yet"
                    raise TrainingDivergedError(f"the training loss became {lv} at iteration {it}; stopping ({kept}).")
                ui.advance(f"loss {lv:.3f}")

                if it % args.steps_per_report == 0 or it == args.iters:
                    train_loss = mx.distributed.all_sum(losses, stream=mx.cpu).item() / (steps * world_size)
                    n_tokens = mx.distributed.all_sum(n_tokens, stream=mx.cpu).item()
                    trained_tokens += n_tokens
                    info = {
                        "iteration": it,
                        "train_loss": train_loss,
                        "learning_rate": float(optimizer.learning_rate.item()),
                        "iterations_per_second": steps / train_time,
                        "tokens_per_second": float(n_tokens) / train_time,
                        "trained_tokens": trained_tokens,
                        "peak_memory": mx.get_peak_memory() / 1e9,
                    }
                    ui.line(f"Iter {it}: Train loss {train_loss:.3f}, Learning Rate {info['learning_rate']:.3e}, "
                            f"It/sec {info['iterations_per_second']:.3f}, Tokens/sec {info['tokens_per_second']:.1f}, "
                            f"Trained Tokens {trained_tokens}, Peak mem {info['peak_memory']:.3f} GB")
                    ui.record("train", info)
                    if training_callback is not None:
                        training_callback.on_train_loss_report(info)
                    losses, n_tokens, steps, train_time = 0, 0, 0, 0.0

                if it % args.steps_per_save == 0:
                    save(it)
                    last_saved = it
                    ui.line(f"Iter {it}: Saved adapter weights to {adapter_file} and {adapter_file.parent / f'{it:07d}_adapters.safetensors'}.")

        if last_saved != args.iters:
            save(args.iters)
    if rank == 0:
        _say(f"Saved final weights to {adapter_file}.")
