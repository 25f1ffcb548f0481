"""Our GGUF reader and loader, against gguf-py (`gguf.GGUFWriter` writes, `gguf.GGUFReader` and
`gguf.quants.dequantize` are the reference), plus hand-built malformed files."""

import struct

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize as ref_dequantize, quantize as ref_quantize  # noqa: E402

from scratchlm.config import expected_shapes  # noqa: E402
from scratchlm.errors import FormatError, ModelNotFoundError, UnsupportedError  # noqa: E402
from scratchlm.formats.gguf import load_gguf, read_gguf  # noqa: E402
from scratchlm.quant import QuantizedMatrix  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Hand-built files: every field written with struct, so each can be corrupted on purpose.


def gstr(s) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def kv_u32(key, v):
    return kv(key, 4, struct.pack("<I", v))


def kv_str(key, v):
    return kv(key, 8, gstr(v))


def tinfo(name, ne, gtype, offset) -> bytes:
    return (gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
            + struct.pack("<IQ", gtype, offset))


def gguf_bytes(kvs=(), tis=(), data=b"", *, version=3, n_tensors=None, n_kv=None, alignment=32,
               magic=b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tis)
    body += b"\0" * (-len(body) % alignment)
    return body + data


# A small valid file: a F32 [2,4] tensor at offset 0 and a Q8_0 [32] tensor at offset 32.
F32_DATA = np.arange(8, dtype=np.float32).tobytes()
Q8_DATA = np.array([0.5], np.float16).tobytes() + np.arange(-16, 16, dtype=np.int8).tobytes()
GOOD_KVS = [kv_str("general.architecture", "llama"), kv_u32("test.count", 7)]
GOOD_TIS = [tinfo("a", [4, 2], 0, 0), tinfo("b", [32], 8, 32)]
GOOD_DATA = F32_DATA + b"\0" * 0 + Q8_DATA.ljust(64, b"\0")


def write(tmp_path, data: bytes, name="f.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def bad(tmp_path, data: bytes, exc=FormatError, match=None):
    p = write(tmp_path, data)
    with pytest.raises(exc, match=match) as ei:
        read_gguf(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg  # one line, naming the file
    return msg


def test_handbuilt_file_matches_gguf_reader(tmp_path):
    p = write(tmp_path, gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA))
    f = read_gguf(p)
    ref = gguf.GGUFReader(p)
    assert f.metadata == {"general.architecture": "llama", "test.count": 7}
    assert f.version == 3 and f.alignment == 32
    for t in ref.tensors:
        ours = f.tensors[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.ggml_type == int(t.tensor_type)
        assert ours.offset == t.data_offset and ours.nbytes == t.n_bytes
    assert np.array_equal(f.tensor("a"), np.arange(8, dtype=np.float32).reshape(2, 4))
    assert f.tensor("b").tolist() == [0.5 * q for q in range(-16, 16)]
    raw = f.raw("b")
    assert raw.dtype == np.uint8 and raw.tobytes() == Q8_DATA and not raw.flags.writeable


def test_version_2_is_read(tmp_path):
    f = read_gguf(write(tmp_path, gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA, version=2)))
    assert f.version == 2 and set(f.tensors) == {"a", "b"}


def test_truncated_handbuilt_at_every_byte(tmp_path):
    data = gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA)
    end = len(data) - (64 - len(Q8_DATA))  # the last tensor's data ends here; then padding
    for cut in range(end):
        p = write(tmp_path, data[:cut], f"cut{cut}.gguf")
        with pytest.raises(FormatError, match="truncated|past the end|not a GGUF"):
            read_gguf(p)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        read_gguf(tmp_path / "nope.gguf")


@pytest.mark.parametrize("magic", [b"GGML", b"ggu", b"PK\x03\x04", b"\0\0\0\0"])
def test_wrong_magic(tmp_path, magic):
    data = gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA)
    bad(tmp_path, magic + data[4:] if len(magic) == 4 else magic, match="not a GGUF file")


def test_empty_and_short_files(tmp_path):
    bad(tmp_path, b"", match="truncated")
    bad(tmp_path, b"GG", match="truncated")
    bad(tmp_path, b"GGUF\x03\x00", match="truncated")
    bad(tmp_path, b"GGUF\x03\x00\x00\x00\x01", match="truncated")


@pytest.mark.parametrize("version", [0, 1, 4, 0xFFFFFFFF])
def test_unsupported_version(tmp_path, version):
    bad(tmp_path, gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA, version=version), UnsupportedError,
        match=f"unsupported GGUF version {version}")


def test_big_endian_is_unsupported(tmp_path):
    data = bytearray(gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA))
    data[4:8] = struct.pack(">I", 3)
    bad(tmp_path, bytes(data), UnsupportedError, match="big-endian")


@pytest.mark.parametrize("n", [1000, 2**32, 2**63, 2**64 - 1])
def test_absurd_tensor_count(tmp_path, n):
    bad(tmp_path, gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA, n_tensors=n), match="absurd tensor count")


@pytest.mark.parametrize("n", [1000, 2**40, 2**64 - 1])
def test_absurd_kv_count(tmp_path, n):
    bad(tmp_path, gguf_bytes(GOOD_KVS, GOOD_TIS, GOOD_DATA, n_kv=n), match="absurd metadata kv count")


def test_absurd_string_lengths(tmp_path):
    # A key, a string value and a tensor name each claiming far more bytes than the file has.
    huge_key = struct.pack("<Q", 2**63) + b"general.architecture" + struct.pack("<I", 8) + gstr("llama")
    bad(tmp_path, gguf_bytes([huge_key], GOOD_TIS, GOOD_DATA), match="limit")
    big_val = gstr("general.name") + struct.pack("<IQ", 8, 2**40) + b"abc"
    bad(tmp_path, gguf_bytes([big_val], GOOD_TIS, GOOD_DATA), match="truncated")
    big_name = struct.pack("<Q", 2**50) + b"a" + struct.pack("<I", 1)
    bad(tmp_path, gguf_bytes(GOOD_KVS, [big_name], GOOD_DATA), match="limit")
    # A key over the 64 KiB limit, even though its bytes are present.
    long_key = kv_u32("k" * 70000, 1)
    bad(tmp_path, gguf_bytes([long_key], GOOD_TIS, GOOD_DATA), match="more than the limit")


@pytest.mark.parametrize("etype,count", [(0, 2**40), (4, 2**61), (8, 2**60), (9, 2**59), (12, 2**64 - 1)])
def test_absurd_array_length(tmp_path, etype, count):
    arr = kv("arr", 9, struct.pack("<IQ", etype, count) + b"\0" * 16)
    bad(tmp_path, gguf_bytes([arr], GOOD_TIS, GOOD_DATA), match="claims .* elements")


def test_bad_value_types(tmp_path):
    bad(tmp_path, gguf_bytes([kv("x", 13, b"\0" * 8)], GOOD_TIS, GOOD_DATA), match="unknown value type 13")
    bad(tmp_path, gguf_bytes([kv("x", 2**32 - 1, b"\0" * 8)], GOOD_TIS, GOOD_DATA), match="unknown value type")
    arr = kv("x", 9, struct.pack("<IQ", 99, 1) + b"\0" * 8)
    bad(tmp_path, gguf_bytes([arr], GOOD_TIS, GOOD_DATA), match="array of unknown value type 99")
    bad(tmp_path, gguf_bytes([kv("x", 7, b"\x02")], GOOD_TIS, GOOD_DATA), match="bool")
    barr = kv("x", 9, struct.pack("<IQ", 7, 3) + b"\x01\x00\x05")
    bad(tmp_path, gguf_bytes([barr], GOOD_TIS, GOOD_DATA), match="bool")


def test_nested_arrays(tmp_path):
    inner = struct.pack("<IQ", 4, 2) + struct.pack("<II", 1, 2)
    nested = kv("x", 9, struct.pack("<IQ", 9, 2) + inner + inner)
    f = read_gguf(write(tmp_path, gguf_bytes([nested], GOOD_TIS, GOOD_DATA)))
    assert f.metadata["x"] == [[1, 2], [1, 2]]
    deep = struct.pack("<IQ", 4, 0)
    for _ in range(12):
        deep = struct.pack("<IQ", 9, 1) + deep
    bad(tmp_path, gguf_bytes([kv("x", 9, deep)], GOOD_TIS, GOOD_DATA), match="nests arrays")


def test_invalid_utf8_key(tmp_path):
    bad(tmp_path, gguf_bytes([kv_u32(b"ab\xff", 1)], GOOD_TIS, GOOD_DATA), match="not valid UTF-8")


def test_duplicate_key(tmp_path):
    bad(tmp_path, gguf_bytes(GOOD_KVS + [kv_u32("test.count", 8)], GOOD_TIS, GOOD_DATA),
        match="duplicate metadata key 'test.count'")


def test_duplicate_tensor_name(tmp_path):
    tis = [tinfo("a", [4, 2], 0, 0), tinfo("a", [32], 8, 32)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="duplicate tensor name 'a'")


def test_too_many_dimensions(tmp_path):
    tis = [tinfo("a", [2, 2, 2, 1, 1], 0, 0)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="5 dimensions")
    tis = [struct.pack("<Q", 1) + b"a" + struct.pack("<I", 2**32 - 1)]  # and no room for them
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="dimensions")


@pytest.mark.parametrize("ne", [[2**32, 2**32], [2**63], [2**64 - 1, 1], [2**16] * 4])
def test_dimension_product_overflows(tmp_path, ne):
    bad(tmp_path, gguf_bytes(GOOD_KVS, [tinfo("a", ne, 0, 0)], GOOD_DATA), match="overflows")


@pytest.mark.parametrize("ne", [[1 << 20, 1 << 10], [64, 1], [2**31, 2**31]])
def test_dimensions_exceed_file(tmp_path, ne):
    bad(tmp_path, gguf_bytes(GOOD_KVS, [tinfo("a", ne, 0, 0)], GOOD_DATA), match="past the end")


@pytest.mark.parametrize("offset", [64, 96, 2**40, 2**64 - 32])
def test_offset_past_end(tmp_path, offset):
    tis = [tinfo("a", [4, 2], 0, 0), tinfo("b", [32], 8, offset)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="past the end")


@pytest.mark.parametrize("offset", [4, 31, 33])
def test_offset_misaligned(tmp_path, offset):
    tis = [tinfo("a", [4, 2], 0, 0), tinfo("b", [32], 8, offset)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="not a multiple of the alignment 32")


def test_overlapping_tensors(tmp_path):
    tis = [tinfo("a", [4, 2], 0, 0), tinfo("b", [8], 0, 0)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="overlap")
    tis = [tinfo("a", [16, 1], 0, 32), tinfo("b", [16], 0, 0), tinfo("c", [16], 0, 64)]  # b ends inside a
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA + b"\0" * 64), match="'b' and 'a' overlap")


@pytest.mark.parametrize("gtype", [4, 5, 31, 99, 2**32 - 1])
def test_unknown_quant_type(tmp_path, gtype):
    tis = [tinfo("a", [4, 2], 0, 0), tinfo("b", [32], gtype, 32)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), UnsupportedError, match=f"unknown ggml type id {gtype}")


def test_unimplemented_type_reads_but_does_not_dequantize(tmp_path):
    # IQ2_XXS: a real ggml type (66-byte blocks of 256) whose decoding we do not implement.
    tis = [tinfo("iq", [256], 16, 0)]
    f = read_gguf(write(tmp_path, gguf_bytes(GOOD_KVS, tis, b"\0" * 96)))
    assert f.tensors["iq"].nbytes == 66 and f.raw("iq").size == 66
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        f.tensor("iq")


def test_row_not_whole_blocks(tmp_path):
    tis = [tinfo("b", [33], 8, 0)]
    bad(tmp_path, gguf_bytes(GOOD_KVS, tis, GOOD_DATA), match="not a multiple of the Q8_0 block size 32")


@pytest.mark.parametrize("payload", [struct.pack("<I", 0), struct.pack("<I", 3), struct.pack("<I", 48)])
def test_bad_alignment(tmp_path, payload):
    bad(tmp_path, gguf_bytes(GOOD_KVS + [kv("general.alignment", 4, payload)], GOOD_TIS, GOOD_DATA),
        match="general.alignment")


def test_alignment_of_wrong_type(tmp_path):
    al = kv("general.alignment", 10, struct.pack("<Q", 32))  # uint64, the spec says uint32
    bad(tmp_path, gguf_bytes(GOOD_KVS + [al], GOOD_TIS, GOOD_DATA), match="general.alignment")


def test_custom_alignment_matches_gguf_reader(tmp_path):
    p = tmp_path / "al.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_custom_alignment(64)
    w.add_tensor("x", np.arange(10, dtype=np.float32))
    w.add_tensor("y", np.arange(6, dtype=np.float16).reshape(2, 3))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f, ref = read_gguf(p), gguf.GGUFReader(p)
    assert f.alignment == 64
    assert {t.name: t.data_offset for t in ref.tensors} == {n: t.offset for n, t in f.tensors.items()}
    assert np.array_equal(f.tensor("y"), np.arange(6, dtype=np.float32).reshape(2, 3))


# ---------------------------------------------------------------------------------------------
# Files written with gguf.GGUFWriter: all metadata value types, tiny llama and gpt2 models.


def write_with(path, arch, add_kvs, tensors):
    """tensors: list of (name, array) for float arrays, or (name, raw uint8 array, ggml type)."""
    w = gguf.GGUFWriter(path, arch)
    add_kvs(w)
    for name, arr, *qt in tensors:
        w.add_tensor(name, arr, raw_dtype=qt[0] if qt else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_metadata(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def test_all_value_types_match_gguf_reader(tmp_path):
    def kvs(w):
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -100)
        w.add_uint16("t.u16", 60000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000_000)
        w.add_float32("t.f32", 0.1)
        w.add_uint64("t.u64", 2**64 - 1)
        w.add_int64("t.i64", -(2**63))
        w.add_float64("t.f64", 0.1)
        w.add_bool("t.true", True)
        w.add_bool("t.false", False)
        w.add_string("t.str", "héllo ☃")
        w.add_string("t.empty", "")
        w.add_array("t.strs", ["a", "", "ü"])
        w.add_array("t.ints", [1, -2, 3])
        w.add_array("t.floats", [0.5, -1.25])
        w.add_array("t.bools", [True, False])

    p = write_with(tmp_path / "kv.gguf", "llama", kvs, [("x", np.ones(4, np.float32))])
    ours = read_gguf(p).metadata
    assert ours == reference_metadata(gguf.GGUFReader(p))
    assert ours["t.u64"] == 2**64 - 1 and ours["t.true"] is True and ours["t.str"] == "héllo ☃"
    assert ours["t.f32"] == float(np.float32(0.1)) and ours["t.f64"] == 0.1
    assert all(type(v) is bool for v in ours["t.bools"])


def random_blocks(qtype: Q, rows: int, cols: int, rng) -> np.ndarray:
    """Random valid quantized bytes [rows, bytes per row]: random bits, sane fp16 scales."""
    block, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    fields = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
              Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0]}[qtype]
    for off in fields:
        raw[:, off : off + 2] = (rng.uniform(-0.01, 0.01, (len(raw), 1))).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


LLAMA = dict(D=256, H=4, K=2, F=96, V=100, L=2, ctx=64)


def llama_tensors(rng, tied=False, rope_freqs=True):
    D, H, K, F, V = (LLAMA[k] for k in "DHKFV")
    Hd = D // H

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    def q(qtype, rows, cols):
        if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):  # from real weights
            return ref_quantize(f32(rows, cols) * 0.05, qtype), qtype
        return random_blocks(qtype, rows, cols, rng), qtype

    t = [("token_embd.weight", *q(Q.Q8_0, V, D)), ("output_norm.weight", f32(D))]
    if rope_freqs:
        t.append(("rope_freqs.weight", np.linspace(1, 8, Hd // 2, dtype=np.float32)))
    if not tied:
        t.append(("output.weight", *q(Q.Q3_K, V, D)))
    types = [  # layer 0 exercises quant types, layer 1 float types
        dict(attn_q=Q.Q4_K, attn_k=Q.Q5_0, attn_v=Q.Q6_K, attn_output=Q.Q4_1, ffn_gate=Q.Q5_K, ffn_up=Q.Q2_K,
             ffn_down=Q.Q4_0),
        dict(attn_q=Q.F16, attn_k=Q.BF16, attn_v=Q.Q5_1, attn_output=Q.F32, ffn_gate=Q.Q8_0, ffn_up=Q.F32,
             ffn_down=Q.F16),
    ]
    shapes = dict(attn_q=(H * Hd, D), attn_k=(K * Hd, D), attn_v=(K * Hd, D), attn_output=(D, H * Hd),
                  ffn_gate=(F, D), ffn_up=(F, D), ffn_down=(D, F))
    for i, ty in enumerate(types):
        t.append((f"blk.{i}.attn_norm.weight", f32(D)))
        t.append((f"blk.{i}.ffn_norm.weight", f32(D)))
        for name, qt in ty.items():
            shape = shapes[name]
            if qt == Q.F32:
                t.append((f"blk.{i}.{name}.weight", f32(*shape)))
            elif qt == Q.F16:
                t.append((f"blk.{i}.{name}.weight", f32(*shape).astype(np.float16)))
            elif qt == Q.BF16:
                t.append((f"blk.{i}.{name}.weight", ref_quantize(f32(*shape), Q.BF16), Q.BF16))
            else:
                t.append((f"blk.{i}.{name}.weight", *q(qt, *shape)))
    return t


def llama_kvs(w, drop=()):
    D, H, K, F, L, ctx = (LLAMA[k] for k in ("D", "H", "K", "F", "L", "ctx"))
    vals = {
        "llama.context_length": ctx, "llama.embedding_length": D, "llama.block_count": L,
        "llama.feed_forward_length": F, "llama.attention.head_count": H, "llama.attention.head_count_kv": K,
        "llama.rope.dimension_count": D // H,
    }
    for k, v in vals.items():
        if k not in drop:
            w.add_uint32(k, v)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_string("general.name", "tiny")


GGUF_TO_CANON = {  # spelled out independently of the loader's map
    "token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
    "output.weight": "output.weight", "attn_norm.weight": "attention_norm.weight",
    "ffn_norm.weight": "ffn_norm.weight", "attn_q.weight": "attention.wq.weight",
    "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
    "attn_output.weight": "attention.wo.weight", "ffn_gate.weight": "feed_forward.w1.weight",
    "ffn_up.weight": "feed_forward.w3.weight", "ffn_down.weight": "feed_forward.w2.weight",
}


def canon(name: str) -> str:
    if name.startswith("blk."):
        _, i, rest = name.split(".", 2)
        return f"layers.{i}.{GGUF_TO_CANON[rest]}"
    return GGUF_TO_CANON[name]


def reference_weights(path) -> dict[str, np.ndarray]:
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        out[t.name] = ref_dequantize(t.data, t.tensor_type).astype(np.float32).reshape(
            tuple(int(d) for d in reversed(t.shape)))
    return out


@pytest.mark.parametrize("dtype", [None, "f32"])
@pytest.mark.parametrize("tied", [False, True])
def test_tiny_llama_loads(tmp_path, tied, dtype):
    rng = np.random.default_rng(5)
    p = write_with(tmp_path / "llama.gguf", "llama", llama_kvs, llama_tensors(rng, tied=tied))
    cfg, weights, md = load_gguf(p, dtype=dtype)
    D, H, K, F, V, L, ctx = (LLAMA[k] for k in ("D", "H", "K", "F", "V", "L", "ctx"))
    assert (cfg.arch, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers,
            cfg.max_seq_len, cfg.head_dim) == ("llama", D, H, K, F, V, L, ctx, D // H)
    assert cfg.rope_theta == 500000.0 and cfg.norm_eps == 1e-5 and cfg.tie_embeddings is tied
    assert cfg.rope_scaling == {"rope_type": "freq_factors",
                                "factors": np.linspace(1, 8, D // H // 2, dtype=np.float32).tolist()}
    assert md["general.name"] == "tiny" and md["llama.block_count"] == L
    ref = reference_weights(p)
    gguf_types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(p).tensors}
    assert {"Q8_0", "Q4_K", "F16"} <= set(gguf_types.values())  # the test file mixes types
    want_names = {canon(n) for n in ref if n != "rope_freqs.weight"}
    assert set(weights) == want_names == set(expected_shapes(cfg))
    for gname, r in ref.items():
        if gname == "rope_freqs.weight":
            continue
        w = weights[canon(gname)]
        stored = gguf_types[gname]
        if dtype is None and r.ndim == 2 and stored != "F32":  # kept as stored: the file's own bytes
            assert isinstance(w, QuantizedMatrix) and w.type_name == stored, gname
            assert not w.raw.flags.writeable  # a view of the mapped file, not a copy
            w = w.dequantize()
        assert w.dtype == np.float32 and w.flags.c_contiguous
        assert np.array_equal(w, r), gname


def test_llama_without_rope_freqs(tmp_path):
    rng = np.random.default_rng(6)
    p = write_with(tmp_path / "l.gguf", "llama", llama_kvs, llama_tensors(rng, rope_freqs=False))
    cfg, _, _ = load_gguf(p)
    assert cfg.rope_scaling is None


def test_strict_loading(tmp_path):
    rng = np.random.default_rng(7)
    base = llama_tensors(rng)
    missing = [t for t in base if t[0] != "blk.1.ffn_up.weight"]
    p = write_with(tmp_path / "m.gguf", "llama", llama_kvs, missing)
    with pytest.raises(FormatError, match="missing tensor 'layers.1.feed_forward.w3.weight'"):
        load_gguf(p)
    extra = base + [("blk.0.attn_qkv_weird.weight", np.zeros(4, np.float32))]
    p = write_with(tmp_path / "e.gguf", "llama", llama_kvs, extra)
    with pytest.raises(FormatError, match="unexpected tensor 'blk.0.attn_qkv_weird.weight'"):
        load_gguf(p)
    extra_layer = base + [("blk.2.attn_norm.weight", np.zeros(LLAMA["D"], np.float32))]
    p = write_with(tmp_path / "x.gguf", "llama", llama_kvs, extra_layer)
    with pytest.raises(FormatError, match="unexpected tensor 'layers.2.attention_norm.weight'"):
        load_gguf(p)
    wrong = [(n, np.zeros(LLAMA["D"] + 32, np.float32)) if n == "blk.0.ffn_norm.weight" else (n, *rest)
             for n, *rest in base]
    p = write_with(tmp_path / "w.gguf", "llama", llama_kvs, wrong)
    with pytest.raises(FormatError, match="'layers.0.ffn_norm.weight' has shape \\[288\\], expected \\[256\\]"):
        load_gguf(p)


def test_bad_model_metadata(tmp_path):
    rng = np.random.default_rng(8)
    t = llama_tensors(rng)
    p = write_with(tmp_path / "a.gguf", "mamba", lambda w: None, t)
    with pytest.raises(UnsupportedError, match="unsupported architecture 'mamba'"):
        load_gguf(p)
    p = write_with(tmp_path / "b.gguf", "llama", lambda w: llama_kvs(w, drop=("llama.block_count",)), t)
    with pytest.raises(FormatError, match="missing metadata key 'llama.block_count'"):
        load_gguf(p)

    def partial_rope(w):
        llama_kvs(w, drop=("llama.rope.dimension_count",))
        w.add_uint32("llama.rope.dimension_count", 32)

    p = write_with(tmp_path / "c.gguf", "llama", partial_rope, t)
    with pytest.raises(UnsupportedError, match="partial rotary"):
        load_gguf(p)

    def str_heads(w):
        llama_kvs(w, drop=("llama.attention.head_count",))
        w.add_string("llama.attention.head_count", "4")

    p = write_with(tmp_path / "d.gguf", "llama", str_heads, t)
    with pytest.raises(FormatError, match="must be an integer"):
        load_gguf(p)
    bad_rf = [(n, np.ones(5, np.float32)) if n == "rope_freqs.weight" else (n, *r) for n, *r in t]
    p = write_with(tmp_path / "e.gguf", "llama", llama_kvs, bad_rf)
    with pytest.raises(FormatError, match="rope_freqs"):
        load_gguf(p)


GPT2 = dict(D=64, H=4, F=256, V=50, L=2, ctx=32)


def gpt2_file(path, rng, tied=False):
    D, F, V, L, ctx = (GPT2[k] for k in ("D", "F", "V", "L", "ctx"))

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    t = [("token_embd.weight", f32(V, D)), ("position_embd.weight", f32(ctx, D)),
         ("output_norm.weight", f32(D)), ("output_norm.bias", f32(D))]
    if not tied:
        t.append(("output.weight", f32(V, D)))
    for i in range(L):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", f32(D)), (p + "attn_norm.bias", f32(D)),
              (p + "attn_qkv.weight", f32(3 * D, D)), (p + "attn_qkv.bias", f32(3 * D)),
              (p + "attn_output.weight", f32(D, D)), (p + "attn_output.bias", f32(D)),
              (p + "ffn_norm.weight", f32(D)), (p + "ffn_norm.bias", f32(D)),
              (p + "ffn_up.weight", ref_quantize(f32(F, D), Q.Q8_0), Q.Q8_0), (p + "ffn_up.bias", f32(F)),
              (p + "ffn_down.weight", f32(D, F).astype(np.float16)), (p + "ffn_down.bias", f32(D))]

    def kvs(w):
        for k, v in [("context_length", ctx), ("embedding_length", D), ("block_count", L),
                     ("feed_forward_length", F), ("attention.head_count", GPT2["H"])]:
            w.add_uint32(f"gpt2.{k}", v)
        w.add_float32("gpt2.attention.layer_norm_epsilon", 1e-5)
        w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(V)])  # string arrays get truncated too
        w.add_array("tokenizer.ggml.token_type", [1] * V)

    return write_with(path, "gpt2", kvs, t)


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gpt2_loads(tmp_path, tied):
    rng = np.random.default_rng(9)
    p = gpt2_file(tmp_path / "g.gguf", rng, tied)
    cfg, weights, md = load_gguf(p)
    weights = {n: w.dequantize() if isinstance(w, QuantizedMatrix) else w for n, w in weights.items()}
    D, H, F, V, L, ctx = (GPT2[k] for k in ("D", "H", "F", "V", "L", "ctx"))
    assert md["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(V)]
    assert (cfg.arch, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers,
            cfg.max_seq_len, cfg.norm_eps, cfg.tie_embeddings) == ("gpt2", D, H, H, F, V, L, ctx, 1e-5, tied)
    assert set(weights) == set(expected_shapes(cfg))
    ref = reference_weights(p)
    names = {"token_embd.weight": "tok_embeddings.weight", "position_embd.weight": "pos_embeddings.weight",
             "output_norm.weight": "norm.weight", "output_norm.bias": "norm.bias", "output.weight": "output.weight"}
    layer = {"attn_norm": "attention_norm", "attn_output": "attention.wo", "ffn_norm": "ffn_norm",
             "ffn_up": "feed_forward.w1", "ffn_down": "feed_forward.w2"}
    for gname, r in ref.items():
        if gname in names:
            assert np.array_equal(weights[names[gname]], r)
            continue
        _, i, part, kind = gname.split(".")
        if part == "attn_qkv":  # fused rows q | k | v
            for j, w in enumerate(("wq", "wk", "wv")):
                got = weights[f"layers.{i}.attention.{w}.{kind}"]
                assert got.flags.c_contiguous and got.dtype == np.float32
                assert np.array_equal(got, r[j * D : (j + 1) * D])
        else:
            assert np.array_equal(weights[f"layers.{i}.{layer[part]}.{kind}"], r), gname


def test_truncated_writer_file_at_every_header_byte(tmp_path):
    rng = np.random.default_rng(10)
    p = gpt2_file(tmp_path / "g.gguf", rng)
    data = p.read_bytes()
    f = read_gguf(p)
    last_end = max(t.offset + t.nbytes for t in f.tensors.values())
    cuts = list(range(f.data_offset + 1)) + list(range(f.data_offset, last_end, 997)) + [last_end - 1]
    for cut in cuts:
        q = write(tmp_path, data[:cut], f"c{cut}.gguf")
        with pytest.raises(FormatError):
            read_gguf(q)


def test_progress_bar_on_stderr(tmp_path, capsys):
    rng = np.random.default_rng(11)
    p = gpt2_file(tmp_path / "g.gguf", rng)
    load_gguf(p, progress=False)
    assert capsys.readouterr().err == ""
    load_gguf(p, progress=True)
    err = capsys.readouterr().err
    assert "loading g.gguf" in err and "B" in err


# ---------------------------------------------------------------------------------------------
# The real default model (SmolLM2-135M-Instruct, Q4_1 + Q8_0 embedding).


@pytest.fixture(scope="module")
def real_reader(default_model_path):
    return gguf.GGUFReader(default_model_path)


@pytest.mark.slow
def test_real_model_header_matches_gguf_reader(default_model_path, real_reader):
    f = read_gguf(default_model_path)
    assert f.metadata == reference_metadata(real_reader)
    assert len(f.tensors) == len(real_reader.tensors) == 272
    for t in real_reader.tensors:
        ours = f.tensors[t.name]
        assert ours.shape == tuple(int(d) for d in reversed(t.shape))
        assert ours.ggml_type == int(t.tensor_type)
        assert (ours.offset, ours.nbytes) == (t.data_offset, t.n_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "f32"])
def test_real_model_loads(default_model_path, real_reader, dtype):
    # (how long loading takes is measured by benchmarks/bench_vs_llamacpp.py, never asserted here)
    cfg, weights, md = load_gguf(default_model_path, dtype=dtype)
    assert (cfg.arch, cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size,
            cfg.head_dim, cfg.tie_embeddings) == ("llama", 30, 576, 9, 3, 1536, 49152, 64, True)
    assert cfg.max_seq_len == md["llama.context_length"] == 8192
    assert cfg.rope_theta == md["llama.rope.freq_base"] == 100000.0
    assert cfg.norm_eps == 1e-5 and cfg.rope_scaling is None
    assert set(weights) == set(expected_shapes(cfg))
    if dtype is None:  # matrices kept as stored (Q4_1, the embedding Q8_0), vectors float32
        assert {w.type_name for w in weights.values() if isinstance(w, QuantizedMatrix)} == {"Q4_1", "Q8_0"}
        assert all(isinstance(w, QuantizedMatrix) == (w.ndim == 2) for w in weights.values())
        weights = {n: w.dequantize() if isinstance(w, QuantizedMatrix) else w for n, w in weights.items()}
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in weights.values())
    by_name = {t.name: t for t in real_reader.tensors}
    for gname in ["token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.17.ffn_down.weight",
                  "blk.29.attn_v.weight", "blk.29.ffn_gate.weight", "blk.3.ffn_norm.weight", "output_norm.weight"]:
        t = by_name[gname]
        ref = ref_dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
        assert np.array_equal(weights[canon(gname)], ref), gname
