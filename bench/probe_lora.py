"""Where the fused LoRA's time goes on the GPU (a diagnostic, not a benchmark row).

    python bench/probe_lora.py
Times, per layer, the base GEMM alone, the fused LoRA forward and forward+backward, both
as one layer per eval and as a chain of 8 layers per eval (which hides per-eval host
overhead), plus the rank-r pieces alone.
"""
import time

import mlx.core as mx

from mlx_tuner.ops import lora_linear


def t(fn, reps=20):
    for _ in range(3):
        mx.eval(fn())
    ts = []
    for _ in range(reps):
        s = time.perf_counter()
        mx.eval(fn())
        ts.append(time.perf_counter() - s)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


n, d, r = 4096, 4096, 16
k = mx.random.split(mx.random.key(0), 4)
x = mx.random.normal((n, d), key=k[0]).astype(mx.bfloat16)
w = (mx.random.normal((d, d), key=k[1]) / d**0.5).astype(mx.bfloat16)
a = mx.random.normal((d, r), key=k[2]) / d**0.5
b = mx.random.normal((r, d), key=k[3]) * 0.01
ab = a.astype(mx.bfloat16)
bb = b.astype(mx.bfloat16)
mx.eval(x, w, a, b, ab, bb)


def chain(f, depth):
    def run():
        h = x
        for _ in range(depth):
            h = f(h)
        return h
    return run


base = lambda h: h @ w.T
fused = lambda h: lora_linear(h, w, a, b, 2.0)
for depth in (1, 8):
    tb = t(chain(base, depth)) / depth
    tf = t(chain(fused, depth)) / depth
    print(f"forward  depth {depth}: base {tb:.3f} ms  fused {tf:.3f} ms  ratio {tf / tb:.3f}")


def step(f, depth):
    def loss(xx, aa, bb_):
        h = xx
        for _ in range(depth):
            h = f(h, aa, bb_)
        return h.astype(mx.float32).sum()
    g = mx.value_and_grad(loss, [0, 1, 2])
    return lambda: g(x, a, b)


for depth in (1, 8):
    tb = t(step(lambda h, aa, bb_: h @ w.T, depth)) / depth
    tf = t(step(lambda h, aa, bb_: lora_linear(h, w, aa, bb_, 2.0), depth)) / depth
    print(f"fwd+bwd  depth {depth}: base {tb:.3f} ms  fused {tf:.3f} ms  ratio {tf / tb:.3f}")

print(f"x@A bf16 {t(lambda: x @ ab):.3f} ms; (xA)@B {t(lambda: (x[:, :r] @ bb)):.3f} ms;"
      f" x^T g {t(lambda: x.T @ x[:, :r]):.3f} ms; x*2 {t(lambda: x * 2):.3f} ms")
