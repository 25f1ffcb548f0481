"""The numba kernels: products with ggml-block weights (quant.QuantizedMatrix), compiled from Python.

kernels.py uses these where the C kernels (_kernels.c) are not available: no compiler at install, or a
CPU without AVX2. Each kernel computes y[t, r] = W[r] . x[t] straight from the packed bytes, threads
splitting the weight rows (`prange`), and is checked against quant.py's NumPy dequantization in
tests/test_kernels.py.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# --- the compiled kernels --------------------------------------------------------------------------
#
# How the loops are written (each choice measured on [8192, 4096] matrices, benchmarks/NOTES.md):
# - The innermost loop is a reduction over one block's contiguous bytes into a scalar, with loads only:
#   LLVM's loop vectorizer turns it into SIMD. Loops that store into arrays (dequantize into a buffer,
#   accumulate into lanes of an array) stay scalar, because numba cannot tell LLVM that the arrays do
#   not alias.
# - The block length reaches the kernel as an argument (`n`), not as a constant: with a constant 32,
#   LLVM unrolls the loop before vectorizing it and then fails to vectorize the unrolled code (3x slower).
# - Offsets shared by a whole block (Q4_1's min, Q4_0's -8, the k-quants' mins) are applied once per
#   block through the sum of x over that block, computed once per call (`xs`), not per weight.


f32, i32 = np.float32, np.int32
jit = njit(parallel=True, fastmath=True, cache=True, nogil=True)
inline = njit(inline="always", fastmath=True, cache=True)

@inline
def f16(tab, b, o):
    """The fp16 at bytes o, o+1 of row b (little-endian), as float32."""
    return tab[i32(b[o]) | (i32(b[o + 1]) << 8)]

@jit
def q8_0(raw, x, out, tab, n):
    # Q8_0 [34 bytes]: d | 32 x int8; sum d * q * x
    R, nb = raw.shape[0], x.shape[1] // 32
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 34
                s = f32(0)
                for j in range(n):
                    s += f32(np.int8(row[o + 2 + j])) * xt[b * 32 + j]
                acc += f16(tab, row, o) * s
            out[t, r] = acc

@jit
def q4_0(raw, x, xs, out, tab, n):
    # Q4_0 [18 bytes]: d | 16 bytes: weight j = low nibble of byte j, weight j+16 = high nibble;
    # value d * (q - 8): sum = d * (sum q x - 8 * sum x)
    R, nb = raw.shape[0], x.shape[1] // 32
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 18
                s = f32(0)
                for j in range(n):
                    q = row[o + 2 + j]
                    s += f32(q & 15) * xt[b * 32 + j] + f32(q >> 4) * xt[b * 32 + 16 + j]
                acc += f16(tab, row, o) * (s - f32(8) * xs[t, b])
            out[t, r] = acc

@jit
def q4_1(raw, x, xs, out, tab, n):
    # Q4_1 [20 bytes]: d | m | 16 bytes (nibbles as Q4_0); value d * q + m: sum = d * sum q x + m * sum x
    R, nb = raw.shape[0], x.shape[1] // 32
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 20
                s = f32(0)
                for j in range(n):
                    q = row[o + 4 + j]
                    s += f32(q & 15) * xt[b * 32 + j] + f32(q >> 4) * xt[b * 32 + 16 + j]
                acc += f16(tab, row, o) * s + f16(tab, row, o + 2) * xs[t, b]
            out[t, r] = acc

@inline
def q5_dot(row, o, xt, xo, n):
    """sum q x over one Q5 block: low 4 bits in the 16 bytes at o+4, 5th bits in the u32 at o (qh)."""
    qh = i32(row[o]) | (i32(row[o + 1]) << 8) | (i32(row[o + 2]) << 16) | (i32(row[o + 3]) << 24)
    s = f32(0)
    for j in range(n):
        q = i32(row[o + 4 + j])
        lo = (q & 15) | (((qh >> j) & 1) << 4)
        hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
        s += f32(lo) * xt[xo + j] + f32(hi) * xt[xo + 16 + j]
    return s

@jit
def q5_0(raw, x, xs, out, tab, n):
    # Q5_0 [22 bytes]: d | qh u32 | 16 bytes; value d * (q - 16)
    R, nb = raw.shape[0], x.shape[1] // 32
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 22
                acc += f16(tab, row, o) * (q5_dot(row, o + 2, xt, b * 32, n) - f32(16) * xs[t, b])
            out[t, r] = acc

@jit
def q5_1(raw, x, xs, out, tab, n):
    # Q5_1 [24 bytes]: d | m | qh u32 | 16 bytes; value d * q + m
    R, nb = raw.shape[0], x.shape[1] // 32
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 24
                acc += f16(tab, row, o) * q5_dot(row, o + 4, xt, b * 32, n) + f16(tab, row, o + 2) * xs[t, b]
            out[t, r] = acc

@inline
def scale_min_k4(row, o, j):
    """Q4_K/Q5_K: sub-block j's 6-bit scale and min from the 12 bytes at o."""
    if j < 4:
        return i32(row[o + j]) & 63, i32(row[o + 4 + j]) & 63
    sc = (i32(row[o + 4 + j]) & 15) | ((i32(row[o + j - 4]) >> 6) << 4)
    mn = (i32(row[o + 4 + j]) >> 4) | ((i32(row[o + j]) >> 6) << 4)
    return sc, mn

@jit
def q4_k(raw, x, xs, out, tab, n):
    # Q4_K [144 bytes]: d | dmin | 12 bytes of 6-bit scales/mins | 128 bytes: bytes 32c..32c+31 hold
    # sub-block 2c (low nibbles) and 2c+1 (high nibbles); value (d*sc) * q - (dmin*mn)
    R, nb = raw.shape[0], x.shape[1] // 256
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 144
                d, dmin = f16(tab, row, o), f16(tab, row, o + 2)
                for c in range(4):
                    sc0, mn0 = scale_min_k4(row, o + 4, 2 * c)
                    sc1, mn1 = scale_min_k4(row, o + 4, 2 * c + 1)
                    xo = b * 256 + 64 * c
                    s0 = f32(0)
                    s1 = f32(0)
                    for j in range(n):
                        q = row[o + 16 + 32 * c + j]
                        s0 += f32(q & 15) * xt[xo + j]
                        s1 += f32(q >> 4) * xt[xo + 32 + j]
                    acc += d * (f32(sc0) * s0 + f32(sc1) * s1)
                    acc -= dmin * (f32(mn0) * xs[t, b * 8 + 2 * c] + f32(mn1) * xs[t, b * 8 + 2 * c + 1])
            out[t, r] = acc

@jit
def q5_k(raw, x, xs, out, tab, n):
    # Q5_K [176 bytes]: d | dmin | 12 bytes scales/mins | qh[32]: bit s of qh[l] is the 5th bit of
    # weight l of sub-block s | 128 bytes low nibbles as Q4_K
    R, nb = raw.shape[0], x.shape[1] // 256
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 176
                d, dmin = f16(tab, row, o), f16(tab, row, o + 2)
                for c in range(4):
                    sc0, mn0 = scale_min_k4(row, o + 4, 2 * c)
                    sc1, mn1 = scale_min_k4(row, o + 4, 2 * c + 1)
                    xo = b * 256 + 64 * c
                    s0 = f32(0)
                    s1 = f32(0)
                    for j in range(n):
                        q = i32(row[o + 48 + 32 * c + j])
                        h = i32(row[o + 16 + j])
                        s0 += f32((q & 15) | (((h >> (2 * c)) & 1) << 4)) * xt[xo + j]
                        s1 += f32((q >> 4) | (((h >> (2 * c + 1)) & 1) << 4)) * xt[xo + 32 + j]
                    acc += d * (f32(sc0) * s0 + f32(sc1) * s1)
                    acc -= dmin * (f32(mn0) * xs[t, b * 8 + 2 * c] + f32(mn1) * xs[t, b * 8 + 2 * c + 1])
            out[t, r] = acc

@jit
def q6_k(raw, x, xs16, out, tab, n):
    # Q6_K [210 bytes]: ql[128] | qh[64] | 16 int8 scales | d; two halves of 128 weights: in half h,
    # weight l+32k (k=0..3, l=0..31) has low bits ql[64h + l + 32(k&1)] (>> 4 when k >= 2) and top
    # bits (qh[32h+l] >> 2k) & 3; value (d*scale[s]) * (q - 32), s = 8h + 2k + l//16
    R, nb = raw.shape[0], x.shape[1] // 256
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 210
                d = f16(tab, row, o + 208)
                for h in range(2):
                    for l0 in range(0, 32, 16):
                        xo = b * 256 + 128 * h + l0
                        s0 = f32(0)
                        s1 = f32(0)
                        s2 = f32(0)
                        s3 = f32(0)
                        for j in range(n):
                            a = i32(row[o + 64 * h + l0 + j])
                            c = i32(row[o + 64 * h + 32 + l0 + j])
                            hb = i32(row[o + 128 + 32 * h + l0 + j])
                            s0 += f32((a & 15) | ((hb & 3) << 4)) * xt[xo + j]
                            s1 += f32((c & 15) | (((hb >> 2) & 3) << 4)) * xt[xo + 32 + j]
                            s2 += f32((a >> 4) | (((hb >> 4) & 3) << 4)) * xt[xo + 64 + j]
                            s3 += f32((c >> 4) | (((hb >> 6) & 3) << 4)) * xt[xo + 96 + j]
                        s = 8 * h + l0 // 16  # sub-block of k = 0; k adds 2
                        xb = b * 16 + s
                        acc += d * (f32(np.int8(row[o + 192 + s])) * (s0 - f32(32) * xs16[t, xb])
                                    + f32(np.int8(row[o + 194 + s])) * (s1 - f32(32) * xs16[t, xb + 2])
                                    + f32(np.int8(row[o + 196 + s])) * (s2 - f32(32) * xs16[t, xb + 4])
                                    + f32(np.int8(row[o + 198 + s])) * (s3 - f32(32) * xs16[t, xb + 6]))
            out[t, r] = acc

@jit
def q2_k(raw, x, xs16, out, tab, n):
    # Q2_K [84 bytes]: 16 bytes of scales (low nibble) and mins (high nibble) | 64 bytes: in half h,
    # bits 2k..2k+1 of byte 32h+l are weight 32k+l | d | dmin; value (d*sc) * q - (dmin*mn), s = 8h+2k+l//16
    R, nb = raw.shape[0], x.shape[1] // 256
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 84
                d, dmin = f16(tab, row, o + 80), f16(tab, row, o + 82)
                for h in range(2):
                    for l0 in range(0, 32, 16):
                        xo = b * 256 + 128 * h + l0
                        s0 = f32(0)
                        s1 = f32(0)
                        s2 = f32(0)
                        s3 = f32(0)
                        for j in range(n):
                            q = i32(row[o + 16 + 32 * h + l0 + j])
                            s0 += f32(q & 3) * xt[xo + j]
                            s1 += f32((q >> 2) & 3) * xt[xo + 32 + j]
                            s2 += f32((q >> 4) & 3) * xt[xo + 64 + j]
                            s3 += f32(q >> 6) * xt[xo + 96 + j]
                        s = 8 * h + l0 // 16
                        xb = b * 16 + s
                        for k, sk in enumerate((s0, s1, s2, s3)):
                            m = i32(row[o + s + 2 * k])
                            acc += d * f32(m & 15) * sk - dmin * f32(m >> 4) * xs16[t, xb + 2 * k]
            out[t, r] = acc

@inline
def scale_k3(row, o, s):
    """Q3_K: sub-block s's 6-bit scale from the 12 bytes at o, minus 32."""
    lo = (i32(row[o + (s & 7)]) >> (4 * (s >> 3))) & 15
    hi = (i32(row[o + 8 + (s & 3)]) >> (2 * (s >> 2))) & 3
    return (lo | (hi << 4)) - 32

@jit
def q3_k(raw, x, out, tab, n):
    # Q3_K [110 bytes]: hmask[32] | 64 bytes low 2 bits as Q2_K | 12 bytes of 6-bit scales | d;
    # bit 4h+k of hmask[l] set: weight 32k+l of half h keeps q, clear: q - 4. value (d*(sc-32)) * q
    R, nb = raw.shape[0], x.shape[1] // 256
    for r in prange(R):
        row = raw[r]
        for t in range(x.shape[0]):
            xt = x[t]
            acc = f32(0)
            for b in range(nb):
                o = b * 110
                d = f16(tab, row, o + 108)
                for h in range(2):
                    for l0 in range(0, 32, 16):
                        xo = b * 256 + 128 * h + l0
                        s0 = f32(0)
                        s1 = f32(0)
                        s2 = f32(0)
                        s3 = f32(0)
                        for j in range(n):
                            q = i32(row[o + 32 + 32 * h + l0 + j])
                            m = i32(row[o + l0 + j]) >> (4 * h)
                            s0 += f32((q & 3) - 4 + ((m & 1) << 2)) * xt[xo + j]
                            s1 += f32(((q >> 2) & 3) - 4 + (((m >> 1) & 1) << 2)) * xt[xo + 32 + j]
                            s2 += f32(((q >> 4) & 3) - 4 + (((m >> 2) & 1) << 2)) * xt[xo + 64 + j]
                            s3 += f32((q >> 6) - 4 + (((m >> 3) & 1) << 2)) * xt[xo + 96 + j]
                        s = 8 * h + l0 // 16
                        acc += d * (f32(scale_k3(row, o + 96, s)) * s0 + f32(scale_k3(row, o + 96, s + 2)) * s1
                                    + f32(scale_k3(row, o + 96, s + 4)) * s2 + f32(scale_k3(row, o + 96, s + 6)) * s3)
            out[t, r] = acc



# fp16 bit pattern -> float32 (256 KB): every block scale is an fp16, and numba has no half type.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)

_ID = {'Q8_0': 8, 'Q4_0': 2, 'Q4_1': 3, 'Q5_0': 6, 'Q5_1': 7, 'Q2_K': 10, 'Q3_K': 11, 'Q4_K': 12, 'Q5_K': 13, 'Q6_K': 14}

# Per ggml type id: (kernel, inner loop length n, which sums of x over groups the kernel needs: 32, 16 or none)
MATVEC = {
    _ID["Q8_0"]: (q8_0, 32, None), _ID["Q4_0"]: (q4_0, 16, 32), _ID["Q4_1"]: (q4_1, 16, 32),
    _ID["Q5_0"]: (q5_0, 16, 32), _ID["Q5_1"]: (q5_1, 16, 32),
    _ID["Q2_K"]: (q2_k, 16, 16), _ID["Q3_K"]: (q3_k, 16, None), _ID["Q4_K"]: (q4_k, 32, 32),
    _ID["Q5_K"]: (q5_k, 32, 32), _ID["Q6_K"]: (q6_k, 16, 16),
}




def matvec(x: np.ndarray, w) -> np.ndarray:
    """x [N, cols] float32 (C-contiguous) -> x @ W.T [N, rows] for a QuantizedMatrix of a type in MATVEC."""
    k, n, group = MATVEC[w.ggml_type]
    N, C = x.shape
    out = np.empty((N, w.shape[0]), np.float32)
    if group is None:
        k(w.raw, x, out, F16_TO_F32, n)
    else:
        xs = x.reshape(N, C // group, group).sum(axis=2)  # [N, C/group]: sums of x over each group
        k(w.raw, x, xs, out, F16_TO_F32, n)
    return out
