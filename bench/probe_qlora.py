"""QLoRA on the GPU against the reference on the CPU, for every bits x group size and
float32 / bfloat16 (a diagnostic). The reference runs on the CPU stream so that no MLX
quantized GPU kernel is JIT-compiled (on the H200 that took minutes for a few cases);
arrays cross between the devices through numpy.

    python bench/probe_qlora.py
Prints the largest relative error of y, dx, dA, dB per case (blocks of 128 rows /
columns, so that every case runs several dequantized blocks each way).
"""
import os

os.environ.setdefault("MLX_TUNER_QLORA_CHUNK_ROWS", "128")
import mlx.core as mx
import numpy as np

from mlx_tuner import ops


def run(dev, dt, x, wq, sc, bi, a, b, bits, gs, fused):
    """y and the gradients of sum(y**2) for x, A, B on device `dev`, as float32 numpy."""
    with mx.stream(dev):
        x = mx.array(x).astype(dt)
        q = (mx.array(wq), mx.array(sc).astype(dt), mx.array(bi).astype(dt))
        a, b = mx.array(a), mx.array(b)
        op = ops.qlora_linear if fused else ops.qlora_linear_reference

        def y(x, a, b):
            return op(x, *q, a, b, 2.0, group_size=gs, bits=bits)

        out = y(x, a, b).astype(mx.float32)
        grads = mx.grad(lambda *p: (y(*p).astype(mx.float32) ** 2).sum(), argnums=(0, 1, 2))(x, a, b)
        mx.eval(out, grads)
        return [np.array(out)] + [np.array(g.astype(mx.float32)) for g in grads]


def rel(a, b):
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


DEV = mx.gpu if mx.default_device() == mx.gpu else mx.cpu  # CPU: a self-check of the probe
rng = np.random.default_rng(0)
n, din, dout, r = 96, 384, 448, 8
worst = 0.0
for dt in (mx.float32, mx.bfloat16):
    for bits in (2, 3, 4, 5, 6, 8):
        for gs in (32, 64, 128):
            # Inputs rounded to dt once, quantized on the CPU, carried as float32 / uint32.
            with mx.stream(mx.cpu):
                x = mx.array(rng.standard_normal((n, din), dtype=np.float32)).astype(dt)
                w = mx.array(rng.standard_normal((dout, din), dtype=np.float32) / din**0.5).astype(dt)
                wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
                x, sc, bi = (v.astype(mx.float32) for v in (x, sc, bi))
                mx.eval(x, wq, sc, bi)
                host = [np.array(v) for v in (x, wq, sc, bi)]
            a = rng.standard_normal((din, r), dtype=np.float32) / din**0.5
            b = rng.standard_normal((r, dout), dtype=np.float32) * 0.1
            got = run(DEV, dt, *host, a, b, bits, gs, True)
            # The reference in float32 on the same (dt-rounded) values: MLX's own bfloat16
            # quantized matmul on the CPU is itself off by a few percent.
            ref = run(mx.cpu, mx.float32, *host, a, b, bits, gs, False)
            errs = [rel(g, e) for g, e in zip(got, ref)]
            worst = max(worst, max(errs))
            print(f"qlora q{bits} g{gs} {dt}: y {errs[0]:.2e}  dx {errs[1]:.2e}  "
                  f"dA {errs[2]:.2e}  dB {errs[3]:.2e}", flush=True)
print(f"worst {worst:.2e} (bfloat16 output rounding: about 4e-3)")
