"""Precision check, in numpy, of a JS forward design for the CUDA one-read kernel
(bench/GPU-NOTES.md, "Next"): pass 0 keeps each exp in float16, 2^15 e^(x - max), in the
slot of its bf16 logit, and takes the normalizer and sum P log P from the stored (rounded)
values, sum e~ ln e~ to first order as sum e~ (d + 15 ln 2) + (e~ - e'); pass 1 then needs
one log a pair, ln(P + Q): three special-function operations a pair instead of five.
Compared with float32 throughout (today's kernel, exps recomputed) against float64, on
rows of 151,936 bf16 logits and one of 7. Also the tensor-core candidates of GPU-NOTES
"Next" 3 (a): sum e~ lg e~ with the exponent as a float16 operand ("mma d", "mma d-15"),
or with e~ kept as bfloat16 and the raw logits as the other operand ("mma bf16 x"; float32
sums in numpy's order, which a tensor core's accumulation does not follow exactly), and
the kept exps with the sums taken from the unrounded values ("unrounded": two float32
sums an element fewer). Nothing here runs on a GPU.

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


def side_unrounded(x):
    """The exps kept in float16 for the second pass, but the sums (and so the normalizer)
    from the unrounded values: two float32 sums an element fewer (Z and the rounding term),
    at the price of sum P != 1 for the values the second pass reads."""
    d = shifted(x) + F32(15 * LN2)
    e = np.exp(d)
    et = e.astype(np.float16).astype(F32)
    z = e.sum(dtype=F32)
    return et / z, (e * d).sum(dtype=F32) / z - np.log(z)


F16 = np.float16
LOG2E = F32(1.4426950408889634)


def shifted2(x):
    """The kernel's base-2 exponent d = (x - max) log2e + 15, clamped at -20 as it clamps."""
    x = x.astype(F32)
    return np.maximum((x - np.max(x)) * LOG2E + F32(15), F32(-20))


def side_mma_f16(x, centred):
    """Candidate (a) of bench/GPU-NOTES.md "Next" 3: e~ in float16 as today, sum e~ lg e~
    by tensor cores with the exponent as a float16 operand: d itself (`centred` False) or
    d - 15 (True, one FADD an element more). Products exact, sums in float32."""
    d = shifted2(x)
    e = np.exp2(d)
    et = e.astype(F16).astype(F32)
    z = et.sum(dtype=F32)
    op = (d - F32(15)).astype(F16).astype(F32) + F32(15) if centred else d.astype(F16).astype(F32)
    a = (et * op).sum(dtype=F32) + (z - e.sum(dtype=F32)) * LOG2E  # bits, first order
    # sum P ln P = (a / z - log2 z) ln 2; this side's values in the (x - max) frame cancel in P
    return et / z, (a / z - np.log2(z)) * F32(LN2)


def side_mma_bf16_x(x):
    """Candidate (a) with e~ kept as bfloat16 (no shift) and the raw logits as the other
    operand: sum e~ lg e~ = log2e sum e~ x - f Z with f = max log2e (float32 sums)."""
    x = x.astype(F32)
    m = np.max(x)
    xc = np.maximum(x, m - F32(60 * LN2))  # the raw clamp, d >= -60
    f = m * LOG2E
    d = xc * LOG2E - f
    e = np.exp2(d)
    et = bf16(e)
    z = et.sum(dtype=F32)
    a = LOG2E * (et * xc).sum(dtype=F32) - f * z + (z - e.sum(dtype=F32)) * LOG2E
    return et / z, (a / z - np.log2(z)) * F32(LN2)


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
    lm = bf16(2 * rng.standard_normal(v) + np.where(idx % 1000 == 0, 14.0, 0.0))  # a few peaks
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
        "LLM-like, near": (lm, bf16(lm + 0.1 * rng.standard_normal(v))),
        "LLM-like, max ~40": (bf16(lm + 25), bf16(lm + 25 + 0.1 * rng.standard_normal(v))),
        "LLM-like, max ~500": (bf16(lm + 480), bf16(lm + 480 + 0.1 * rng.standard_normal(v))),
    }
    variants = {"float32": side_f32, "stored": side_stored, "unrounded": side_unrounded,
                "mma d": lambda x: side_mma_f16(x, False),
                "mma d-15": lambda x: side_mma_f16(x, True), "mma bf16 x": side_mma_bf16_x}
    print(f"{'row':20s} {'JS (float64)':>13s}" + "".join(f" {k:>11s}" for k in variants)
          + f" {'bf16 half-ulp':>14s}")
    for name, (a, b) in cases.items():
        ref = js_f64(a, b)
        errs = [abs(float(js_from(side, a, b)) - ref) for side in variants.values()]
        print(f"{name:20s} {ref:13.6g}" + "".join(f" {e:11.3g}" for e in errs)
              + f" {abs(ref) * 2**-9:14.3g}")


if __name__ == "__main__":
    main()
