"""Worker of test_distributed.py: a few LoRA steps on the tiny model; rank 0 saves the adapters.
Usage: python dist_worker.py OUT_FILE"""

import sys
import types

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlx_tuner import tiny
from mlx_tuner.cli.lora import _utils
from mlx_tuner.datasets import CacheDataset, load_local_dataset
from mlx_tuner.trainer import TrainingArgs, train

world = mx.distributed.init()
mx.random.seed(0)
np.random.seed(0)
hf = tiny.build_tokenizer(vocab_size=320)
config = tiny.model_config(len(hf), hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                           num_attention_heads=2, num_key_value_heads=1)
model = tiny.build_model(config, seed=0)
model.freeze()
_utils().linear_to_lora_layers(model, -1, {"rank": 4, "scale": 4.0, "dropout": 0.0})
tok = tiny.wrap_tokenizer(hf)
tr, va, _ = load_local_dataset(tiny.SHIPPED_DATASET, tok, types.SimpleNamespace(mask_prompt=True))
out = sys.argv[1]
args = TrainingArgs(batch_size=8, iters=6, steps_per_report=3, steps_per_eval=3, val_batches=1,
                    adapter_file=out, progress=False, state_file=out + f".state{world.rank()}.safetensors")
train(model, optim.Adam(learning_rate=3e-3), CacheDataset(tr), CacheDataset(va), args)
print(f"rank {world.rank()} of {world.size()} done", flush=True)
