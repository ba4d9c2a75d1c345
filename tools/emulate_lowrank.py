"""Lane-level numpy emulation of csrc/backend/cuda/lowrank.cu's tensor-core kernels
(project, project_quant, expand, reduce + finish) with the mma.sync m16n8k16 fragment layout of the PTX
ISA (the same as MLX's steel/tiles.cuh): it checks the kernels' index arithmetic and
shared-memory staging without a GPU. Keep it in step with the kernels.

    python tools/emulate_lowrank.py
"""
# ruff: noqa: E701, E702, E731, B023
# (terse on purpose: one line per lane formula, as in the kernels; the lambdas are
# called inside the loop that binds their variables)
import numpy as np

rng = np.random.default_rng(0)

def mma(acc, a, b):
    # a: per lane 4 regs of 2 values; b: per lane 2 regs of 2 values; acc per lane 4
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        (a0, a1), (a2, a3), (a4, a5), (a6, a7) = a[lane]
        A[g, 2*t], A[g, 2*t+1] = a0, a1
        A[g+8, 2*t], A[g+8, 2*t+1] = a2, a3
        A[g, 2*t+8], A[g, 2*t+9] = a4, a5
        A[g+8, 2*t+8], A[g+8, 2*t+9] = a6, a7
        (b0, b1), (b2, b3) = b[lane]
        B[2*t, g], B[2*t+1, g] = b0, b1
        B[2*t+8, g], B[2*t+9, g] = b2, b3
    C = A @ B
    for lane in range(32):
        g, t = lane // 4, lane % 4
        acc[lane][0] += C[g, 2*t]; acc[lane][1] += C[g, 2*t+1]
        acc[lane][2] += C[g+8, 2*t]; acc[lane][3] += C[g+8, 2*t+1]

def pack(M, si, sj, rows, cols, for_project):
    flat = M.reshape(-1)
    U, V = (16, rows) if for_project else (cols, 16)
    dst = np.zeros((U, V))
    for u in range(U):
        for v in range(V):
            if u < cols and v < rows:
                dst[u, v] = flat[u*sj + v*si]
    return dst

rng = np.random.default_rng(1)
PITCH, TILE, W = 72, 64, 8

def load_tile(m, r0, r_end, c0, w):
    v = []
    for lane in range(32):
        vs = []
        for i in range(4):
            e = lane + 32*i; row = r0 + e//8; col = c0 + (e % 8)*8
            vs.append(m[row, col:col+8].copy() if (row < r_end and col < w) else np.zeros(8))
        v.append(vs)
    return v

def store_tile(ts, v):
    for lane in range(32):
        for i in range(4):
            e = lane + 32*i
            ts[(e//8)*PITCH + (e % 8)*8:(e//8)*PITCH + (e % 8)*8 + 8] = v[lane][i]

def project(x, pk, r, s, gram=False):
    # gram: also G = pk pk^T from M's own fragments (the norm epilogue's), per block
    n, k = x.shape; c = np.zeros((n, r)); NT = 2 if gram else (1 if r <= 8 else 2); G = None
    tiles = (k + TILE - 1)//TILE
    for blk in range((n+15)//16):
        row0 = blk*16; red = np.zeros((W, NT*4, 32))
        for warp in range(W):
            xs = np.full(16*PITCH, np.nan)
            count = (tiles - warp + W - 1)//W if tiles > warp else 0
            tile = lambda i: warp + i*W  # the warps take the tiles in turn
            acc = [[[0.0]*4 for _ in range(32)] for _ in range(NT)]
            gacc = [[[0.0]*4 for _ in range(32)] for _ in range(2)]
            def mul(t):
                for q16 in range(TILE//16):
                    kk = t*TILE + q16*16
                    inside = kk < k  # past k: M's fragments are zero (x's tile is zero-filled)
                    B = lambda row, col: pk[row, col] if inside else 0.0
                    a, b0, b1 = [], [], []
                    for lane in range(32):
                        g, tt = lane//4, lane % 4
                        xa = g*PITCH + q16*16 + 2*tt
                        a.append(((xs[xa], xs[xa+1]), (xs[xa+8*PITCH], xs[xa+8*PITCH+1]), (xs[xa+8], xs[xa+9]), (xs[xa+8*PITCH+8], xs[xa+8*PITCH+9])))
                        b0.append(((B(g, kk+2*tt), B(g, kk+2*tt+1)), (B(g, kk+2*tt+8), B(g, kk+2*tt+9))))
                        b1.append(((B(g+8, kk+2*tt), B(g+8, kk+2*tt+1)), (B(g+8, kk+2*tt+8), B(g+8, kk+2*tt+9))))
                    mma(acc[0], a, b0)
                    if NT == 2: mma(acc[1], a, b1)
                    if gram:  # M's B fragments of rows gid, gid + 8 are its A fragment
                        ag = [(b0[ln][0], b1[ln][0], b0[ln][1], b1[ln][1]) for ln in range(32)]
                        mma(gacc[0], ag, b0); mma(gacc[1], ag, b1)
            # two tiles in flight (na, nb), as the kernel
            na = load_tile(x, row0, n, tile(0)*TILE, k) if 0 < count else None
            nb = load_tile(x, row0, n, tile(1)*TILE, k) if 1 < count else None
            for i in range(0, count, 2):
                store_tile(xs, na)
                na = load_tile(x, row0, n, tile(i+2)*TILE, k) if i + 2 < count else None
                mul(tile(i))
                if i + 1 >= count: break
                store_tile(xs, nb)
                nb = load_tile(x, row0, n, tile(i+3)*TILE, k) if i + 3 < count else None
                mul(tile(i + 1))
            for nt in range(NT):
                for q in range(4):
                    for lane in range(32): red[warp, nt*4+q, lane] = acc[nt][lane][q]
            if gram:
                gw = np.zeros((16, 16))
                for nt in range(2):
                    for q in range(4):
                        for lane in range(32):
                            gw[lane//4 + (8 if q >= 2 else 0), nt*8 + 2*(lane % 4) + (q & 1)] = gacc[nt][lane][q]
                if blk == 0: G = gw if G is None else G + gw  # every block makes the same G
        for nt in range(NT):
            for q in range(4):
                for lane in range(32):
                    g, tt = lane//4, lane % 4
                    row = row0 + g + (8 if q >= 2 else 0); j = nt*8 + 2*tt + (q & 1)
                    if row < n and j < r: c[row, j] = s*red[:, nt*4+q, lane].sum()
    return (c, G) if gram else c

def expand(p, pe, s, bias, n, cols):
    r = p.shape[1]; y = np.full((n, cols), np.nan); BC = W*128
    spans = (cols + BC - 1)//BC
    for blk, warp in ((b, w) for b in range(((n+15)//16)*spans) for w in range(W)):
        row0 = (blk//spans)*16; span0 = (blk % spans)*BC
        if row0 >= n: continue
        P = lambda row, j: p[row, j] if (row < n and j < r) else 0.0
        a = []
        for lane in range(32):
            g, t = lane//4, lane % 4; ra, rb = row0+g, row0+g+8
            a.append(((P(ra, 2*t), P(ra, 2*t+1)), (P(rb, 2*t), P(rb, 2*t+1)), (P(ra, 2*t+8), P(ra, 2*t+9)), (P(rb, 2*t+8), P(rb, 2*t+9))))
        c_end = min(cols, span0 + BC)
        for c0 in range(span0 + warp*TILE, c_end, W*TILE):  # the warps take 64 columns in turn
            ys = np.full(16*PITCH, np.nan)
            for nt in range(TILE//8):
                cb = c0 + nt*8
                inside = cb < c_end  # past c_end: zero fragments and bias, columns not stored
                E = lambda row, j: pe[row, j] if inside else 0.0
                b = []
                for lane in range(32):
                    g, t = lane//4, lane % 4
                    b.append(((E(cb+g, 2*t), E(cb+g, 2*t+1)), (E(cb+g, 2*t+8), E(cb+g, 2*t+9))))
                acc = [[0.0]*4 for _ in range(32)]
                mma(acc, a, b)
                for lane in range(32):
                    g, t = lane//4, lane % 4; col = cb + 2*t
                    hb = inside and bias is not None
                    b0 = bias[col] if hb else 0; b1 = bias[col+1] if hb else 0
                    yt = g*PITCH + nt*8 + 2*t
                    ys[yt], ys[yt+1] = s*acc[lane][0]+b0, s*acc[lane][1]+b1
                    ys[yt+8*PITCH], ys[yt+8*PITCH+1] = s*acc[lane][2]+b0, s*acc[lane][3]+b1
            for lane in range(32):
                for i in range(4):
                    e = lane + 32*i; row = row0 + e//8; col = c0 + (e % 8)*8
                    if row < n and col < c_end:
                        y[row, col:col+8] = ys[(e//8)*PITCH + (e % 8)*8:(e//8)*PITCH + (e % 8)*8 + 8]
    return y

def reduce(x, gm, r, slice_rows, s, di, dj, dshape):
    # a block: one 64-column strip, one slice of rows split among its warps in 16-row
    # steps; the warps' sums added in warp order; one partial per block
    assert slice_rows % (16*W) == 0
    n, k = x.shape
    col_blocks = (k + TILE - 1)//TILE; slices = (n + slice_rows - 1)//slice_rows
    part = np.full((slices, k, 16), np.nan)
    sub = slice_rows//W
    for by in range(slices):
        for bx in range(col_blocks):
            c_begin = bx*TILE
            accs = []
            for warp in range(W):
                re = min(n, by*slice_rows + (warp+1)*sub); rb = min(re, by*slice_rows + warp*sub)
                G = lambda row, j: gm[row, j] if (row < re and j < r) else 0.0
                def load_g(n0):
                    a = []
                    for lane in range(32):
                        g, t = lane//4, lane % 4; r0 = n0+2*t; r1, r8, r9 = r0+1, r0+8, r0+9
                        a.append(((G(r0, g), G(r1, g)), (G(r0, g+8), G(r1, g+8)), (G(r8, g), G(r9, g)), (G(r8, g+8), G(r9, g+8))))
                    return a
                acc = [[[0.0]*4 for _ in range(32)] for _ in range(8)]
                xs = np.full(16*PITCH, np.nan)
                def mul(a):
                    for nt in range(8):
                        b = []
                        for lane in range(32):
                            g, t = lane//4, lane % 4; xc = 2*t*PITCH + g + nt*8
                            b.append(((xs[xc], xs[xc+PITCH]), (xs[xc+8*PITCH], xs[xc+9*PITCH])))
                        mma(acc[nt], a, b)
                # two 16-row steps in flight, as the kernel
                na = ga = nb = gb = None
                if rb < re: na, ga = load_tile(x, rb, re, c_begin, k), load_g(rb)
                if rb + 16 < re: nb, gb = load_tile(x, rb+16, re, c_begin, k), load_g(rb+16)
                for n0 in range(rb, re, 32):
                    store_tile(xs, na); a = ga
                    if n0 + 32 < re: na, ga = load_tile(x, n0+32, re, c_begin, k), load_g(n0+32)
                    else: na = ga = None
                    mul(a)
                    if n0 + 16 >= re: break
                    store_tile(xs, nb); a = gb
                    if n0 + 48 < re: nb, gb = load_tile(x, n0+48, re, c_begin, k), load_g(n0+48)
                    else: nb = gb = None
                    mul(a)
                accs.append(acc)
            for half in range(2):
                red = np.zeros((W, 16, 32))
                for warp in range(W):
                    for u in range(4):
                        for q in range(4):
                            for lane in range(32): red[warp, u*4+q, lane] = accs[warp][half*4+u][lane][q]
                for e in range(16*32):
                    v, ln = e//32, e % 32; u, q = v//4, v % 4
                    tot = 0.0
                    for w in range(W): tot += red[w, v, ln]
                    j = ln//4 + (8 if q >= 2 else 0); col = c_begin + (half*4+u)*8 + 2*(ln % 4) + (q & 1)
                    if col < k: part[by, col, j] = tot
    d = np.zeros(dshape).reshape(-1)
    for i in range(k):
        for j in range(r):
            d[i*di + j*dj] = s*part[:, i, j].sum()
    return d.reshape(dshape)

def project_quant(wq_bytes, scales, biases, pk, r, n, k, bits, gs, gram=False):
    # lane (gid, tig) decodes 16 adjacent codes of rows gid, gid + 8 from the byte stream;
    # k step j multiplies the lane's columns 4j .. 4j+3 in slots (2tig, 2tig+1), (2tig+8, 2tig+9)
    c = np.zeros((n, r)); tiles = (k + TILE - 1)//TILE; row_bytes = k*bits//8; Gq = np.zeros((16, 16))
    def codes(row, col):  # the lane's 16 codes: two runs of 8, each `bits` bytes, little-endian
        src = wq_bytes[row*row_bytes + col*bits//8:]
        runs = [sum(int(src[h*bits + i]) << (8*i) for i in range(bits)) for h in range(2)]
        return [(runs[e//8] >> ((e % 8)*bits)) & ((1 << bits) - 1) for e in range(16)]
    for blk in range((n+15)//16):
        row0 = blk*16; red = np.zeros((W, 8, 32))
        for warp in range(W):
            acc = [[[0.0]*4 for _ in range(32)] for _ in range(2)]
            gacc = [[[0.0]*4 for _ in range(32)] for _ in range(2)]
            for t in range(warp, tiles, W):
                vals, ms = [], []
                for lane in range(32):
                    g, tt = lane//4, lane % 4; col = t*TILE + 16*tt; inside = col < k
                    lv = []
                    for row in (row0+g, row0+g+8):
                        ok = inside and row < n
                        q = codes(row, col) if ok else [0]*16
                        sc_, bi_ = (scales[row, col//gs], biases[row, col//gs]) if ok else (0.0, 0.0)
                        lv.append([sc_*v + bi_ for v in q])
                    vals.append(lv)
                    ms.append([pk[g + 8*nt, col:col+16] if inside else np.zeros(16) for nt in range(2)])
                for j in range(4):
                    e = 4*j
                    a = [((vals[ln][0][e], vals[ln][0][e+1]), (vals[ln][1][e], vals[ln][1][e+1]),
                          (vals[ln][0][e+2], vals[ln][0][e+3]), (vals[ln][1][e+2], vals[ln][1][e+3])) for ln in range(32)]
                    bs = [[((ms[ln][nt][e], ms[ln][nt][e+1]), (ms[ln][nt][e+2], ms[ln][nt][e+3])) for ln in range(32)] for nt in range(2)]
                    for nt in range(2): mma(acc[nt], a, bs[nt])
                    if gram:  # the same permutation on both sides of G = pk pk^T
                        ag = [(bs[0][ln][0], bs[1][ln][0], bs[0][ln][1], bs[1][ln][1]) for ln in range(32)]
                        for nt in range(2): mma(gacc[nt], ag, bs[nt])
            for nt in range(2):
                for q in range(4):
                    for lane in range(32): red[warp, nt*4+q, lane] = acc[nt][lane][q]
            if gram:
                for nt in range(2):
                    for q in range(4):
                        for lane in range(32):
                            Gq[lane//4 + (8 if q >= 2 else 0), nt*8 + 2*(lane % 4) + (q & 1)] += gacc[nt][lane][q] if blk == 0 else 0.0
        for nt in range(2):
            for q in range(4):
                for lane in range(32):
                    g, tt = lane//4, lane % 4
                    row = row0 + g + (8 if q >= 2 else 0); j = nt*8 + 2*tt + (q & 1)
                    if row < n and j < r: c[row, j] = red[:, nt*4+q, lane].sum()
    return (c, Gq) if gram else c

def quantize(w, bits, gs):
    # mx.quantize's affine layout: per group scale and bias, codes as a little-endian bit stream
    n, k = w.shape; q = np.zeros((n, k), dtype=np.int64); sc = np.zeros((n, k//gs)); bi = np.zeros((n, k//gs))
    for i in range(n):
        for g0 in range(0, k, gs):
            lo, hi = w[i, g0:g0+gs].min(), w[i, g0:g0+gs].max(); step = (hi - lo)/((1 << bits) - 1)
            sc[i, g0//gs], bi[i, g0//gs] = step, lo
            q[i, g0:g0+gs] = np.clip(np.round((w[i, g0:g0+gs] - lo)/step), 0, (1 << bits) - 1)
    stream = np.zeros(n*k*bits//8, dtype=np.uint8)
    for i in range(n):
        for j in range(k):
            bit = (i*k + j)*bits
            for b in range(bits):
                if (q[i, j] >> b) & 1: stream[(bit + b)//8] |= 1 << ((bit + b) % 8)
    return stream, sc, bi, sc[:, np.arange(k)//gs]*q + bi[:, np.arange(k)//gs]

# (100, 1552, ...) gives project's warps three or four x tiles (taken in turn), expand's
# blocks a whole and a partial 1024-column span; (800, ...) gives reduce's warps
# three and six 16-row steps in slices of 384 and 768 rows, the last slice partial
for (n, din, dout, r, sl) in [(40, 48, 80, 11, 128), (35, 144, 16, 5, 128), (17, 16, 208, 16, 128), (100, 1552, 32, 16, 128), (800, 32, 48, 8, 384)]:
    s = 0.7
    x = rng.standard_normal((n, din)); A = rng.standard_normal((din, r)); B = rng.standard_normal((r, dout)); bias = rng.standard_normal(dout)
    pk = pack(A, r, 1, din, r, True); pe = pack(B, dout, 1, r, dout, False)
    xa, G = project(x, pk, r, 1.0, gram=True); y = expand(xa, pe, s, bias, n, dout)
    assert np.abs(G - pk @ pk.T).max() < 1e-9, "the norm epilogue's G from M's fragments"
    dy = rng.standard_normal((n, dout))
    pkb = pack(B, 1, dout, dout, r, True); pea = pack(A, 1, r, r, din, False)
    g = project(dy, pkb, r, 1.0); dx = expand(g, pea, s, None, n, din)
    dA = reduce(x, g, r, sl, s, r, 1, (din, r)); dB = reduce(dy, xa, r, 2*sl, s, 1, dout, (r, dout))
    errs = [np.abs(xa - x @ A).max(), np.abs(y - (s*(xa @ B) + bias)).max(), np.abs(g - dy @ B.T).max(),
            np.abs(dx - s*(g @ A.T)).max(), np.abs(dA - s*(x.T @ g)).max(), np.abs(dB - s*(xa.T @ dy)).max()]
    print((n, din, dout, r), [f"{e:.1e}" for e in errs])
    # float64 throughout: anything above rounding is an indexing or staging error
    assert max(errs) < 1e-9, f"lowrank emulation disagrees for {(n, din, dout, r)}: {errs}"

# project_quant: odd bit widths, a partial last tile (din 1056 = 16.5 tiles at gs 32), a
# partial last row block, ranks under 8 and 16
for (n, din, r, bits, gs) in [(19, 1056, 5, 3, 32), (16, 640, 16, 4, 64), (9, 512, 9, 6, 128)]:
    wb, sc, bi, wd = quantize(rng.standard_normal((n, din)), bits, gs)
    A = rng.standard_normal((din, r)); pk = pack(A, r, 1, din, r, True)
    P, Gq = project_quant(wb, sc, bi, pk, r, n, din, bits, gs, gram=True)
    err = max(np.abs(P - wd @ A).max(), np.abs(Gq - pk @ pk.T).max())
    print((n, din, r, bits, gs), f"{err:.1e}")
    assert err < 1e-9, f"project_quant emulation disagrees for {(n, din, r, bits, gs)}: {err}"
