"""Where a LoRA training step's peak memory goes (a diagnostic, not a benchmark row).

    python bench/probe_memory.py [layers] [batch] [seq] [mlx-lm,mlx-tuner]

For a Qwen3-0.6B-shaped model (vocabulary 151,936, tied embeddings; `layers` of its 28,
default 2; batch x seq tokens, default 1 x 256) with rank-8 LoRA on every layer, it prints
the peak bytes above the weights for three graphs, each with mlx-lm's loss (logits
materialized) and with mlx-tuner's (fused, gradient in the forward):
  hidden   the final hidden states only (the transformer's activations),
  loss     the forward and the loss,
  step     the loss and every LoRA gradient (what a training step evaluates),
  compiled the trainers' step: the same under mx.compile, with Adam's update,
  padded   the same with the batch an argument, padded as mlx-lm pads it,
  trainer  that library's own train() for 3 steps (bench_train's measurement),
  compiled-first, trainer-1: the compiled step's first call, and train() for 1 step.
step - loss is what the backward adds on top of the forward; loss - hidden is what the
loss adds. On CUDA the peak is the device pool's high-water mark with both caches off
(MLX's buffers and mlx-tuner's alike); elsewhere MLX's own counter. bf16 on a GPU,
float32 on the CPU. The question it answers: bench_train's Qwen3 run peaked at the same
14.45 GB with both losses on the H200, so where is that peak?
"""

import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from common import device_pool_peak


def build(layers, lora_from):
    from mlx_lm.models import qwen3

    args = qwen3.ModelArgs(model_type="qwen3", hidden_size=1024, num_hidden_layers=layers,
                           intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8,
                           head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                           max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6)
    mx.random.seed(0)
    model = qwen3.Model(args)
    if mx.default_device() == mx.gpu:
        model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    model.freeze()
    if lora_from == "mlx-lm":
        from mlx_lm.tuner.utils import linear_to_lora_layers
    else:
        from mlx_tuner.utils import linear_to_lora_layers
    linear_to_lora_layers(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    mx.eval(model.parameters())
    return model


def peak_of(fn, warm=True):
    """Peak bytes above what is live before fn() runs (evaluated): its second run, or its
    first (compilation included) with warm=False."""
    if warm:
        mx.eval(fn())  # compile and warm
    mx.synchronize()
    with device_pool_peak() as pool:
        if pool is not None:
            reset, high = pool
            before = reset()
            mx.eval(fn())
            return high() - before
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return int(mx.get_peak_memory() - before)


def run_trainer(name, model, tokens, iters=3):
    """That library's own train() for a few steps on rows of `tokens` (what bench_train
    times), its default loss. Returns an evaluated scalar for peak_of."""
    import tempfile

    if name == "mlx-lm":
        from mlx_lm.tuner.trainer import TrainingArgs, train
        extra = {}
    else:
        from mlx_tuner.trainer import TrainingArgs, train
        extra = {"progress": False}
    rows = [(r, 0) for r in tokens.tolist()] * (iters + 1)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(batch_size=tokens.shape[0], iters=iters, steps_per_report=10**6,
                            steps_per_eval=10**6, steps_per_save=10**6,
                            adapter_file=f"{tmp}/adapters.safetensors", **extra)
        train(model=model, optimizer=optim.Adam(learning_rate=1e-5), train_dataset=rows, args=args)
    return mx.array(0)


def rows_for(name, layers, tokens, lengths):
    """The peaks of one library's graphs (MiB above the weights), in print order."""
    from mlx_lm.tuner import trainer as lm_trainer

    from mlx_tuner.trainer import default_loss

    batch, seq = tokens.shape[0], tokens.shape[1] - 1
    model = build(layers, name)
    if name == "mlx-lm":
        lossfn = lm_trainer.default_loss
    else:
        lossfn = partial(default_loss, grad_in_forward=True)

    def loss():
        return lossfn(model, tokens, lengths)[0]

    step = nn.value_and_grad(model, lambda: loss())
    # The trainers' step: compiled, with the model and Adam's state as its state.
    opt = optim.Adam(learning_rate=1e-5)
    state = [model.state, opt.state]

    def make_step():
        @partial(mx.compile, inputs=state, outputs=state)
        def train_step():
            value, grad = step()
            opt.update(model, grad)
            return value

        return train_step

    train_step, train_step_first = make_step(), make_step()  # the second never called before
    # The same with the batch as an argument, padded as mlx-lm's iterate_batches pads
    # it: the full row to a multiple of 32, so the model reads 32k - 1 tokens (the
    # padding masked by `lengths`). On CUDA that length takes MLX's unfused attention
    # backward, which mlx-tuner's trainer avoids by padding the model's input instead.
    pad = 32 * ((seq + 1 + 31) // 32) - (seq + 1)
    padded = mx.concatenate([tokens, mx.zeros((batch, pad), tokens.dtype)], axis=1)
    step_args = nn.value_and_grad(model, lossfn)

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step_args(b, lens):
        (value, _), grad = step_args(model, b, lens)
        opt.update(model, grad)
        return value

    return {
        # The first call of a compiled step, and one step of the trainer: the trainer
        # row (3 steps) sat 0.67 GB above the compiled row on the H200, not on the CPU.
        "compiled-first": peak_of(lambda: (train_step_first(), state), warm=False),
        "trainer-1": peak_of(lambda: run_trainer(name, model, tokens, iters=1)),
        "hidden": peak_of(lambda: model.model(tokens[:, :-1])),
        "loss": peak_of(loss),
        "step": peak_of(lambda: step()),
        "compiled": peak_of(lambda: (train_step(), state)),
        "padded": peak_of(lambda: (train_step_args(padded, lengths), state)),
        "trainer": peak_of(lambda: run_trainer(name, model, tokens)),
    }


def main(layers=2, batch=1, seq=256, libs=("mlx-lm", "mlx-tuner")):
    tokens = mx.array(np.random.default_rng(0).integers(0, 151936, (batch, seq + 1)))
    lengths = mx.array([[0, seq + 1]] * batch)
    print(f"== Qwen3 shape, {layers} layers, {batch} x {seq} tokens, rank-8 LoRA on every layer: "
          f"peak MiB above the weights")
    for name in libs:
        row = rows_for(name, layers, tokens, lengths)
        print(f"   {name:10s} " + "  ".join(f"{k} {v / 2**20:9.1f}" for k, v in row.items()))


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:4]), *([sys.argv[4].split(",")] if len(sys.argv) > 4 else []))
