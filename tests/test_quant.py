"""Dequantization against the reference: gguf-py's `gguf.quants.dequantize` (ggml's own Python port).

Our kernels do the float32 operations in the same order as ggml's C reference, so results are
compared bit for bit (np.array_equal), not with a tolerance.
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.constants import GGML_QUANT_SIZES  # noqa: E402
from gguf.quants import dequantize as ref_dequantize, quantize as ref_quantize  # noqa: E402

from scratchlm import quant  # noqa: E402
from scratchlm.errors import FormatError, UnsupportedError  # noqa: E402

# Byte offsets of the fp16 scale fields inside one block of each type (see quant.py's layouts).
FP16_FIELDS = {
    "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
    "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}
QUANT_NAMES = list(FP16_FIELDS)


def random_blocks(name: str, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes for n_blocks blocks, with every fp16 scale set to a sane finite value."""
    t = quant.GGML_TYPES[quant.GGML_TYPE_IDS[name]]
    raw = rng.integers(0, 256, (n_blocks, t.type_size), dtype=np.uint8)
    for off in FP16_FIELDS[name]:
        # Scales of either sign over a few decades, as real models have.
        scale = (rng.uniform(0.5, 2.0, n_blocks) * 10.0 ** rng.integers(-4, 1, n_blocks)
                 * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, off : off + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return raw


def test_type_table_matches_ggml():
    # Every ggml type we list has the name, block size and block bytes that gguf-py knows.
    for tid, t in quant.GGML_TYPES.items():
        ref = Q(tid)
        if t.name == "Q8_1":
            # ggml's block_q8_1 is now 2 fp16 + 32 int8 = 36 bytes (ggml-common.h); gguf-py still
            # lists the old 2 x float32 layout (40). It is an activation type, never in model files.
            assert ref.name == t.name and t.type_size == 36
            continue
        assert ref.name == t.name
        assert GGML_QUANT_SIZES[ref] == (t.block_size, t.type_size)
    # ...and every type gguf-py knows of up to MXFP4 is in our table.
    assert {int(q) for q in GGML_QUANT_SIZES if int(q) <= 39} <= set(quant.GGML_TYPES)


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_quant_blocks_match_reference(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    tid = quant.GGML_TYPE_IDS[name]
    raw = random_blocks(name, 256, rng).reshape(8, -1)  # 8 rows of 32 blocks each
    ours = quant.dequantize(raw, tid)
    ref = ref_dequantize(raw, Q(tid))
    assert ours.dtype == np.float32 and ours.shape == (ref.size,)
    assert np.isfinite(ref).all()
    assert np.array_equal(ours, ref.reshape(-1))


@pytest.mark.parametrize("name", ["Q4_1", "Q4_K", "Q6_K"])
def test_quant_across_chunk_boundaries(name):
    # More blocks than one internal chunk, and a count that does not divide it evenly.
    rng = np.random.default_rng(1)
    tid = quant.GGML_TYPE_IDS[name]
    n_blocks = quant._CHUNK_WEIGHTS // quant.GGML_TYPES[tid].block_size * 2 + 37
    raw = random_blocks(name, n_blocks, rng)
    assert np.array_equal(quant.dequantize(raw, tid), ref_dequantize(raw, Q(tid)).reshape(-1))


@pytest.mark.parametrize("name", ["F32", "F16", "BF16"])
def test_float_types_match_reference(name):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(3000) * 10.0 ** rng.integers(-6, 4, 3000)).astype(np.float32)
    if name == "F32":
        raw = x.view(np.uint8)
    elif name == "F16":
        raw = x.astype(np.float16).view(np.uint8)
    else:
        raw = ref_quantize(x, Q.BF16).view(np.uint8)
    tid = quant.GGML_TYPE_IDS[name]
    ours = quant.dequantize(raw, tid)
    assert np.array_equal(ours, ref_dequantize(raw, Q(tid)).reshape(-1))


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quantized_real_weights_round_trip(name):
    # Weights quantized by gguf-py's reference quantizer: we decode them exactly as it does,
    # and the result is close to the original weights.
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((16, 256)) * 0.02).astype(np.float32)
    tid = quant.GGML_TYPE_IDS[name]
    raw = ref_quantize(w, Q(tid))
    ours = quant.dequantize(raw, tid).reshape(w.shape)
    assert np.array_equal(ours, ref_dequantize(raw, Q(tid)))
    step = {"Q8_0": 1 / 127, "Q5_0": 1 / 16, "Q5_1": 1 / 31, "Q4_0": 1 / 8, "Q4_1": 1 / 15}[name]
    assert np.abs(ours - w).max() <= np.abs(w).max() * step


def test_q4_0_by_hand():
    # One Q4_0 block written by hand: d = 0.5, byte j = (15 - j) << 4 | j, so weight j has
    # q = j and weight j+16 has q = 15 - j; value = d * (q - 8).
    d = np.array([0.5], np.float16).tobytes()
    qs = bytes(((15 - j) << 4) | j for j in range(16))
    out = quant.dequantize(np.frombuffer(d + qs, np.uint8), quant.GGML_TYPE_IDS["Q4_0"])
    want = [0.5 * (j - 8) for j in range(16)] + [0.5 * (15 - j - 8) for j in range(16)]
    assert out.tolist() == want


def test_q8_0_by_hand():
    d = np.array([-0.25], np.float16).tobytes()
    qs = np.arange(-16, 16, dtype=np.int8).tobytes()
    out = quant.dequantize(np.frombuffer(d + qs, np.uint8), quant.GGML_TYPE_IDS["Q8_0"])
    assert out.tolist() == [-0.25 * q for q in range(-16, 16)]


def test_non_uint8_input_is_reinterpreted_as_bytes():
    x = np.array([1.5, -2.0, 3.25], np.float32)
    assert quant.dequantize(x, 0).tolist() == [1.5, -2.0, 3.25]  # F32 bytes, not a uint8 cast
    assert quant.dequantize(x.astype(np.float16), 1).tolist() == [1.5, -2.0, 3.25]


def test_out_parameter_is_filled():
    rng = np.random.default_rng(4)
    raw = random_blocks("Q8_0", 10, rng)
    out = np.full(320, np.nan, np.float32)
    res = quant.dequantize(raw, 8, out=out)
    assert np.shares_memory(res, out)
    assert np.array_equal(out, ref_dequantize(raw, Q.Q8_0).reshape(-1))
    with pytest.raises(ValueError):
        quant.dequantize(raw, 8, out=np.empty(319, np.float32))


def test_unknown_and_unimplemented_types():
    with pytest.raises(UnsupportedError, match="unknown ggml tensor type id 99"):
        quant.dequantize(np.zeros(18, np.uint8), 99)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        quant.dequantize(np.zeros(66, np.uint8), 16)


def test_partial_block_is_rejected():
    with pytest.raises(FormatError, match="whole number of Q4_1 blocks"):
        quant.dequantize(np.zeros(21, np.uint8), 3)
    with pytest.raises(FormatError):
        quant.nbytes_for(12, 255)
    assert quant.nbytes_for(12, 512) == 288
