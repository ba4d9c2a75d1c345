"""Quick GPU cross-check of the fused ops against their references (a diagnostic).

    python bench/probe_correct.py [substring ...]   (e.g. linear_ce: only those cases)
Prints the largest relative error of each output and gradient, fused vs reference, for
a few shapes of dora_linear, qlora_linear and linear_cross_entropy on the default device.
The "linear_ce grad_in_forward" lines give the loss and dh errors of the op with
grad_in_forward=True (on CUDA: dh from the forward) and, in brackets, without it (the
recompute backward): the two should be of one size.
"""
import os
import sys

os.environ.setdefault("MLX_TUNER_QLORA_CHUNK_ROWS", "128")
os.environ.setdefault("MLX_TUNER_CE_CHUNK", "256")
import mlx.core as mx

from mlx_tuner import ops


def rel(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / (mx.abs(b).max() + 1e-12)).item()


ONLY = sys.argv[1:]  # substrings of the case names to run (all when none)


def reported(check):
    """Runs check(name, ...) if the name matches ONLY; an exception is printed as that
    case's result, and the probe goes on to the next case."""
    def run(name, *args, **kw):
        if ONLY and not any(o in name for o in ONLY):
            return
        try:
            check(name, *args, **kw)
        except Exception as e:  # noqa: BLE001 - a diagnostic: report and continue
            print(f"{name}: ERROR {type(e).__name__}: {e}", flush=True)
    return run


@reported
def compare(name, fused, ref, args, argnums):
    gf = mx.value_and_grad(lambda *p: (fused(*p).astype(mx.float32) ** 2).sum(), argnums)(*args)
    gr = mx.value_and_grad(lambda *p: (ref(*p).astype(mx.float32) ** 2).sum(), argnums)(*args)
    errs = [rel(gf[0], gr[0])] + [rel(a, b) for a, b in zip(gf[1], gr[1])]
    print(f"{name}: loss {errs[0]:.2e}  grads " + " ".join(f"{e:.2e}" for e in errs[1:]),
          flush=True)


k = mx.random.split(mx.random.key(1), 6)
for dt in (mx.float32, mx.bfloat16):
    n, din, dout, r = 96, 384, 448, 8
    x = mx.random.normal((n, din), key=k[0]).astype(dt)
    w = (mx.random.normal((dout, din), key=k[1]) / din**0.5).astype(dt)
    a = mx.random.normal((din, r), key=k[2]) / din**0.5
    b = mx.random.normal((r, dout), key=k[3]) * 0.1
    m = mx.random.uniform(0.5, 1.5, (dout,), key=k[4])
    c = ops.dora_weight_sq_norm(w)
    compare(f"dora dense {dt}", lambda x, a, b, m: ops.dora_linear(x, w, a, b, m, 2.0, weight_sq_norm=c),
            lambda x, a, b, m: ops.dora_linear_reference(x, w, a, b, m, 2.0), (x, a, b, m), [0, 1, 2, 3])
    # bias (folded into the CUDA DoRAScale kernel, its gradient a column sum) and an odd
    # output width (not a multiple of 8: the scale kernels' scalar paths), with x_dropped
    bias = (mx.random.normal((dout,), key=k[5]) * 0.1).astype(dt)
    compare(f"dora dense+bias {dt}",
            lambda x, a, b, m, bias: ops.dora_linear(x, w, a, b, m, 2.0, bias, weight_sq_norm=c),
            lambda x, a, b, m, bias: ops.dora_linear_reference(x, w, a, b, m, 2.0, bias),
            (x, a, b, m, bias), [0, 1, 2, 3, 4])
    wo, bo, mo = w[:dout - 3], b[:, :dout - 3], m[:dout - 3]
    xd = x * (mx.random.uniform(shape=x.shape, key=k[4]) > 0.3).astype(dt)
    compare(f"dora odd out={dout - 3}+bias+x_dropped {dt}",
            lambda x, a, b, m, bias: ops.dora_linear(x, wo, a, b, m, 2.0, bias, x_dropped=xd),
            lambda x, a, b, m, bias: ops.dora_linear_reference(x, wo, a, b, m, 2.0, bias,
                                                               x_dropped=xd),
            (x, a, bo, mo, bias[:dout - 3]), [0, 1, 2, 3, 4])
    compare(f"lora {dt}", lambda x, a, b: ops.lora_linear(x, w, a, b, 2.0),
            lambda x, a, b: ops.lora_linear_reference(x, w, a, b, 2.0), (x, a, b), [0, 1, 2])
    # Every bits x group size: bench/probe_qlora.py (reference on the CPU: MLX's GPU
    # quantized kernels JIT-compile for minutes per case). MLX 0.32.4 CUDA fails f32 8-bit g128.
    for bits, gs in ((4, 64), (3, 32), (8, 64)):
        wq, sc, bi = mx.quantize(w, group_size=gs, bits=bits)
        kw = dict(group_size=gs, bits=bits)
        compare(f"qlora q{bits} g{gs} {dt}",
                lambda x, a, b: ops.qlora_linear(x, wq, sc, bi, a, b, 2.0, **kw),
                lambda x, a, b: ops.qlora_linear_reference(x, wq, sc, bi, a, b, 2.0, **kw),
                (x, a, b), [0, 1, 2])
    wq, sc, bi = mx.quantize(w, group_size=64, bits=4)
    compare(f"qdora q4+bias {dt}",
            lambda x, a, b, m, bias: ops.dora_linear(x, wq, a, b, m, 2.0, bias, scales=sc,
                                                     biases=bi),
            lambda x, a, b, m, bias: ops.dora_linear_reference(x, wq, a, b, m, 2.0, bias,
                                                               scales=sc, biases=bi),
            (x, a, b, m, bias), [0, 1, 2, 3, 4])
    V, d = 1000, 64  # noqa
    h = mx.random.normal((n, d), key=k[5]).astype(dt)
    wh = (mx.random.normal((V, d), key=k[1]) * 0.2).astype(dt)
    t = mx.random.randint(0, V, (n,), key=k[2])
    compare(f"linear_ce {dt}", lambda h, wh: ops.linear_cross_entropy(h, wh, t),
            lambda h, wh: ops.linear_cross_entropy_reference(h, wh, t), (h, wh), [0, 1])


@reported
def ce_case(name, N, d, V, dt, bias=False, chunk="256", confident=False):
    """linear_cross_entropy with grad_in_forward=True (dh from the forward) and without,
    each against the reference: loss and dh, ignored targets (-100, V), g = 0 rows.
    confident: h leans to its target's row (p_y near 1, dh small: no cancellation)."""
    os.environ["MLX_TUNER_CE_CHUNK"] = chunk  # "" = the kernels' own width
    kk = mx.random.split(mx.random.key(7), 5)
    h = mx.random.normal((N, d), key=kk[0])
    w = mx.random.normal((V, d), key=kk[1]) * d**-0.5 * 4
    t = mx.random.randint(0, V, (N,), key=kk[3])
    if confident:
        h = h * 0.1 + w[t] * 0.8  # p_y ~ 0.99
    h, w = h.astype(dt), w.astype(dt)
    b = (mx.random.normal((V,), key=kk[2]) * 0.5).astype(dt) if bias else None
    t = mx.where(mx.arange(N) % 9 == 4, -100, mx.where(mx.arange(N) % 13 == 6, V, t))
    g = mx.where(mx.arange(N) % 11 == 0, 0.0, mx.random.uniform(shape=(N,), key=kk[4]))

    def run(fn, **kw):
        f = lambda h: (fn(h, w, t, b, **kw).astype(mx.float32) * g).sum()  # noqa: E731
        return mx.value_and_grad(f)(h)

    lr, dhr = run(ops.linear_cross_entropy_reference)
    errs = []
    for hint in (True, False):
        lf, dhf = run(ops.linear_cross_entropy, grad_in_forward=hint)
        assert dhf.dtype == dt and dhf.shape == h.shape
        errs += [rel(lf, lr), rel(dhf, dhr)]
    print(f"linear_ce grad_in_forward {name} {dt}: loss {errs[0]:.2e} dh {errs[1]:.2e}  "
          f"(without: loss {errs[2]:.2e} dh {errs[3]:.2e})", flush=True)


for dt in (mx.float32, mx.bfloat16, mx.float16):
    ce_case("N=96 d=64 V=1000 chunk=256", 96, 64, 1000, dt)
    ce_case("N=96 d=64 V=1000 chunk=256 bias", 96, 64, 1000, dt, bias=True)
    ce_case("N=131 d=72 V=769 chunk=256", 131, 72, 769, dt)  # odd N, d; last chunk 1 column
    ce_case("N=96 d=64 V=1000 chunk=256 confident", 96, 64, 1000, dt, confident=True)
for dt in (mx.float32, mx.bfloat16):  # the kernels' own chunk width: 10 chunks, last partial
    ce_case("N=2048 d=512 V=151936", 2048, 512, 151936, dt, chunk="")
