"""Products with weights kept as ggml blocks (quant.QuantizedMatrix).

    y = linear(x, w)     # x [..., cols] float32, w QuantizedMatrix [rows, cols] -> x @ W.T [..., rows]
    dx = linear_t(dy, w) # dy [..., rows] -> dy @ W [..., cols] (the backward of linear, for LoRA)

Two regimes, as in every CPU engine:

- **Few rows of x** (decoding: one token per sequence): matrix-vector work, bound by reading the
  weights once. A kernel walks each weight row chunk by chunk straight from the packed bytes, decodes
  each 32-weight chunk once into registers and multiplies it with every row of x; no float32 weight is
  ever written. Threads split the weight rows.
- **Many rows of x** (prefill, training): matrix-matrix work, bound by arithmetic. A tile of weight rows
  is dequantized once and handed to BLAS, so each decoded weight serves every row of x; the tile stays
  in cache.

The kernels come in two builds that compute the same thing, both checked against quant.py's NumPy
dequantization (the readable reference) in tests/test_kernels.py:

- `_kernels.c`, C with AVX2/FMA intrinsics and OpenMP, compiled at install (setup.py) where a compiler
  is present; used when the CPU has AVX2.
- `kernels_numba.py`, the same loops in Python compiled by numba: the fallback everywhere else.
  Measured on this project's 2-core machines, numba's auto-vectorised loops reach 4-5 G weights/s per
  thread on the 4-bit types (7.5 on Q8_0), where the C decode reaches memory bandwidth: the figures
  behind the C file are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import os

import numpy as np

from .quant import QuantizedMatrix, dequantize

# Up to this many rows of x, the matrix-vector kernels (each weight chunk decoded once for all rows of x);
# above it, tiles dequantized once for all rows, and BLAS.
MATVEC_MAX_ROWS = 8

# Weights per dequantized tile in the matrix-matrix path: 2 MB of float32, so the tile stays in L2/L3
# while BLAS reads it once per block of x rows.
_TILE_WEIGHTS = 1 << 19

try:  # the C kernels, if they were built and this CPU runs them (SCRATCHLM_KERNELS=numba forces the fallback)
    from . import _kernels as _c

    C_TYPES = frozenset(_c.supported()) if os.environ.get("SCRATCHLM_KERNELS") != "numba" else frozenset()
except ImportError:
    _c, C_TYPES = None, frozenset()
# the decode-step ops (RMSNorm, attention of one query over the cache) in C: same condition
C_OPS = _c if C_TYPES else None

# Up to this many rows, ops.rms_norm uses the C op (a decode step: call overhead is the cost); above, NumPy.
SMALL_ROWS = 8


def round_activations(x: np.ndarray) -> np.ndarray:
    """What the C matrix-vector kernels of the block types multiply instead of x [N, cols] float32: per group
    of 4 values, x ~ d q1 + (d/254) q2 with d = max|x| / 127 over the group, q1 = round(x / d) and
    q2 = round((x - d q1) / (d/254)), rounding half to even: two 8-bit terms for the integer dot products,
    within 1/64516 of the group's largest value. The NumPy statement of _kernels.c's quantize_x, for tests."""
    f32 = np.float32
    xb = np.asarray(x, f32).reshape(x.shape[0], -1, 4)  # [N, groups, 4]
    d = (np.abs(xb).max(axis=2, keepdims=True) / f32(127)).astype(f32)  # [N, groups, 1]
    d2 = (d / f32(254)).astype(f32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, f32(1) / d, f32(0)).astype(f32)
        inv2 = np.where(d2 > 0, f32(1) / d2, f32(0)).astype(f32)
    q1 = np.rint(xb * inv).astype(f32)
    q2 = np.clip(np.rint((xb - q1 * d) * inv2), -127, 127).astype(f32)
    return (q1 * d + q2 * d2).reshape(x.shape).astype(f32)


def backend(ggml_type: int) -> str:
    """Which kernels multiply a matrix of this type: "c", "numba" or "dequantize" (tiles + BLAS only)."""
    if ggml_type in C_TYPES:
        return "c"
    from .kernels_numba import MATVEC
    return "numba" if ggml_type in MATVEC else "dequantize"


def matvec(x: np.ndarray, w: QuantizedMatrix, kind: str | None = None) -> np.ndarray:
    """x [N, cols] float32 (N <= MATVEC_MAX_ROWS) -> x @ W.T [N, rows], from the blocks. `kind` forces a
    build ("c" or "numba", for tests); types with no matrix-vector kernel take the tiled path."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    kind = kind or backend(w.ggml_type)
    if kind == "c":
        out = np.empty((x.shape[0], w.shape[0]), np.float32)
        _c.matvec(w.ggml_type, w.raw, w.shape[0], w.shape[1], x, out)
        return out
    if kind == "numba":
        from . import kernels_numba
        return kernels_numba.matvec(x, w)
    return _tiled(x, w)


def dequantize_rows(w: QuantizedMatrix, a: int, b: int) -> np.ndarray:
    """Rows a..b-1 of W as float32 [b-a, cols] (the C decode when built, else quant.py's NumPy)."""
    if w.ggml_type in C_TYPES:
        out = np.empty((b - a, w.shape[1]), np.float32)
        _c.dequantize(w.ggml_type, w.raw[a:b], b - a, w.shape[1], out)
        return out
    return dequantize(w.raw[a:b], w.ggml_type).reshape(b - a, w.shape[1])


def _tile_rows(w: QuantizedMatrix) -> int:
    return max(16, _TILE_WEIGHTS // w.shape[1])


def _tiled(x: np.ndarray, w: QuantizedMatrix) -> np.ndarray:
    """x [N, cols] -> x @ W.T [N, rows], a tile of weight rows dequantized at a time and multiplied by BLAS."""
    R = w.shape[0]
    out = np.empty((x.shape[0], R), np.float32)
    step = _tile_rows(w)
    for a in range(0, R, step):
        b = min(a + step, R)
        np.matmul(x, dequantize_rows(w, a, b).T, out=out[:, a:b])  # [N,cols] @ [cols,b-a] -> [N,b-a]
    return out


def linear(x: np.ndarray, w: QuantizedMatrix) -> np.ndarray:
    """x @ W.T for x [..., cols] float32 and W [rows, cols] packed -> [..., rows] float32.

    A decode step makes ~150 of these calls per token on a small model, so the C matrix-vector case
    goes straight to the kernel (one reshape, one output array, no other Python-level work)."""
    rows, cols = w.shape
    x2 = x.reshape(-1, cols)  # [N, cols], N = all leading axes
    if x2.dtype != np.float32 or not x2.flags.c_contiguous:
        x2 = np.ascontiguousarray(x2, dtype=np.float32)
    if x2.shape[0] > MATVEC_MAX_ROWS:
        y = _tiled(x2, w)  # [N, rows]
    elif w.ggml_type in C_TYPES:
        y = np.empty((x2.shape[0], rows), np.float32)
        _c.matvec(w.ggml_type, w.raw, rows, cols, x2, y)  # [N, cols] @ [cols, rows] -> [N, rows]
    else:
        y = matvec(x2, w)
    return y.reshape(*x.shape[:-1], rows)


def linear_t(dy: np.ndarray, w: QuantizedMatrix) -> np.ndarray:
    """dy @ W for dy [..., rows] and W [rows, cols] packed -> [..., cols]: the gradient of linear's input.
    Tiles of weight rows are dequantized once and their share added by BLAS."""
    rows, cols = w.shape
    dy2 = np.reshape(dy, (-1, rows)).astype(np.float32, copy=False)  # [N, rows]
    out = np.zeros((dy2.shape[0], cols), np.float32)
    step = _tile_rows(w)
    for a in range(0, rows, step):
        b = min(a + step, rows)
        out += dy2[:, a:b] @ dequantize_rows(w, a, b)  # [N,b-a] @ [b-a,cols] -> [N,cols]
    return out.reshape(*dy.shape[:-1], cols)
