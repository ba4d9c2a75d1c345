"""DoRASwitchLinear against LoRASwitchLinear on the same MoE switch layer (a diagnostic,
not a benchmark row: mlx-lm has no DoRA for switch layers to compare with):
forward+backward time per call, where the DoRA step's time goes (the norms' W A^T, and
what MLX's batched matmul would take for it), and
a call's extra memory against one float32 copy of the adapted experts, which the naive
form (W + s B A, then its row norms) builds.

    cd bench && PYTHONPATH=../python python probe_dora_switch.py
"""
# ruff: noqa: B023  (each lambda is called inside the loop iteration that binds it)
import time

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchLinear

from mlx_tuner.dora import DoRASwitchLinear
from mlx_tuner.lora import LoRASwitchLinear

E, DIN, DOUT, R, PAIRS = 32, 2048, 768, 8, 2048  # Qwen3-30B-A3B's gate_proj, 32 experts


def ms(f, reps=5):
    mx.eval(f())
    t = time.perf_counter()
    for _ in range(reps):
        mx.eval(f())
    return (time.perf_counter() - t) / reps * 1e3


def extra_bytes(f):
    mx.eval(f())
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory()
    mx.eval(f())
    return mx.get_peak_memory() - start


mx.random.seed(0)
base = SwitchLinear(DIN, DOUT, E)
x = mx.random.normal((PAIRS, 1, DIN))
idx = mx.sort(mx.random.randint(0, E, (PAIRS,)))
print(f"device {mx.default_device()}; {E} experts {DIN} -> {DOUT}, r {R}, {PAIRS} token-slots")
for cls in (LoRASwitchLinear, DoRASwitchLinear):
    layer = cls.from_base(base, r=R, scale=2.0)
    layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.01
    layer.freeze()  # a LoRA step: the adapter's parameters only
    layer.unfreeze(keys=["lora_a", "lora_b", "m"], strict=False)
    step = nn.value_and_grad(layer, lambda: layer(x, idx, sorted_indices=True).sum())
    print(f"{cls.__name__:18s} forward+backward {ms(step):7.1f} ms per call")
    if cls is DoRASwitchLinear:
        a = layer.lora_a
        print(f"  of which the norms' W A^T {ms(lambda: layer._w_at(a)):7.1f} ms "
              f"(MLX's batched matmul: {ms(lambda: base.weight @ a.swapaxes(-1, -2)):7.1f} ms)")
        full = E * DOUT * DIN * 4
        naive = extra_bytes(lambda: mx.linalg.norm(base.weight + 2.0 * (layer.lora_b @ a), axis=-1))
        print(f"  extra memory of a forward: {extra_bytes(lambda: layer(x, idx)) / full:.3f} of one "
              f"float32 copy of the adapted experts (the naive norms alone: {naive / full:.2f})")
