"""Time and minor page faults of a half-precision LoRA, QLoRA or DoRA forward+backward,
or a float32 KL divergence's, on the CPU (a diagnostic, not a benchmark row).

    cd bench && PYTHONPATH=../python python probe_cpu_faults.py [lora|qlora|dora] [n in out r]
    cd bench && PYTHONPATH=../python python probe_cpu_faults.py kl [rows V]

MLX's CPU allocator caches at most 32 MB of freed memory; a float32 copy of a larger
bf16 weight comes fresh from the OS at every call. Prints the median time of 15 calls
and the minor page faults a call (getrusage), so a change to the scratch memory can be
judged by both. Defaults: 256 tokens, the Qwen3-4B q_proj (2560 -> 4096), r 16; for kl
64 x 131,072 (a 32 MiB gradient: MLX's cache keeps 31.5 MiB at 63 rows, not 32).
"""
import resource
import sys
import time

import mlx.core as mx

from mlx_tuner import losses
from mlx_tuner.ops import dora_linear, lora_linear, qlora_linear

args = sys.argv[1:]
op = args.pop(0) if args and not args[0].isdigit() else "lora"
k = mx.random.split(mx.random.key(0), 4)

if op == "kl":  # a student and a teacher, (rows, V) each, float32
    n, vocab = (int(v) for v in (args[:2] if len(args) >= 2 else (64, 131072)))
    student = mx.random.normal((n, vocab), key=k[0])
    teacher = mx.random.normal((n, vocab), key=k[1])
    mx.eval(student, teacher)
    kl_grad = mx.value_and_grad(lambda s: losses.kl_div_loss(s, teacher).sum())
    what = f"{n} x {vocab} float32"

    def step():
        return kl_grad(student)
else:
    n, din, dout, r = (int(v) for v in (args[:4] if len(args) >= 4 else (256, 2560, 4096, 16)))
    dt = mx.bfloat16
    x = mx.random.normal((n, din), key=k[0]).astype(dt)
    w = (mx.random.normal((dout, din), key=k[1]) / din**0.5).astype(dt)
    a = mx.random.normal((din, r), key=k[2]) / din**0.5
    b = mx.random.normal((r, dout), key=k[3]) * 0.01
    dy = mx.ones((n, dout), dt)
    mx.eval(x, w, a, b, dy)
    what = f"bf16 {n} x {din} -> {dout}, r {r}"
    if op == "qlora":
        wq, sc, bi = mx.quantize(w, group_size=64, bits=4)
        fn = lambda x, a, b: qlora_linear(x, wq, sc, bi, a, b, 1.0, group_size=64, bits=4)  # noqa: E731
    elif op == "dora":
        m = mx.linalg.norm(w.astype(mx.float32), axis=1)
        fn = lambda x, a, b: dora_linear(x, w, a, b, m, 1.0)  # noqa: E731
    else:
        fn = lambda x, a, b: lora_linear(x, w, a, b, 1.0)  # noqa: E731

    def step():
        return mx.vjp(fn, [x, a, b], [dy])


for _ in range(3):
    mx.eval(step())
faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range(15):
    t = time.perf_counter()
    mx.eval(step())
    times.append(time.perf_counter() - t)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / 15
times.sort()
print(f"{op} forward+backward {what}: {times[7] * 1e3:.1f} ms a call, "
      f"{faults:.0f} minor page faults a call")
