"""Our quantizers: float32 weights -> ggml's blocks (the inverse of quant.py's dequantizers), and
llama.cpp's choice of block type per tensor for a "_M" file.

    >>> blocks = quantize(w, "Q4_K")                # float32 [rows, cols] -> uint8 [rows, cols/256*144]
    >>> np.allclose(dequantize(blocks, 12).reshape(w.shape), w, atol=...)

Three families, each written from the method of ggml's reference C code (ggml-quants.c), not copied:

- **32-weight blocks** (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1): one scale (and a min) per block from the block's
  extremes, then round. Whole-array NumPy; equal bit for bit to gguf-py's `gguf.quants.quantize`.
- **k-quants** (Q4_K, Q5_K, Q6_K): 256-weight super-blocks of 8 (or 16) sub-blocks, each with its own
  scale (and min) found by a small search that minimises a weighted squared error, the sub-block scales
  themselves quantized to 6 or 8 bits against one fp16 super-scale, and the weights finally rounded
  against the *quantized* scales. The search is branchy scalar work, so it runs as numba kernels
  (parallel over super-blocks); beside each kernel sits a NumPy version of the same arithmetic,
  vectorised over blocks but summing each block's weights in the same order, so a test can hold the
  two equal bit for bit.
- **plain floats** (F32, F16, BF16): conversions; BF16 rounds to nearest even, quieting NaNs, as ggml does.

Every float operation is float32 in the order ggml's C performs it (C promotes `float * int` to float; we
write `np.float32(...)` wherever NumPy or numba would otherwise widen to float64).
"""

from __future__ import annotations

import math
import re

import numpy as np
from numba import njit, prange

from .errors import FormatError, UnsupportedError
from .quant import GGML_TYPE_IDS, GGML_TYPES

f32 = np.float32

# ggml type ids of what we can write.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30

# Blocks per NumPy chunk: bounds the temporaries of the whole-array code to a few MB.
_CHUNK_WEIGHTS = 1 << 18

# ggml's GROUP_MAX_EPS: a group whose largest magnitude is below this is treated as all zeros.
_GROUP_MAX_EPS = f32(1e-15)


def _errstate():
    """Divisions by a zero scale and casts of the masked-out lanes they produce are expected: the results
    are replaced by np.where. Silence NumPy's warnings for exactly those."""
    return np.errstate(divide="ignore", invalid="ignore", over="ignore")


def _round_away(v: np.ndarray) -> np.ndarray:
    """C's roundf (halves away from zero), exactly: v - trunc(v) is exact in floating point."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= f32(0.5), t + np.sign(v), t)


def _fp16_bytes(v: np.ndarray) -> np.ndarray:
    """float32 [N] -> the little-endian fp16 bytes [N, 2] (round to nearest even, like F16C and NumPy)."""
    with _errstate():  # beyond 65504 is infinity, as in ggml
        return v.astype("<f2").view(np.uint8).reshape(-1, 2)  # [N] fp16 -> [N, 2] bytes


def _inverse(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d is 0 (ggml's `id = d ? 1.0f/d : 0.0f`)."""
    with _errstate():
        return np.where(d != 0, f32(1) / d, f32(0)).astype(np.float32)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """Per row, the element of largest magnitude with its sign (the first one on ties), as ggml picks it."""
    i = np.argmax(np.abs(x), axis=1)
    return np.take_along_axis(x, i[:, None], axis=1)[:, 0]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 [N, 32] of values < 16 -> [N, 16]: weight j in the low nibble of byte j, weight j+16 in the high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _bits5(q: np.ndarray) -> np.ndarray:
    """The 5th bits of q [N, 32] as a little-endian uint32 per block: bytes [N, 4]."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


# --- 32-weight blocks (NumPy, whole-array) ----------------------------------------------------

def _quantize_q8_0(x: np.ndarray) -> np.ndarray:
    # d = absmax / 127, q = round(x / d) in [-127, 127]
    d = np.abs(x).max(axis=1) / f32(127)  # [N]
    q = _round_away(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_fp16_bytes(d), q.view(np.uint8)], axis=1)


def _quantize_q4_0(x: np.ndarray) -> np.ndarray:
    # d = -(signed absmax) / 8, so the extreme maps to q = 0 (value -8 d); q = trunc(x / d + 8.5) capped at 15
    d = _signed_absmax(x) / f32(-8)
    q = np.minimum(np.trunc(x * _inverse(d)[:, None] + f32(8.5)), 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


def _quantize_q4_1(x: np.ndarray) -> np.ndarray:
    # value = d * q + m with m = min, d = (max - min) / 15
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / f32(15)
    q = np.minimum(np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + f32(0.5)), 15).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)


def _quantize_q5_0(x: np.ndarray) -> np.ndarray:
    # as Q4_0 with 32 levels: d = -(signed absmax) / 16, q = trunc(x / d + 16.5) capped at 31
    d = _signed_absmax(x) / f32(-16)
    q = np.minimum(np.trunc(x * _inverse(d)[:, None] + f32(16.5)), 31).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _bits5(q), _pack_nibbles(q & 0x0F)], axis=1)


def _quantize_q5_1(x: np.ndarray) -> np.ndarray:
    # as Q4_1 with 32 levels
    lo, hi = x.min(axis=1), x.max(axis=1)
    d = (hi - lo) / f32(31)
    q = np.minimum(np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + f32(0.5)), 31).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _bits5(q), _pack_nibbles(q & 0x0F)], axis=1)


# --- plain floats ------------------------------------------------------------------------------

def _to_f32(x: np.ndarray) -> np.ndarray:
    return x.astype("<f4").view(np.uint8)


def _to_f16(x: np.ndarray) -> np.ndarray:
    with _errstate():
        return x.astype("<f2").view(np.uint8)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """The top 16 bits of each float32, rounded to nearest even; a NaN stays a (quiet) NaN instead of
    rounding into an infinity. uint32 arithmetic cannot overflow here: only NaNs lie above 0xFF800000."""
    u = np.ascontiguousarray(x, dtype="<f4").view(np.uint32)
    r = (u >> 16) & 1
    r += u
    r += 0x7FFF
    r >>= 16
    nan = np.isnan(x)
    if nan.any():
        r[nan] = (u[nan] >> 16) | 0x0040
    return r.astype("<u2").view(np.uint8)


# --- k-quants: NumPy reference ----------------------------------------------------------------
#
# Each function below takes a batch of groups (sub-blocks) at once: arrays [M, n] and per-group values
# [M]. Loops run over the n weights of a group, accumulating [M]-vectors, so every sum adds its terms in
# the same order as the scalar kernels further down (and as ggml's C).

def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even (what adding 1.5 * 2**23 does in float32), as int32."""
    with _errstate():
        return np.rint(v).astype(np.int32)


def _fit_scale_min_np(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per group of x [M, n] with importance weights w [M, n]: levels L [M, n] in 0..nmax, a scale s and a
    min m (returned as -m >= 0) such that s * L + m approximates x, minimising sum w * (s*L + m - x)**2.

    Starts from the min/max grid, then tries nstep+1 slightly different grids (nmax + rmin + i*rdelta levels
    over the range); for each, the best s and m for its levels solve a 2x2 least-squares problem (with m
    capped at 0, as the format stores -m unsigned). A grid that lowers the error replaces the best so far,
    and the later grids are laid over the range from the best min found so far. (ggml's make_qkx2_quants.)
    """
    M, n = x.shape
    lo, hi = x[:, 0].copy(), x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        lo, hi = np.minimum(lo, x[:, i]), np.maximum(hi, x[:, i])
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = np.where(lo > 0, f32(0), lo)
    flat = hi == lo
    with _errstate():
        iscale = f32(nmax) / (hi - lo)
        scale = f32(1) / iscale
    with _errstate():
        L = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best = np.zeros(M, np.float32)
    for i in range(n):
        diff = scale * L[:, i].astype(np.float32) + lo - x[:, i]
        best = best + w[:, i] * (diff * diff)
    for step in range(nstep + 1):
        with _errstate():
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            La = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        Lf = La.astype(np.float32)
        sum_l = np.zeros(M, np.float32)
        sum_l2 = np.zeros(M, np.float32)
        sum_xl = np.zeros(M, np.float32)
        for i in range(n):
            wl = w[:, i] * Lf[:, i]
            sum_l = sum_l + wl
            sum_l2 = sum_l2 + wl * Lf[:, i]
            sum_xl = sum_xl + wl * x[:, i]
        D = sum_w * sum_l2 - sum_l * sum_l
        with _errstate():
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            capped = this_min > 0
            this_min = np.where(capped, f32(0), this_min)
            this_scale = np.where(capped, sum_xl / sum_l2, this_scale)
        err = np.zeros(M, np.float32)
        for i in range(n):
            diff = this_scale * Lf[:, i] + this_min - x[:, i]
            err = err + w[:, i] * (diff * diff)
        better = (D > 0) & (err < best) & ~flat
        L = np.where(better[:, None], La, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        lo = np.where(better, this_min, lo)
    L = np.where(flat[:, None], 0, L)
    scale = np.where(flat, f32(0), scale)
    return L.astype(np.uint8), scale.astype(np.float32), (-lo).astype(np.float32)


def _fit_scale_np(x, nmax: int):
    """Per group of x [M, n]: signed levels L [M, n] in -nmax..nmax-1 (returned offset by +nmax) and a
    scale s with s * L ~ x, minimising sum x**2 * (s*L - x)**2 (big weights matter most).

    Tries 19 grids that put the largest-magnitude weight at -(nmax + i/10) levels, i = -9..9, keeping the
    one whose least-squares scale explains most of the weighted signal. (ggml's make_qx_quants, rmse_type 1.)
    """
    M, n = x.shape
    mx = _signed_absmax(x)
    small = np.abs(mx) < _GROUP_MAX_EPS

    def levels(iscale):
        return np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(l):
        lf = l.astype(np.float32)
        sumlx = np.zeros(M, np.float32)
        suml2 = np.zeros(M, np.float32)
        for i in range(n):
            wi = x[:, i] * x[:, i]
            sumlx = sumlx + wi * x[:, i] * lf[:, i]
            suml2 = suml2 + wi * lf[:, i] * lf[:, i]
        return sumlx, suml2

    with _errstate():
        l = levels(f32(-nmax) / mx)
        sumlx, suml2 = sums(l)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            li = levels(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
            sx, s2 = sums(li)
            better = (s2 > 0) & (sx * sx > best * s2)
            l = np.where(better[:, None], li, l)
            scale = np.where(better, sx / s2, scale)
            best = np.where(better, scale * sx, best)
    L = np.where(small[:, None], 0, l + nmax)
    return L.astype(np.uint8), np.where(small, f32(0), scale).astype(np.float32)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins [N, 8] -> the 12 scale bytes of Q4_K/Q5_K (see quant.py's _scale_min_k4)."""
    out = np.empty((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _kquant_scales_np(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """The shared first half of Q4_K and Q5_K on super-blocks x [N, 256]: fit each 32-weight sub-block,
    then quantize its scale and min to 6 bits against the super-block's largest (fp16 d and dmin), and
    re-round every weight against the quantized pair. Returns (levels [N, 256], d, dmin, ls, lm)."""
    N = x.shape[0]
    xs = x.reshape(N * 8, 32)  # [N*8 sub-blocks, 32]
    sum_x2 = np.zeros(N * 8, np.float32)
    for i in range(32):
        sum_x2 = sum_x2 + xs[:, i] * xs[:, i]
    av_x = np.sqrt(sum_x2 / f32(32))
    w = av_x[:, None] + np.abs(xs)  # importance: |x| plus the sub-block's RMS
    L, scales, mins = _fit_scale_min_np(xs, w, nmax, rmin, rdelta, nstep)
    L = L.reshape(N, 8, 32)  # [N*8, 32] -> [N, sub-block, 32]
    scales, mins = scales.reshape(N, 8), mins.reshape(N, 8)  # [N*8] -> [N, 8]
    max_scale = scales.max(axis=1)
    max_scale = np.where(max_scale > 0, max_scale, f32(0))  # starts at +0, as in C (never -0)
    max_min = mins.max(axis=1)
    max_min = np.where(max_min > 0, max_min, f32(0))
    with _errstate():
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    # C stores the rounded int in a uint8 (mod 256) before capping at 63
    ls = np.minimum(_nearest(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(_nearest(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
    d = (max_scale / f32(63)).astype(np.float16)
    dmin = (max_min / f32(63)).astype(np.float16)
    dj = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # [N, 8]
    mj = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    with _errstate():
        # [N, 8, 32] + [N, 8, 1], / [N, 8, 1]
        requant = np.clip(_nearest((x.reshape(N, 8, 32) + mj[:, :, None]) / dj[:, :, None]), 0, nmax)
    L = np.where((dj != 0)[:, :, None], requant, L).astype(np.uint8)  # a zero scale keeps the fitted levels
    return L.reshape(N, 256), d, dmin, ls, lm  # [N, 8, 32] -> [N, 256]


def _quantize_q4_k_np(x: np.ndarray) -> np.ndarray:
    # Q4_K [144 bytes]: d | dmin | scales[12] | qs[128]; qs[32c + l] = L[64c + l] | L[64c + 32 + l] << 4
    N = x.shape[0]
    L, d, dmin, ls, lm = _kquant_scales_np(x, 15, -1.0, 0.1, 20)
    L = L.reshape(N, 4, 2, 32)  # [N, chunk, half, 32]
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(N, 128)  # [N, 4, 32] -> [N, 128]
    return np.concatenate([d.view(np.uint8).reshape(N, 2), dmin.view(np.uint8).reshape(N, 2),
                           _pack_scales_k4(ls, lm), qs], axis=1)


def _quantize_q5_k_np(x: np.ndarray) -> np.ndarray:
    # Q5_K [176 bytes]: d | dmin | scales[12] | qh[32] | qs[128]; low nibbles as Q4_K, bit s of qh[l] is
    # the 5th bit of weight l of sub-block s
    N = x.shape[0]
    L, d, dmin, ls, lm = _kquant_scales_np(x, 31, -0.5, 0.1, 15)
    low = (L & 0x0F).reshape(N, 4, 2, 32)  # [N, chunk, half, 32]
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(N, 128)  # [N, 4, 32] -> [N, 128]
    high = (L >> 4).reshape(N, 8, 32)  # [N, sub-block s, l]
    qh = np.packbits(high.transpose(0, 2, 1), axis=2, bitorder="little").reshape(N, 32)  # bit s of byte l
    return np.concatenate([d.view(np.uint8).reshape(N, 2), dmin.view(np.uint8).reshape(N, 2),
                           _pack_scales_k4(ls, lm), qh, qs], axis=1)


def _quantize_q6_k_np(x: np.ndarray) -> np.ndarray:
    # Q6_K [210 bytes]: ql[128] | qh[64] | scales int8[16] | d fp16; 16 sub-blocks of 16, signed levels
    N = x.shape[0]
    L, scales = _fit_scale_np(x.reshape(N * 16, 16), 32)  # [N*16, 16] levels + 32, [N*16]
    L, scales = L.reshape(N, 16, 16).astype(np.int32), scales.reshape(N, 16)  # [N, sub-block, 16], [N, 16]
    i = np.argmax(np.abs(scales), axis=1)
    max_scale = np.take_along_axis(scales, i[:, None], axis=1)[:, 0]
    zero = np.abs(max_scale) < _GROUP_MAX_EPS
    with _errstate():
        iscale = f32(-128) / max_scale
        d = (f32(1) / iscale).astype(np.float16)
        sc = np.minimum(_nearest(iscale[:, None] * scales), 127)  # [N, 16], in -128..127
        dj = d.astype(np.float32)[:, None] * sc.astype(np.float32)
        requant = np.clip(_nearest(x.reshape(N, 16, 16) / dj[:, :, None]), -32, 31) + 32  # [N, 16, 16] / [N, 16, 1]
    L = np.where((dj != 0)[:, :, None], requant, L).reshape(N, 2, 4, 32)  # [N, half, quarter, 32]
    ql = np.concatenate([L[:, :, 0] & 0x0F | (L[:, :, 2] & 0x0F) << 4,
                         L[:, :, 1] & 0x0F | (L[:, :, 3] & 0x0F) << 4], axis=2)  # [N, half, 64]
    qh = (L[:, :, 0] >> 4) | (L[:, :, 1] >> 4) << 2 | (L[:, :, 2] >> 4) << 4 | (L[:, :, 3] >> 4) << 6  # [N, half, 32]
    # [N, 2, 64] -> [N, 128] and [N, 2, 32] -> [N, 64], then [N, 16] scales and [N, 2] bytes of d
    out = np.concatenate([ql.reshape(N, 128).astype(np.uint8), qh.reshape(N, 64).astype(np.uint8),
                          sc.astype(np.int8).view(np.uint8), d.view(np.uint8).reshape(N, 2)], axis=1)
    out[zero] = 0  # an all-zero super-block is all zero bytes
    return out


# --- k-quants: numba kernels ------------------------------------------------------------------------
#
# The same arithmetic as the NumPy versions above. A kernel takes a chunk of super-blocks and lays their
# groups side by side as lanes, arrays [n weights, G groups]: each group still sums its weights in order
# (bit-equal results), while the loops over lanes have no dependency between iterations, so LLVM turns
# them into AVX2 code instead of waiting on one long chain of additions.

_NB = dict(cache=True, error_model="numpy")  # IEEE division (no ZeroDivisionError checks in the loops)
_BLOCKS_PER_TASK = 8  # super-blocks per chunk: 64 (Q4_K/Q5_K) or 128 (Q6_K) lanes, a few KB of scratch


@njit(**_NB)
def _fp16(v):
    """Round float32 v to the nearest fp16 (ties to even). Returns (the rounded value as float32, its bits).

    Scaling by powers of two is exact, so rounding the scaled value to an integer rounds the significand:
    11 bits for normal fp16 values, a fixed quantum of 2**-24 below 2**-14 (subnormals)."""
    a = abs(float(v))
    neg = math.copysign(1.0, float(v)) < 0
    if a != a:
        return f32(np.nan), np.uint16(0x7E00)
    if a >= 65520.0:  # past the midpoint between 65504 (the largest fp16) and 65536: infinity
        r, bits = math.inf, 0x7C00
    elif a < 2.0 ** -14:
        m = np.rint(a * 2.0 ** 24)  # 0 .. 1024 (1024 is the smallest normal)
        r, bits = m * 2.0 ** -24, int(m)
    else:
        mant, e = math.frexp(a)  # a = mant * 2**e, 0.5 <= mant < 1
        r = math.ldexp(np.rint(mant * 2048.0), e - 11)  # 11 significant bits
        mant, e = math.frexp(r)  # r may have rounded up into the next binade
        bits = ((e - 1 + 15) << 10) | (int(mant * 2048.0) - 1024)
    if neg:
        r, bits = -r, bits | 0x8000
    return f32(r), np.uint16(bits)


@njit(**_NB)
def _put_f16(out, pos, bits):
    out[pos] = bits & 0xFF
    out[pos + 1] = bits >> 8


@njit(**_NB)
def _level(v, lo, hi):
    """nearest_int(v) clamped to [lo, hi], as a float (exact: small integers)."""
    return min(max(np.rint(v), lo), hi)


@njit(**_NB)
def _fit_scale_min_lanes(x, w, nmax, rmin, rdelta, nstep, L, scale, the_min):
    """_fit_scale_min_np on groups side by side: x, w float32 [n, G]; fills L float32 [n, G] (levels),
    scale and the_min float32 [G]."""
    n, G = x.shape
    top = f32(nmax)
    La = np.empty((n, G), np.float32)
    lo, hi, sum_w, sum_x = x[0].copy(), x[0].copy(), w[0].copy(), np.empty(G, np.float32)
    iscale, best, ok = np.empty(G, np.float32), np.zeros(G, np.float32), np.empty(G, np.bool_)
    sum_l, sum_l2, sum_xl = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    ts, tm, err = np.empty(G, np.float32), np.empty(G, np.float32), np.empty(G, np.float32)
    for g in range(G):
        sum_x[g] = sum_w[g] * x[0, g]
    for i in range(1, n):
        for g in range(G):
            lo[g] = min(lo[g], x[i, g])
            hi[g] = max(hi[g], x[i, g])
            sum_w[g] += w[i, g]
            sum_x[g] += w[i, g] * x[i, g]
    for g in range(G):
        if lo[g] > 0:
            lo[g] = f32(0)
        ok[g] = hi[g] != lo[g]  # a flat group keeps L = 0, scale 0
        iscale[g] = top / (hi[g] - lo[g]) if ok[g] else f32(0)
        scale[g] = f32(1) / iscale[g] if ok[g] else f32(0)
    for i in range(n):
        for g in range(G):
            L[i, g] = _level(iscale[g] * (x[i, g] - lo[g]), f32(0), top)
            diff = scale[g] * L[i, g] + lo[g] - x[i, g]
            best[g] += w[i, g] * (diff * diff)
    for step in range(nstep + 1):
        grid = rmin + rdelta * f32(step) + top
        for g in range(G):
            iscale[g] = grid / (hi[g] - lo[g]) if ok[g] else f32(0)
            sum_l[g] = sum_l2[g] = sum_xl[g] = err[g] = f32(0)
        for i in range(n):
            for g in range(G):
                la = _level(iscale[g] * (x[i, g] - lo[g]), f32(0), top)
                La[i, g] = la
                wl = w[i, g] * la
                sum_l[g] += wl
                sum_l2[g] += wl * la
                sum_xl[g] += wl * x[i, g]
        for g in range(G):
            D = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g]
            ts[g] = (sum_w[g] * sum_xl[g] - sum_x[g] * sum_l[g]) / D
            tm[g] = (sum_l2[g] * sum_x[g] - sum_l[g] * sum_xl[g]) / D
            if tm[g] > 0:
                tm[g] = f32(0)
                ts[g] = sum_xl[g] / sum_l2[g]
            if not D > 0:
                ts[g] = tm[g] = f32(0)  # not a candidate (keeps the error loop free of NaNs)
        for i in range(n):
            for g in range(G):
                diff = ts[g] * La[i, g] + tm[g] - x[i, g]
                err[g] += w[i, g] * (diff * diff)
        for g in range(G):
            D = sum_w[g] * sum_l2[g] - sum_l[g] * sum_l[g]
            if ok[g] and D > 0 and err[g] < best[g]:
                best[g] = err[g]
                scale[g] = ts[g]
                lo[g] = tm[g]
                for i in range(n):
                    L[i, g] = La[i, g]
    for g in range(G):
        the_min[g] = -lo[g]


@njit(**_NB)
def _put_scales_k4(ls, lm, out, pos):
    for j in range(4):
        out[pos + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
        out[pos + 4 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
        out[pos + 8 + j] = (ls[j + 4] & 0x0F) | ((lm[j + 4] & 0x0F) << 4)


@njit(**_NB)
def _kquant_chunk(x, nmax, rmin, rdelta, nstep, out):
    """Q4_K (nmax 15) or Q5_K (nmax 31) of super-blocks x float32 [C, 256] into out uint8 [C, 144 or 176]
    (see _kquant_scales_np and the packing of _quantize_q4_k_np / _quantize_q5_k_np)."""
    C = x.shape[0]
    G = 8 * C
    xt = np.empty((32, G), np.float32)  # [weight i, group g]: group g is sub-block g % 8 of block g // 8
    for g in range(G):
        for i in range(32):
            xt[i, g] = x[g // 8, 32 * (g % 8) + i]
    sum_x2 = np.zeros(G, np.float32)
    for i in range(32):
        for g in range(G):
            sum_x2[g] += xt[i, g] * xt[i, g]
    w = np.empty((32, G), np.float32)
    for i in range(32):
        for g in range(G):
            w[i, g] = np.sqrt(sum_x2[g] / f32(32)) + abs(xt[i, g])
    L = np.empty((32, G), np.float32)
    scales, mins = np.empty(G, np.float32), np.empty(G, np.float32)
    _fit_scale_min_lanes(xt, w, nmax, rmin, rdelta, nstep, L, scales, mins)
    ls, lm, q = np.empty(8, np.uint8), np.empty(8, np.uint8), np.empty(256, np.uint8)
    for b in range(C):
        max_scale = f32(0)
        max_min = f32(0)
        for j in range(8):  # strict >, from +0: the max is never -0 (its sign would reach the fp16 bits)
            if scales[8 * b + j] > max_scale:
                max_scale = scales[8 * b + j]
            if mins[8 * b + j] > max_min:
                max_min = mins[8 * b + j]
        inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
        inv_min = f32(63) / max_min if max_min > 0 else f32(0)
        for j in range(8):
            ls[j] = min(int(np.rint(inv_scale * scales[8 * b + j])) & 0xFF, 63)
            lm[j] = min(int(np.rint(inv_min * mins[8 * b + j])) & 0xFF, 63)
        d, d_bits = _fp16(max_scale / f32(63))
        dmin, dmin_bits = _fp16(max_min / f32(63))
        for j in range(8):
            dj = d * f32(ls[j])
            mj = dmin * f32(lm[j])
            for i in range(32):
                if dj == 0:  # a zero scale keeps the fitted levels
                    q[32 * j + i] = np.uint8(L[i, 8 * b + j])
                else:
                    q[32 * j + i] = np.uint8(_level((x[b, 32 * j + i] + mj) / dj, f32(0), f32(nmax)))
        o = out[b]
        _put_f16(o, 0, d_bits)
        _put_f16(o, 2, dmin_bits)
        _put_scales_k4(ls, lm, o, 4)
        if nmax == 15:  # Q4_K: qs[32c + i] = q[64c + i] | q[64c + 32 + i] << 4
            for c in range(4):
                for i in range(32):
                    o[16 + 32 * c + i] = q[64 * c + i] | (q[64 * c + 32 + i] << 4)
        else:  # Q5_K: qh[i] bit s = 5th bit of weight i of sub-block s, then the low nibbles as Q4_K
            for i in range(32):
                h = 0
                for s in range(8):
                    h |= (q[32 * s + i] >> 4) << s
                o[16 + i] = h
            for c in range(4):
                for i in range(32):
                    o[48 + 32 * c + i] = (q[64 * c + i] & 0x0F) | ((q[64 * c + 32 + i] & 0x0F) << 4)


@njit(**_NB)
def _fit_scale_lanes(x, nmax, L, scale):
    """_fit_scale_np on groups side by side: x float32 [n, G]; fills L float32 [n, G] (levels + nmax)
    and scale float32 [G]."""
    n, G = x.shape
    lo, hi, off = f32(-nmax), f32(nmax - 1), f32(nmax)
    amax, mx = np.zeros(G, np.float32), np.zeros(G, np.float32)
    iscale, best = np.empty(G, np.float32), np.empty(G, np.float32)
    sumlx, suml2 = np.zeros(G, np.float32), np.zeros(G, np.float32)
    wx = np.empty((n, G), np.float32)  # x**2 * x: C's w*x[i]*l multiplies left to right
    La = np.empty((n, G), np.float32)
    for i in range(n):
        for g in range(G):
            if abs(x[i, g]) > amax[g]:
                amax[g] = abs(x[i, g])
                mx[g] = x[i, g]
            wx[i, g] = x[i, g] * x[i, g] * x[i, g]
    for g in range(G):
        iscale[g] = f32(-nmax) / mx[g] if amax[g] >= _GROUP_MAX_EPS else f32(0)
    for i in range(n):
        for g in range(G):
            l = _level(iscale[g] * x[i, g], lo, hi)
            L[i, g] = l + off
            sumlx[g] += wx[i, g] * l
            suml2[g] += x[i, g] * x[i, g] * l * l
    for g in range(G):
        scale[g] = sumlx[g] / suml2[g] if suml2[g] != 0 else f32(0)
        best[g] = scale[g] * sumlx[g]
    for step in range(-9, 10):
        if step == 0:
            continue
        grid = -(f32(nmax) + f32(0.1) * f32(step))
        for g in range(G):
            iscale[g] = grid / mx[g] if amax[g] >= _GROUP_MAX_EPS else f32(0)
            sumlx[g] = suml2[g] = f32(0)
        for i in range(n):
            for g in range(G):
                l = _level(iscale[g] * x[i, g], lo, hi)
                La[i, g] = l
                sumlx[g] += wx[i, g] * l
                suml2[g] += x[i, g] * x[i, g] * l * l
        for g in range(G):
            if suml2[g] > 0 and sumlx[g] * sumlx[g] > best[g] * suml2[g]:
                scale[g] = sumlx[g] / suml2[g]
                best[g] = scale[g] * sumlx[g]
                for i in range(n):
                    L[i, g] = La[i, g] + off
    for g in range(G):
        if amax[g] < _GROUP_MAX_EPS:
            scale[g] = f32(0)
            for i in range(n):
                L[i, g] = f32(0)


@njit(**_NB)
def _q6_k_chunk(x, out):
    """Q6_K of super-blocks x float32 [C, 256] into out uint8 [C, 210] (see _quantize_q6_k_np)."""
    C = x.shape[0]
    G = 16 * C
    xt = np.empty((16, G), np.float32)  # [weight i, group g]: group g is sub-block g % 16 of block g // 16
    for g in range(G):
        for i in range(16):
            xt[i, g] = x[g // 16, 16 * (g % 16) + i]
    L = np.empty((16, G), np.float32)
    scales = np.empty(G, np.float32)
    _fit_scale_lanes(xt, 32, L, scales)
    q, sc = np.empty(256, np.uint8), np.empty(16, np.int64)
    for b in range(C):
        o = out[b]
        max_scale = f32(0)
        max_abs = f32(0)
        for j in range(16):
            s = scales[16 * b + j]
            if abs(s) > max_abs:
                max_abs = abs(s)
                max_scale = s
        if max_abs < _GROUP_MAX_EPS:
            for k in range(210):
                o[k] = 0
            continue
        iscale = f32(-128) / max_scale
        d, d_bits = _fp16(f32(1) / iscale)
        for j in range(16):
            sc[j] = min(int(np.rint(iscale * scales[16 * b + j])), 127)
            dj = d * f32(sc[j])
            for i in range(16):
                if dj == 0:
                    q[16 * j + i] = np.uint8(L[i, 16 * b + j])
                else:
                    q[16 * j + i] = np.uint8(_level(x[b, 16 * j + i] / dj, f32(-32), f32(31)) + f32(32))
        for h in range(2):
            for i in range(32):
                q1, q2 = q[128 * h + i], q[128 * h + 32 + i]
                q3, q4 = q[128 * h + 64 + i], q[128 * h + 96 + i]
                o[64 * h + i] = (q1 & 0x0F) | ((q3 & 0x0F) << 4)
                o[64 * h + 32 + i] = (q2 & 0x0F) | ((q4 & 0x0F) << 4)
                o[128 + 32 * h + i] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
        for j in range(16):
            o[192 + j] = sc[j] & 0xFF
        _put_f16(o, 208, d_bits)


@njit(parallel=True, **_NB)
def _quantize_q45_k_nb(x, out, nmax, rmin, rdelta, nstep):
    """x float32 [N, 256] -> out uint8 [N, 144] (Q4_K) or [N, 176] (Q5_K), chunks of super-blocks in
    parallel. One kernel for both (the parameters pick the type), so numba compiles it once."""
    for t in prange((x.shape[0] + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK):
        a, b = t * _BLOCKS_PER_TASK, min((t + 1) * _BLOCKS_PER_TASK, x.shape[0])
        _kquant_chunk(x[a:b], nmax, rmin, rdelta, nstep, out[a:b])


def _quantize_q4_k_nb(x, out):
    _quantize_q45_k_nb(x, out, 15, f32(-1.0), f32(0.1), 20)  # ggml's grid search for Q4_K


def _quantize_q5_k_nb(x, out):
    _quantize_q45_k_nb(x, out, 31, f32(-0.5), f32(0.1), 15)  # and for Q5_K


@njit(parallel=True, **_NB)
def _quantize_q6_k_nb(x, out):
    """x float32 [N, 256] -> out uint8 [N, 210]."""
    for t in prange((x.shape[0] + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK):
        a, b = t * _BLOCKS_PER_TASK, min((t + 1) * _BLOCKS_PER_TASK, x.shape[0])
        _q6_k_chunk(x[a:b], out[a:b])


# --- the public entry point --------------------------------------------------------------------

_NUMPY = {
    Q8_0: _quantize_q8_0, Q4_0: _quantize_q4_0, Q4_1: _quantize_q4_1, Q5_0: _quantize_q5_0, Q5_1: _quantize_q5_1,
    Q4_K: _quantize_q4_k_np, Q5_K: _quantize_q5_k_np, Q6_K: _quantize_q6_k_np,
}
_KERNELS = {Q4_K: _quantize_q4_k_nb, Q5_K: _quantize_q5_k_nb, Q6_K: _quantize_q6_k_nb}
_PLAIN = {F32: _to_f32, F16: _to_f16, BF16: _to_bf16}
QUANTIZABLE: frozenset[int] = frozenset(_NUMPY) | frozenset(_PLAIN)


def type_id(t) -> int:
    """A ggml type id from an id or a name ("Q4_K", "q8_0"); UnsupportedError for one we cannot write."""
    if isinstance(t, str):
        i = GGML_TYPE_IDS.get(t.upper())
        if i is None:
            raise UnsupportedError(f"unknown ggml type {t!r}")
        t = i
    if t not in QUANTIZABLE:
        name = GGML_TYPES[t].name if t in GGML_TYPES else str(t)
        raise UnsupportedError(f"quantizing to ggml type {name} is not implemented (we write "
                               f"{', '.join(sorted(GGML_TYPES[i].name for i in QUANTIZABLE))})")
    return t


def quantize(w, ggml_type, *, reference: bool = False) -> np.ndarray:
    """float32 weights [..., n] -> ggml blocks uint8 [..., n / block_size * type_size], row by row.

    The last dimension is the row (ggml's ne[0]) and must be a whole number of blocks. `reference=True`
    runs the k-quants' NumPy versions instead of the numba kernels (same bytes; for tests and reading).
    Non-finite weights are refused: ggml's formats have no way to say what they should become.
    """
    t = type_id(ggml_type)
    info = GGML_TYPES[t]
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim == 0 or w.shape[-1] % info.block_size:
        raise UnsupportedError(f"rows of {w.shape[-1] if w.ndim else 1} weights are not a whole number of "
                            f"{info.name} blocks of {info.block_size}")
    out_shape = (*w.shape[:-1], w.shape[-1] // info.block_size * info.type_size)
    if t in _PLAIN:
        return _PLAIN[t](w).reshape(out_shape)  # [..., n * bytes per value]
    if not np.isfinite(w).all():
        raise FormatError(f"cannot quantize to {info.name}: the weights hold NaN or infinite values")
    blocks = w.reshape(-1, info.block_size)  # [N blocks, block_size]
    out = np.empty((blocks.shape[0], info.type_size), np.uint8)
    if t in _KERNELS and not reference:
        _KERNELS[t](blocks, out)
    else:
        step = max(1, _CHUNK_WEIGHTS // info.block_size)
        for i in range(0, blocks.shape[0], step):
            out[i : i + step] = _NUMPY[t](blocks[i : i + step])
    return out.reshape(out_shape)  # [N blocks, type_size] -> [..., n / block_size * type_size]


def rel_rmse(w: np.ndarray, back: np.ndarray) -> float:
    """The round-trip error we quote: RMS of (dequantized - original) over the RMS of the original."""
    w = np.asarray(w, np.float64)
    return float(np.sqrt(np.mean((np.asarray(back, np.float64) - w) ** 2) / np.mean(w * w)))


# --- llama.cpp's tensor-type mix -----------------------------------------------------------------

# --type name -> (the ggml type most tensors get, llama.cpp's LLAMA_FTYPE value for general.file_type)
FILE_TYPES: dict[str, tuple[int, int]] = {
    "F32": (F32, 0), "F16": (F16, 1), "BF16": (BF16, 32),
    "Q4_0": (Q4_0, 2), "Q4_1": (Q4_1, 3), "Q8_0": (Q8_0, 7), "Q5_0": (Q5_0, 8), "Q5_1": (Q5_1, 9),
    "Q4_K_M": (Q4_K, 15), "Q5_K_M": (Q5_K, 17), "Q6_K": (Q6_K, 18),
}
QUANT_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K")  # what `scratchlm quantize` offers

# A k-type whose row length is not a multiple of 256 falls back to the 32-block type of (about) its size.
_FALLBACK = {Q4_K: Q5_0, Q5_K: Q5_1, Q6_K: Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer rule for the _M mixes: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_types(file_type: str, tensors: dict[str, tuple[int, ...]], *, n_layers: int, n_heads: int = 0,
                 n_kv_heads: int = 0, arch: str = "llama") -> dict[str, int]:
    """GGUF tensor name -> the ggml type it gets in a `file_type` file, as llama.cpp's llama-quantize
    chooses (llama_tensor_get_type, without an importance matrix or overrides).

    - only matrices whose name ends in "weight" are quantized; vectors (norms, biases, rope_freqs) and
      GPT-2's position embedding stay F32;
    - output.weight, and token_embd.weight when it doubles as the output (tied), get Q6_K (Q8_0 when their
      rows are not a multiple of 256; Q8_0 files keep Q8_0);
    - Q4_K_M / Q5_K_M: attn_v (GPT-2: attn_qkv) and ffn_down get Q6_K in the layers _use_more_bits picks;
      a 70B-shaped Llama (80 layers, grouped-query) gets Q5_K attn_v in the others (Q4_K_M);
    - a row length no k-block divides falls back (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 if not
      even 32 divides it); a legacy type with no fallback is an error, as in llama.cpp.
    """
    if file_type not in FILE_TYPES:
        raise UnsupportedError(f"unknown quantization type {file_type!r} (choose {', '.join(QUANT_TYPES)})")
    default = FILE_TYPES[file_type][0]
    mixed = file_type in ("Q4_K_M", "Q5_K_M")
    tied = "output.weight" not in tensors
    n_attn_v = sum(1 for n in tensors if n.endswith(("attn_v.weight", "attn_qkv.weight")))
    is_70b = arch == "llama" and n_layers == 80 and n_heads != n_kv_heads
    out: dict[str, int] = {}
    i_attn_v = 0
    # llama.cpp visits tensors sorted by layer, then name; its attn_v counter is the layer index.
    for name in sorted(tensors, key=lambda n: (int(m.group(1)) if (m := _LAYER.match(n)) else -1, n)):
        shape = tensors[name]
        quantizable = (len(shape) >= 2 and name.endswith("weight") and not name.endswith("_norm.weight")
                       and name != "position_embd.weight")
        if not quantizable or default in (F32, F16, BF16):
            out[name] = default if quantizable else F32
            continue
        cols = shape[-1]
        t = default
        if name == "output.weight" or (tied and name == "token_embd.weight"):
            if cols % GGML_TYPES[t].block_size:
                t = Q8_0
            elif t != Q8_0:
                t = Q6_K
        elif name.endswith(("attn_v.weight", "attn_qkv.weight")):
            if mixed and _use_more_bits(i_attn_v, n_attn_v):
                t = Q6_K
            if is_70b and t == Q4_K:
                t = Q5_K
            i_attn_v += 1
        elif name.endswith("ffn_down.weight"):
            m = _LAYER.match(name)
            if mixed and m and _use_more_bits(int(m.group(1)), n_layers):
                t = Q6_K
        if cols % GGML_TYPES[t].block_size:
            if t not in _FALLBACK:
                raise UnsupportedError(f"tensor {name!r}: rows of {cols} weights are not a whole number of "
                                    f"{GGML_TYPES[t].name} blocks of {GGML_TYPES[t].block_size}")
            t = _FALLBACK[t]
            if cols % GGML_TYPES[t].block_size:
                t = F16
        out[name] = t
    return {n: out[n] for n in tensors}
