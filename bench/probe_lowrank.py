"""The LoRA layer's rank-r kernels (csrc/backend/cuda/lowrank.cu) in isolation, for a
profiler (a diagnostic, not a benchmark row):

    ncu --clock-control none -k regex:"project|expand|reduce|finish" -c 8 \
        python bench/probe_lowrank.py [REPS]

One bfloat16 LoRA layer (4096 tokens, 4096 x 4096, r 16, float32 A and B), forward and
forward+backward evaluated REPS times (default 3).
"""
import sys

import mlx.core as mx

from common import layer_step, probe_layer
from mlx_tuner.ops import lora_linear

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
x, w, a, b, *_ = probe_layer()
f = lambda x, a, b: lora_linear(x, w, a, b, 2.0)
step = layer_step(f, (x, a, b), [0, 1, 2])
for _ in range(REPS):
    mx.eval(f(x, a, b))
    mx.eval(step())
mx.synchronize()
print("done")
