"""Precision check, in numpy, of a JS forward design for the CUDA one-read kernel
(bench/GPU-NOTES.md, "Next"): pass 0 keeps each exp in float16, 2^15 e^(x - max), in the
slot of its bf16 logit, and takes the normalizer and sum P log P from the stored (rounded)
values, sum e~ ln e~ to first order as sum e~ (d + 15 ln 2) + (e~ - e'); pass 1 then needs
one log a pair, ln(P + Q): three special-function operations a pair instead of five.
Compared with float32 throughout (today's kernel, exps recomputed) against float64, on
rows of 151,936 bf16 logits and one of 7. Nothing here runs on a GPU.

    python tools/js_store_precision.py
"""
import numpy as np

LN2 = np.log(2.0)
F32 = np.float32


def js_f64(a, b):
    def log_softmax(x):
        x = x.astype(np.float64)
        m = np.max(x)
        return x - m - np.log(np.exp(x - m).sum())

    la, lb = log_softmax(a), log_softmax(b)
    p, q = np.exp(la), np.exp(lb)
    with np.errstate(divide="ignore", invalid="ignore"):  # masked entries: 0 * -inf, dropped
        lm = np.log(0.5 * (p + q))
        t = np.where(p > 0, p * (la - lm), 0.0) + np.where(q > 0, q * (lb - lm), 0.0)
    return 0.5 * t.sum()


def shifted(x):  # d = x - max, clamped as the kernel clamps it (a -inf logit weighs ~0)
    x = x.astype(F32)
    return np.maximum(x - np.max(x), F32(-100))


def js_from(side, a, b):
    """JS = (sum P ln P + sum Q ln Q) / 2 - sum S ln S / 2 + ln 2, S = P + Q, from each
    side's (P, sum P ln P): the second pass is the sum over S, one log a pair."""
    p, hp = side(a)
    q, hq = side(b)
    s = p + q
    with np.errstate(divide="ignore", invalid="ignore"):
        ss = np.where(s > 0, s * np.log(s), 0).sum(dtype=F32)
    return 0.5 * (hp + hq) - 0.5 * ss + F32(LN2)


def side_f32(x):
    """Float32 throughout, every exp recomputed in the second pass."""
    d = shifted(x)
    e = np.exp(d)
    z = e.sum(dtype=F32)
    return e / z, (e / z * (d - np.log(z))).sum(dtype=F32)


def side_stored(x):
    """The exps kept in float16 between the passes (the design)."""
    d = shifted(x) + F32(15 * LN2)
    e = np.exp(d)  # 2^15 e^(x - max) <= 32768: normal float16 down to ~20 below the max
    et = e.astype(np.float16).astype(F32)  # what pass 1 reads back
    z = et.sum(dtype=F32)
    t = (et * d + (et - e)).sum(dtype=F32)  # sum et ln et, first order in the rounding
    return et / z, t / z - np.log(z)


def bf16(x):
    u = np.asarray(x, F32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(F32)


def main():
    rng = np.random.default_rng(0)
    v = 151936
    x, y = bf16(3 * rng.standard_normal(v)), bf16(3 * rng.standard_normal(v))
    xm, ym = x.copy(), y.copy()
    xm[v // 2:] = ym[v // 2:] = -np.inf
    xo, yo = bf16(rng.standard_normal(v)), bf16(rng.standard_normal(v))
    xo[7] = yo[9] = 40
    idx = np.arange(v)
    cases = {
        "random, scale 3": (x, y),
        "identical rows": (x, x.copy()),
        "near (noise 1e-2)": (x, bf16(x + 0.01 * rng.standard_normal(v))),
        "near (noise 1e-1)": (x, bf16(x + 0.1 * rng.standard_normal(v))),
        "half masked (-inf)": (xm, ym),
        "large, scale 100": (bf16(100 * rng.standard_normal(v)), bf16(100 * rng.standard_normal(v))),
        "one peak each": (xo, yo),
        "tail 25 below": (bf16(np.where(idx < 10, 0.0, -25.0)), bf16(np.where(idx < 20, 0.0, -25.0))),
        "V = 7": (bf16(3 * rng.standard_normal(7)), bf16(3 * rng.standard_normal(7))),
    }
    print(f"{'row':20s} {'JS (float64)':>13s} {'float32 error':>14s} {'stored error':>13s}"
          f" {'bf16 half-ulp':>14s}")
    for name, (a, b) in cases.items():
        ref = js_f64(a, b)
        e32 = abs(float(js_from(side_f32, a, b)) - ref)
        e16 = abs(float(js_from(side_stored, a, b)) - ref)
        print(f"{name:20s} {ref:13.6g} {e32:14.3g} {e16:13.3g} {abs(ref) * 2**-9:14.3g}")


if __name__ == "__main__":
    main()
