"""ggml's quantized weight blocks, and how to turn them back into float32.

A quantized tensor is a flat run of fixed-size *blocks*; each block holds `block_size`
consecutive weights (along a row) as small integers plus one or a few fp16 scales.
Dequantizing is pure bit-unpacking plus `scale * q (+ min)`, written here as whole-array
NumPy operations over all blocks at once (no Python loop per block). We process a big
tensor in chunks of blocks only to keep temporaries small and in cache.

The float operations are done in the same order as ggml's reference C code
(`dequantize_row_*` in ggml-quants.c), so the results are bit-exact, e.g. for Q4_K
`(d * sc) * q - (dmin * m)` in float32.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from .errors import FormatError, UnsupportedError

QK_K = 256  # weights per "k-quant" super-block


class GGMLType(NamedTuple):
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block


# ggml type id -> (name, weights per block, bytes per block); ids as in ggml.h's enum ggml_type.
# Every known type is listed so a file's tensor sizes can be checked even when we cannot
# dequantize the type (then `dequantize` raises UnsupportedError).
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 36),  # 2 x fp16 + 32 x int8 in today's ggml (activations only)
    10: GGMLType("Q2_K", QK_K, 84),
    11: GGMLType("Q3_K", QK_K, 110),
    12: GGMLType("Q4_K", QK_K, 144),
    13: GGMLType("Q5_K", QK_K, 176),
    14: GGMLType("Q6_K", QK_K, 210),
    15: GGMLType("Q8_K", QK_K, 292),
    16: GGMLType("IQ2_XXS", QK_K, 66),
    17: GGMLType("IQ2_XS", QK_K, 74),
    18: GGMLType("IQ3_XXS", QK_K, 98),
    19: GGMLType("IQ1_S", QK_K, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", QK_K, 110),
    22: GGMLType("IQ2_S", QK_K, 82),
    23: GGMLType("IQ4_XS", QK_K, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", QK_K, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", QK_K, 54),
    35: GGMLType("TQ2_0", QK_K, 66),
    39: GGMLType("MXFP4", 32, 17),
}
GGML_TYPE_IDS: dict[str, int] = {t.name: i for i, t in GGML_TYPES.items()}

_F16, _F32 = np.dtype("<f2"), np.dtype("<f4")


def _f16(b: np.ndarray, start: int) -> np.ndarray:
    """The little-endian fp16 at bytes [start, start+2) of each block, as float32 [N,1]."""
    return b[:, start : start + 2].view(_F16).astype(np.float32)


def _nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """Split bytes [N,n] into out [N,2n]: low nibbles first (weights 0..n-1), then high nibbles."""
    n = qs.shape[1]
    out[:, :n] = qs & 0x0F
    out[:, n:] = qs >> 4


def _high_bits(qh: np.ndarray, nbits: int) -> np.ndarray:
    """Bits of little-endian bytes qh [N,nb] as uint8 [N, nb*8], bit i of the run = weight i."""
    return np.unpackbits(qh, axis=1, bitorder="little")[:, :nbits]


# --- 32-weight blocks ------------------------------------------------------------------------

def _q4_0(b: np.ndarray, out: np.ndarray) -> None:
    # Q4_0 [18 bytes]: d fp16 | qs[16]: weight j = low nibble of qs[j], weight j+16 = high nibble;
    # value = d * (q - 8)
    _nibbles(b[:, 2:18], out)
    out -= 8
    out *= _f16(b, 0)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:
    # Q4_1 [20 bytes]: d fp16 | m fp16 | qs[16] (nibbles as Q4_0); value = d * q + m
    _nibbles(b[:, 4:20], out)
    out *= _f16(b, 0)
    out += _f16(b, 2)


def _q5_0(b: np.ndarray, out: np.ndarray) -> None:
    # Q5_0 [22 bytes]: d fp16 | qh u32 (bit i = 5th bit of weight i) | qs[16] (low 4 bits as Q4_0);
    # value = d * (q - 16)
    q = np.empty(out.shape, np.uint8)
    _nibbles(b[:, 6:22], q)
    q |= _high_bits(b[:, 2:6], 32) << 4
    np.subtract(q, 16, out=out, dtype=np.float32)
    out *= _f16(b, 0)


def _q5_1(b: np.ndarray, out: np.ndarray) -> None:
    # Q5_1 [24 bytes]: d fp16 | m fp16 | qh u32 | qs[16] (as Q5_0); value = d * q + m
    q = np.empty(out.shape, np.uint8)
    _nibbles(b[:, 8:24], q)
    q |= _high_bits(b[:, 4:8], 32) << 4
    out[:] = q
    out *= _f16(b, 0)
    out += _f16(b, 2)


def _q8_0(b: np.ndarray, out: np.ndarray) -> None:
    # Q8_0 [34 bytes]: d fp16 | qs int8[32]; value = d * q
    out[:] = b[:, 2:34].view(np.int8)
    out *= _f16(b, 0)


# --- 256-weight k-quant super-blocks ---------------------------------------------------------

def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (float32 [N,8] each).

    Bytes 0-3: scales 0-3 (low 6 bits), bytes 4-7: mins 0-3 (low 6 bits); bytes 8-11 hold the
    low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble), whose top 2 bits are the
    spare top 2 bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    a, m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (hi & 0x0F) | ((a >> 6) << 4)], axis=1)  # [N,8]
    mn = np.concatenate([m & 0x3F, (hi >> 4) | ((m >> 6) << 4)], axis=1)  # [N,8]
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b: np.ndarray, out: np.ndarray) -> None:
    # Q4_K [144 bytes]: d fp16 | dmin fp16 | scales[12] (8 x 6-bit scale/min) | qs[128];
    # 8 sub-blocks of 32; qs[32c:32c+32] holds sub-block 2c (low nibbles) and 2c+1 (high nibbles).
    # value = (d * sc[s]) * q - (dmin * mn[s])
    N = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    o = out.reshape(N, 4, 2, 32)  # [N, chunk, half, 32]
    qs = b[:, 16:144].reshape(N, 4, 32)
    o[:, :, 0] = qs & 0x0F
    o[:, :, 1] = qs >> 4
    o = out.reshape(N, 8, 32)  # [N, sub-block, 32]
    o *= (_f16(b, 0) * sc)[:, :, None]  # [N,1]*[N,8] -> [N,8,1]
    o -= (_f16(b, 2) * mn)[:, :, None]


def _q5_k(b: np.ndarray, out: np.ndarray) -> None:
    # Q5_K [176 bytes]: d | dmin | scales[12] (as Q4_K) | qh[32] | qs[128] (as Q4_K);
    # bit s of qh[l] is the 5th bit of weight l of sub-block s. value = (d*sc[s]) * q - dmin*mn[s]
    N = b.shape[0]
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = np.empty((N, 4, 2, 32), np.uint8)  # [N, chunk, half, 32]
    qs = b[:, 48:176].reshape(N, 4, 32)
    q[:, :, 0] = qs & 0x0F
    q[:, :, 1] = qs >> 4
    q = q.reshape(N, 8, 32)
    hb = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(N, 32, 8)  # [N, l, s]
    q |= hb.transpose(0, 2, 1) << 4  # [N, s, l]
    o = out.reshape(N, 8, 32)
    o[:] = q
    o *= (_f16(b, 0) * sc)[:, :, None]
    o -= (_f16(b, 2) * mn)[:, :, None]


def _q6_k(b: np.ndarray, out: np.ndarray) -> None:
    # Q6_K [210 bytes]: ql[128] | qh[64] | scales int8[16] | d fp16; 16 sub-blocks of 16.
    # Two halves of 128 weights; in half h, ql[64h:64h+64] low nibbles give weights 0-63 and
    # high nibbles weights 64-127; qh[32h+l] bits 2k..2k+1 are the top 2 bits of weight l+32k.
    # value = (d * scales[s]) * (q - 32)
    N = b.shape[0]
    ql = b[:, 0:128].reshape(N, 2, 64)
    qh = b[:, 128:192].reshape(N, 2, 1, 32)
    q = np.empty((N, 2, 2, 64), np.uint8)  # [N, half, nibble, 64]
    q[:, :, 0] = ql & 0x0F
    q[:, :, 1] = ql >> 4
    q = q.reshape(N, 2, 4, 32)  # [N, half, k, 32]
    q |= ((qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3) << 4  # [N,2,1,32] -> [N,2,4,32]
    o = out.reshape(N, 16, 16)  # [N, sub-block, 16]
    np.subtract(q.reshape(N, 16, 16), 32, out=o, dtype=np.float32)
    o *= (_f16(b, 208) * b[:, 192:208].view(np.int8))[:, :, None]  # [N,1]*[N,16] -> [N,16,1]


def _q2_k(b: np.ndarray, out: np.ndarray) -> None:
    # Q2_K [84 bytes]: scales[16] (low nibble scale, high nibble min) | qs[64] | d fp16 | dmin fp16;
    # 16 sub-blocks of 16. In half h, bits 2k..2k+1 of qs[32h+l] are weight 32k+l of that half.
    # value = (d * sc[s]) * q - (dmin * mn[s])
    N = b.shape[0]
    qs = b[:, 16:80].reshape(N, 2, 1, 32)
    q = (qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [N, half, k, 32]
    o = out.reshape(N, 16, 16)
    o[:] = q.reshape(N, 16, 16)
    s = b[:, 0:16]
    o *= (_f16(b, 80) * (s & 0x0F))[:, :, None]  # [N,16,1]
    o -= (_f16(b, 82) * (s >> 4))[:, :, None]


def _q3_k(b: np.ndarray, out: np.ndarray) -> None:
    # Q3_K [110 bytes]: hmask[32] | qs[64] | scales[12] (16 x 6-bit, offset 32) | d fp16.
    # Low 2 bits as Q2_K; bit j of hmask[l] (j = 4h + k) is set when weight l+32k of half h does
    # NOT subtract 4. value = (d * (sc[s] - 32)) * (q - 4*(1 - hbit))
    N = b.shape[0]
    qs = b[:, 32:96].reshape(N, 2, 1, 32)
    q = ((qs >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).astype(np.int8)  # [N, half, k, 32]
    hb = np.unpackbits(b[:, 0:32], axis=1, bitorder="little").reshape(N, 32, 8)  # [N, l, j]
    q -= ((hb.transpose(0, 2, 1) ^ 1) << 2).reshape(N, 2, 4, 32).view(np.int8)
    # Scales: bytes 0-7 hold the low 4 bits of scales 0-7 (low nibbles) and 8-15 (high nibbles);
    # the top 2 bits of scale 4i+j are bits 2i..2i+1 of byte 8+j.
    s = b[:, 96:108]
    lo = np.concatenate([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], axis=1)  # [N,16]
    hi = ((s[:, None, 8:12] >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(N, 16)  # [N,16]
    sc = (lo | (hi << 4)).astype(np.float32) - 32
    o = out.reshape(N, 16, 16)
    o[:] = q.reshape(N, 16, 16)
    o *= (_f16(b, 108) * sc)[:, :, None]


# --- plain floats ----------------------------------------------------------------------------

def _f32(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = b.view(_F32)


def _f16_plain(b: np.ndarray, out: np.ndarray) -> None:
    out[:] = b.view(_F16)


def _bf16(b: np.ndarray, out: np.ndarray) -> None:
    # bfloat16 is the top half of a float32: shift the 16 bits into place.
    out.view(np.uint32)[:] = b.view("<u2").astype(np.uint32) << 16


_KERNELS: dict[int, Callable[[np.ndarray, np.ndarray], None]] = {
    0: _f32, 1: _f16_plain, 30: _bf16,
    2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0,
    10: _q2_k, 11: _q3_k, 12: _q4_k, 13: _q5_k, 14: _q6_k,
}
SUPPORTED_TYPES: frozenset[int] = frozenset(_KERNELS)

# Blocks per chunk: ~0.5-1 MB of float32 output, so temporaries stay in cache.
_CHUNK_WEIGHTS = 1 << 17


def type_info(ggml_type: int) -> GGMLType:
    """The (name, block_size, type_size) of a ggml type id; UnsupportedError if unknown."""
    t = GGML_TYPES.get(ggml_type)
    if t is None:
        raise UnsupportedError(f"unknown ggml tensor type id {ggml_type}")
    return t


def nbytes_for(ggml_type: int, n_weights: int) -> int:
    """Bytes that `n_weights` weights take in `ggml_type` (must be whole blocks)."""
    t = type_info(ggml_type)
    if n_weights % t.block_size:
        raise FormatError(f"{n_weights} weights are not a whole number of {t.name} blocks of {t.block_size}")
    return n_weights // t.block_size * t.type_size


def dequantize(raw: np.ndarray, ggml_type: int, out: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes of a ggml tensor (uint8, any shape, C order) -> flat float32 weights.

    `out`, when given, is a C-contiguous float32 array with one element per weight; it is
    filled and returned (reshaped flat). Raises UnsupportedError for types we cannot decode.
    """
    t = type_info(ggml_type)
    kernel = _KERNELS.get(ggml_type)
    if kernel is None:
        raise UnsupportedError(f"dequantizing ggml type {t.name} is not implemented")
    # Reinterpret (never convert) whatever array we get as its bytes.
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if raw.size % t.type_size:
        raise FormatError(f"{raw.size} bytes are not a whole number of {t.name} blocks of {t.type_size} bytes")
    n_blocks = raw.size // t.type_size
    blocks = raw.reshape(n_blocks, t.type_size)  # [N, bytes per block]
    if out is None:
        out = np.empty(n_blocks * t.block_size, np.float32)
    elif out.dtype != np.float32 or out.size != n_blocks * t.block_size or not out.flags.c_contiguous:
        raise ValueError("dequantize: out must be C-contiguous float32 with one element per weight")
    flat = out.reshape(n_blocks, t.block_size)  # [N, weights per block]
    step = max(1, _CHUNK_WEIGHTS // t.block_size)
    for i in range(0, n_blocks, step):
        kernel(blocks[i : i + step], flat[i : i + step])
    return out.reshape(-1)


# --- a weight matrix kept as blocks ------------------------------------------------------------

# Types a QuantizedMatrix may hold: the block types we decode, and the 16-bit floats (kept as stored
# from GGUF, safetensors and Meta files). F32 matrices stay plain float32 arrays.
PACKED_TYPES: frozenset[int] = SUPPORTED_TYPES - {GGML_TYPE_IDS["F32"]}


class QuantizedMatrix:
    """A weight matrix [rows, cols] kept in its stored ggml type: each row is a run of whole blocks.

    `raw` holds the bytes, uint8 [rows, bytes per row], often a read-only view of a memory-mapped file.
    Products with it go through kernels.py (never a float32 copy of the whole matrix); `dequantize()`
    gives the float32 matrix, the readable reference the kernels are tested against.

        >>> w = QuantizedMatrix(raw, GGML_TYPE_IDS["Q8_0"], (4096, 4096))   # doctest: +SKIP
        >>> ops.linear(x, w)        # x [..., 4096] -> [..., 4096], from the blocks  # doctest: +SKIP
    """

    __slots__ = ("raw", "ggml_type", "shape", "__weakref__")
    ndim = 2

    def __init__(self, raw: np.ndarray, ggml_type: int, shape: tuple[int, int]):
        rows, cols = (int(s) for s in shape)
        t = type_info(ggml_type)
        if ggml_type not in PACKED_TYPES:
            raise UnsupportedError(f"a QuantizedMatrix cannot hold ggml type {t.name}")
        if cols % t.block_size:
            raise FormatError(f"rows of {cols} weights are not a whole number of {t.name} blocks of {t.block_size}")
        row_bytes = cols // t.block_size * t.type_size
        raw = raw.view(np.uint8) if raw.dtype != np.uint8 else raw
        if raw.size != rows * row_bytes:
            raise FormatError(f"{t.name} [{rows}, {cols}] takes {rows * row_bytes} bytes, got {raw.size}")
        self.raw = raw.reshape(rows, row_bytes)  # [rows, bytes per row]; a view when raw is contiguous
        if not self.raw.flags.c_contiguous:
            self.raw = np.ascontiguousarray(self.raw)
        self.ggml_type = ggml_type
        self.shape = (rows, cols)

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def nbytes(self) -> int:
        return int(self.raw.size)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [rows, cols] (a new array)."""
        return dequantize(self.raw, self.ggml_type).reshape(self.shape)

    def take_rows(self, ids) -> np.ndarray:
        """Rows `ids` [N] dequantized: float32 [N, cols] (an embedding lookup reads only these)."""
        ids = np.asarray(ids).reshape(-1)
        return dequantize(self.raw[ids], self.ggml_type).reshape(ids.size, self.shape[1])  # [N,cols]

    def __getitem__(self, rows: slice) -> "QuantizedMatrix":
        """A slice of rows, sharing the bytes (the q, k and v parts of a fused projection)."""
        if not isinstance(rows, slice):
            raise TypeError("a QuantizedMatrix is sliced by rows only: w[a:b]")
        part = self.raw[rows]
        return QuantizedMatrix(part, self.ggml_type, (part.shape[0], self.shape[1]))

    @staticmethod
    def concat(parts: list["QuantizedMatrix"]) -> "QuantizedMatrix":
        """The parts stacked by rows into one matrix (one new buffer): all must share type and width."""
        t, cols = parts[0].ggml_type, parts[0].shape[1]
        if any(p.ggml_type != t or p.shape[1] != cols for p in parts):
            raise ValueError("QuantizedMatrix.concat needs parts of one type and one row length")
        raw = np.concatenate([p.raw for p in parts], axis=0)  # [sum rows, bytes per row]
        return QuantizedMatrix(raw, t, (raw.shape[0], cols))

    def __repr__(self) -> str:
        return f"QuantizedMatrix({self.type_name}, {list(self.shape)}, {self.nbytes / 2**20:.1f} MiB)"
