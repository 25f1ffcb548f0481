"""GGUF files: our own reader for the container, and a loader that maps them to canonical weights.

A GGUF file (versions 2 and 3, little-endian) is laid out as:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x  (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, ne u64[n_dims], ggml_type u32, offset u64)
    padding to `general.alignment` (default 32)
    tensor data: each tensor at data_start + offset (offset a multiple of the alignment)

where a string is (length u64, UTF-8 bytes) and an array value is (element type u32, count u64,
elements). ggml lists dimensions innermost first (`ne[0]` is the row length), so a tensor's numpy
shape is `ne` reversed.

Every count, length, dimension and offset read from the file is a Python int, checked against
the bytes left in the file before anything is read or allocated: a malformed file gives a
one-line FormatError naming the file and the problem, never a huge allocation.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ModelConfig, check_weights
from ..errors import FormatError, ModelNotFoundError, UnsupportedError
from ..quant import GGML_TYPES, PACKED_TYPES, QuantizedMatrix, dequantize

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions
MAX_KEY_LEN = 65535  # the spec limits keys (and we limit tensor names) to 2**16 - 1 bytes
MAX_ARRAY_DEPTH = 8  # arrays of arrays are legal; bound the nesting so recursion stays shallow
INT64_MAX = (1 << 63) - 1

# GGUF metadata value types: id -> (name, struct format of one element, or None for string/array)
VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"), 1: ("INT8", "<b"), 2: ("UINT16", "<H"), 3: ("INT16", "<h"),
    4: ("UINT32", "<I"), 5: ("INT32", "<i"), 6: ("FLOAT32", "<f"), 7: ("BOOL", "<B"),
    8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "<Q"), 11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_T_UINT32, _T_BOOL, _T_STRING, _T_ARRAY = 4, 7, 8, 9
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor lives in the file. `shape` is in numpy order (ggml's `ne` reversed)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type].name

    @property
    def n_elements(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Cursor:
    """Reads little-endian values from a buffer, checking every read against its end."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise FormatError(f"{self.path}: truncated file: {what} needs {n} bytes at offset {self.pos}, "
                              f"only {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def raw_string(self, what: str, max_len: int | None = None) -> bytes:
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            raise FormatError(f"{self.path}: {what} is {n} bytes long, more than the limit of {max_len}")
        self.need(n, what)  # a length larger than the rest of the file is caught here
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def name(self, what: str) -> str:
        """A key or tensor name: strict UTF-8, at most 64 KiB."""
        b = self.raw_string(what, MAX_KEY_LEN)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{self.path}: {what} at offset {self.pos - len(b)} is not valid UTF-8") from None

    def string_value(self, what: str) -> str:
        # surrogateescape keeps any invalid UTF-8 byte (seen in some vocabularies) losslessly.
        return self.raw_string(what).decode("utf-8", "surrogateescape")

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in a row (a vocabulary: ~100k of them), with the checks of raw_string."""
        buf, pos, size, out = self.buf, self.pos, self.size, []
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.need(8, f"length of {what}[{i}]")
            (n,) = _U64.unpack_from(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}[{i}]")
            out.append(bytes(buf[pos : pos + n]).decode("utf-8", "surrogateescape"))
            pos += n
        self.pos = pos
        return out

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        """One metadata value of GGUF type `vtype`, as plain Python."""
        if vtype not in VALUE_TYPES:
            raise FormatError(f"{self.path}: {what} has unknown value type {vtype}")
        if vtype == _T_STRING:
            return self.string_value(what)
        if vtype == _T_ARRAY:
            return self.array(what, depth)
        v = self.unpack(VALUE_TYPES[vtype][1], what)
        if vtype == _T_BOOL:
            if v > 1:
                raise FormatError(f"{self.path}: {what} is a bool with byte value {v} (must be 0 or 1)")
            return bool(v)
        return v

    def array(self, what: str, depth: int) -> list:
        if depth >= MAX_ARRAY_DEPTH:
            raise FormatError(f"{self.path}: {what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype = self.u32(f"element type of {what}")
        if etype not in VALUE_TYPES:
            raise FormatError(f"{self.path}: {what} is an array of unknown value type {etype}")
        count = self.u64(f"length of {what}")
        fmt = VALUE_TYPES[etype][1]
        # Smallest possible encoding of one element: a string or array needs at least its 8-byte
        # length (arrays 12), so `count` elements cannot fit in fewer bytes than this.
        min_size = struct.calcsize(fmt) if fmt else (8 if etype == _T_STRING else 12)
        if count > (self.size - self.pos) // min_size:
            raise FormatError(f"{self.path}: {what} claims {count} elements, more than the "
                              f"{self.size - self.pos} bytes left in the file can hold")
        if etype == _T_STRING:
            return self.strings(count, what)
        if fmt is None:
            return [self.value(etype, f"{what}[{i}]", depth + 1) for i in range(count)]
        # Numbers: one vectorized read, then plain Python values.
        arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
        self.pos += count * min_size
        if etype == _T_BOOL:
            if count and int(arr.max()) > 1:
                raise FormatError(f"{self.path}: {what} holds a bool that is not 0 or 1")
            return [bool(x) for x in arr.tolist()]
        return arr.tolist()


class GGUFFile:
    """A parsed GGUF file: metadata, tensor directory, and the data memory-mapped read-only."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            raise ModelNotFoundError(f"{self.path}: no such file") from None
        # Check magic and version from a plain read first: mmap refuses empty files and we want
        # "not a GGUF file" rather than "truncated" for a short file of the wrong kind.
        with open(self.path, "rb") as f:
            head = f.read(8)
        if len(head) < 4 or head[:4] != GGUF_MAGIC:
            if len(head) < 4 and GGUF_MAGIC.startswith(head):
                raise FormatError(f"{self.path}: truncated file: {size} bytes, too short for a GGUF header")
            raise FormatError(f"{self.path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
        if len(head) < 8:
            raise FormatError(f"{self.path}: truncated file: {size} bytes, too short for a GGUF header")
        (version,) = struct.unpack_from("<I", head, 4)
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack_from(">I", head, 4)[0] in SUPPORTED_VERSIONS:
                raise UnsupportedError(f"{self.path}: big-endian GGUF files are not supported")
            raise UnsupportedError(f"{self.path}: unsupported GGUF version {version} "
                                   f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
        self.version = version
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.file_size = int(self._mm.size)
        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, int] = {}  # key -> GGUF value type id (kept for writing back)
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse(memoryview(self._mm))

    # -- parsing ---------------------------------------------------------------------------------

    def _parse(self, buf: memoryview) -> None:
        c = _Cursor(buf, self.path)
        c.pos = 8
        n_tensors = c.u64("tensor count")
        n_kv = c.u64("metadata kv count")
        # A kv needs at least 8 (key length) + 4 (type) + 1 (value) bytes; a tensor info at least
        # 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset): reject counts the file cannot hold.
        if n_kv > (c.size - c.pos) // 13:
            raise FormatError(f"{self.path}: absurd metadata kv count {n_kv} for a file of {c.size} bytes")
        if n_tensors > (c.size - c.pos) // 24:
            raise FormatError(f"{self.path}: absurd tensor count {n_tensors} for a file of {c.size} bytes")

        for i in range(n_kv):
            key = c.name(f"key of metadata kv #{i}")
            if key in self.metadata:
                raise FormatError(f"{self.path}: duplicate metadata key {key!r}")
            vtype = c.u32(f"value type of {key!r}")
            self.metadata[key] = c.value(vtype, f"metadata value {key!r}")
            self.value_types[key] = vtype

        self.alignment = DEFAULT_ALIGNMENT
        if "general.alignment" in self.metadata:
            a = self.metadata["general.alignment"]
            if self.value_types["general.alignment"] != _T_UINT32 or a == 0 or a & (a - 1):
                raise FormatError(f"{self.path}: general.alignment must be a uint32 power of two, got {a!r}")
            self.alignment = a

        infos, seen = [], set()
        for i in range(n_tensors):
            name = c.name(f"name of tensor #{i}")
            if name in seen:
                raise FormatError(f"{self.path}: duplicate tensor name {name!r}")
            seen.add(name)
            n_dims = c.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise FormatError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (at most {MAX_DIMS})")
            ne = [c.u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims)]
            gtype = c.u32(f"type of tensor {name!r}")
            offset = c.u64(f"data offset of tensor {name!r}")
            infos.append((name, ne, gtype, offset))

        # Tensor data starts at the next multiple of the alignment after the directory.
        self.data_offset = -(-c.pos // self.alignment) * self.alignment
        data_size = self.file_size - self.data_offset
        for name, ne, gtype, offset in infos:
            if gtype not in GGML_TYPES:
                raise UnsupportedError(f"{self.path}: tensor {name!r} has unknown ggml type id {gtype}")
            t = GGML_TYPES[gtype]
            n = 1
            for d in ne:
                n *= d
            if any(d > INT64_MAX for d in ne) or n > INT64_MAX:
                raise FormatError(f"{self.path}: tensor {name!r} has dimensions {ne} whose product overflows int64")
            if ne and ne[0] % t.block_size:
                raise FormatError(f"{self.path}: tensor {name!r} has rows of {ne[0]} weights, "
                                  f"not a multiple of the {t.name} block size {t.block_size}")
            nbytes = n // t.block_size * t.type_size
            if offset % self.alignment:
                raise FormatError(f"{self.path}: tensor {name!r} data offset {offset} is not a multiple "
                                  f"of the alignment {self.alignment}")
            if nbytes > data_size or offset > data_size - nbytes:
                raise FormatError(f"{self.path}: tensor {name!r} ({t.name} {list(reversed(ne))}, {nbytes} bytes "
                                  f"at data offset {offset}) goes past the end of the file ({self.file_size} bytes)")
            self.tensors[name] = GGUFTensor(name, tuple(reversed(ne)), gtype, self.data_offset + offset, nbytes)

        # No two tensors may share bytes (a crafted file could alias weights).
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values() if t.nbytes)
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(f"{self.path}: tensors {n0!r} and {n1!r} overlap in the file")

    # -- access ------------------------------------------------------------------------------------

    def _info(self, name: str) -> GGUFTensor:
        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        return t

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view of the memory-mapped file."""
        t = self._info(name)
        if self._mm is None:
            raise ValueError(f"{self.path}: the file was closed")
        return self._mm[t.offset : t.offset + t.nbytes].view(np.ndarray)

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to a new C-contiguous float32 array of its numpy shape."""
        t = self._info(name)
        return dequantize(self.raw(name), t.ggml_type).reshape(t.shape)

    def close(self) -> None:
        """Drop our reference to the mapping (views handed out keep it alive until they go)."""
        self._mm = None

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} metadata keys, "
                f"{len(self.tensors)} tensors)")


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header and tensor directory; tensor data stays memory-mapped."""
    return GGUFFile(path)


# --- GGUF -> canonical model -------------------------------------------------------------------

# The one key map: GGUF tensor names -> canonical (Meta) names. Per-layer names are the part after
# "blk.{i}."; None marks GPT-2's fused QKV projection, which is split into wq/wk/wv.
_GLOBAL_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "position_embd.weight": "pos_embeddings.weight",  # gpt2
    "output_norm.weight": "norm.weight",
    "output_norm.bias": "norm.bias",  # gpt2
    "output.weight": "output.weight",
}
_LAYER_NAMES = {
    "llama": {
        "attn_norm.weight": "attention_norm.weight",
        "attn_q.weight": "attention.wq.weight",
        "attn_k.weight": "attention.wk.weight",
        "attn_v.weight": "attention.wv.weight",
        "attn_output.weight": "attention.wo.weight",
        "ffn_norm.weight": "ffn_norm.weight",
        "ffn_gate.weight": "feed_forward.w1.weight",
        "ffn_up.weight": "feed_forward.w3.weight",
        "ffn_down.weight": "feed_forward.w2.weight",
    },
    "gpt2": {
        "attn_norm.weight": "attention_norm.weight",
        "attn_norm.bias": "attention_norm.bias",
        "attn_qkv.weight": None,
        "attn_qkv.bias": None,
        "attn_q.weight": "attention.wq.weight",  # some converters store q/k/v apart
        "attn_q.bias": "attention.wq.bias",
        "attn_k.weight": "attention.wk.weight",
        "attn_k.bias": "attention.wk.bias",
        "attn_v.weight": "attention.wv.weight",
        "attn_v.bias": "attention.wv.bias",
        "attn_output.weight": "attention.wo.weight",
        "attn_output.bias": "attention.wo.bias",
        "ffn_norm.weight": "ffn_norm.weight",
        "ffn_norm.bias": "ffn_norm.bias",
        "ffn_up.weight": "feed_forward.w1.weight",  # c_fc
        "ffn_up.bias": "feed_forward.w1.bias",
        "ffn_down.weight": "feed_forward.w2.weight",  # c_proj
        "ffn_down.bias": "feed_forward.w2.bias",
    },
}
_GLOBAL_ARCH = {"position_embd.weight": "gpt2", "output_norm.bias": "gpt2"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")


def _meta_int(md: dict, key: str, path: str, default: int | None = None) -> int:
    v = md.get(key, default)
    if v is None:
        raise FormatError(f"{path}: missing metadata key {key!r}")
    if isinstance(v, list):
        raise UnsupportedError(f"{path}: per-layer values for {key!r} are not supported")
    if not isinstance(v, int) or isinstance(v, bool):
        raise FormatError(f"{path}: metadata {key!r} must be an integer, got {v!r}")
    return v


def _meta_float(f: GGUFFile, key: str, default: float) -> float:
    v = f.metadata.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise FormatError(f"{f.path}: metadata {key!r} must be a number, got {v!r}")
    if f.value_types.get(key) == 6:
        # A float32 such as 1e-5 reads back as 9.99999974e-06: take the shortest decimal that
        # rounds to the same float32, so configs agree with config.json / params.json.
        return float(str(np.float32(v)))
    return float(v)


def gguf_config(f: GGUFFile) -> ModelConfig:
    """ModelConfig from a GGUF file's metadata (and the embedding / rope_freqs tensors)."""
    md, path = f.metadata, f.path
    arch = md.get("general.architecture")
    if arch not in _LAYER_NAMES:
        raise UnsupportedError(f"{path}: unsupported architecture {arch!r} (supported: llama, gpt2)")
    emb = f.tensors.get("token_embd.weight")
    if emb is None or len(emb.shape) != 2:
        raise FormatError(f"{path}: missing 2-D tensor 'token_embd.weight'")
    n_heads = _meta_int(md, f"{arch}.attention.head_count", path)
    dim = _meta_int(md, f"{arch}.embedding_length", path)
    head_dim = _meta_int(md, f"{arch}.attention.key_length", path, 0)
    if head_dim == 0 and (n_heads <= 0 or dim % n_heads):
        raise FormatError(f"{path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    if arch == "llama":
        eps = _meta_float(f, "llama.attention.layer_norm_rms_epsilon", 1e-5)
        rot = md.get("llama.rope.dimension_count")
        if rot is not None and rot != (head_dim or dim // n_heads):
            raise UnsupportedError(f"{path}: partial rotary embeddings (rope.dimension_count {rot}) are not supported")
        scaling = md.get("llama.rope.scaling.type", "none")
        if scaling != "none" and _meta_float(f, "llama.rope.scaling.factor", 1.0) != 1.0:
            raise UnsupportedError(f"{path}: rope scaling type {scaling!r} is not supported")
    else:
        eps = _meta_float(f, "gpt2.attention.layer_norm_epsilon", 1e-5)
    cfg = ModelConfig(
        arch=arch,
        dim=dim,
        n_layers=_meta_int(md, f"{arch}.block_count", path),
        n_heads=n_heads,
        n_kv_heads=_meta_int(md, f"{arch}.attention.head_count_kv", path, n_heads),
        vocab_size=emb.shape[0],
        ffn_dim=_meta_int(md, f"{arch}.feed_forward_length", path),
        max_seq_len=_meta_int(md, f"{arch}.context_length", path),
        norm_eps=eps,
        rope_theta=_meta_float(f, f"{arch}.rope.freq_base", 10000.0),
        tie_embeddings="output.weight" not in f.tensors,
        head_dim=head_dim,
        extra={"format": "gguf", "gguf_version": f.version, "name": md.get("general.name"),
               "file_type": md.get("general.file_type")},
    )
    if "rope_freqs.weight" in f.tensors:
        # Llama 3.1 GGUFs carry the long-context frequency factors as a tensor [Hd/2].
        rf = f.tensors["rope_freqs.weight"]
        if rf.shape != (cfg.head_dim // 2,):
            raise FormatError(f"{path}: tensor 'rope_freqs.weight' has shape {list(rf.shape)}, "
                              f"expected [{cfg.head_dim // 2}]")
        cfg.rope_scaling = {"rope_type": "freq_factors", "factors": f.tensor("rope_freqs.weight").tolist()}
    return cfg


def _canonical_names(f: GGUFFile, cfg: ModelConfig) -> dict[str, str | None]:
    """GGUF tensor name -> canonical name (None: fused QKV to split), rejecting unknown names."""
    out: dict[str, str | None] = {}
    layer_map = _LAYER_NAMES[cfg.arch]
    for name in f.tensors:
        if name == "rope_freqs.weight" and cfg.arch == "llama":
            continue  # became cfg.rope_scaling
        if name in _GLOBAL_NAMES and _GLOBAL_ARCH.get(name, cfg.arch) == cfg.arch:
            out[name] = _GLOBAL_NAMES[name]
            continue
        m = _LAYER_RE.fullmatch(name)
        if m is None or m.group(2) not in layer_map:
            raise FormatError(f"{f.path}: unexpected tensor {name!r} for a {cfg.arch} model")
        canon = layer_map[m.group(2)]
        i = int(m.group(1))
        if canon is None:
            out[name] = None
        else:
            out[name] = f"layers.{i}.{canon}"
    return out


def _qkv_split(cfg: ModelConfig) -> tuple[int, int]:
    """Row boundaries of a fused [(H+2K)*Hd, ...] QKV tensor: q | k | v."""
    q = cfg.n_heads * cfg.head_dim
    return q, q + cfg.n_kv_heads * cfg.head_dim


def load_gguf(path: str | os.PathLike, progress: bool = False, dtype: str | None = None
              ) -> tuple[ModelConfig, dict[str, np.ndarray | QuantizedMatrix], dict]:
    """Load a GGUF model: (config, canonical weights, metadata).

    Matrices stay in their stored type as QuantizedMatrix views of the memory-mapped file (nothing is
    read until used); vectors (norms, biases) become float32 arrays. dtype="f32" dequantizes every
    weight to a float32 array instead.
    Strict: the file must hold exactly the tensors the config implies (see config.check_weights),
    checked before any weight is read.
    """
    f = read_gguf(path)
    cfg = gguf_config(f)
    names = _canonical_names(f, cfg)

    # Shapes under canonical names (fused QKV split) for the strict check.
    shapes: dict[str, tuple[int, ...]] = {}
    q_end, k_end = _qkv_split(cfg)

    def put(canon: str, shape: tuple[int, ...], gname: str) -> None:
        if canon in shapes:  # e.g. both attn_qkv and attn_q in one file
            raise FormatError(f"{f.path}: tensor {gname!r} gives {canon!r} a second time")
        shapes[canon] = shape

    for gname, canon in names.items():
        shape = f.tensors[gname].shape
        if canon is not None:
            put(canon, shape, gname)
            continue
        i = int(_LAYER_RE.fullmatch(gname).group(1))
        kind = gname.rsplit(".", 1)[1]  # weight or bias
        if shape[0] != cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim:
            raise FormatError(f"{f.path}: tensor {gname!r} has shape {list(shape)}, expected "
                              f"{(cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim} rows (q, k, v)")
        for w, (a, b) in zip(("wq", "wk", "wv"), ((0, q_end), (q_end, k_end), (k_end, shape[0]))):
            put(f"layers.{i}.attention.{w}.{kind}", (b - a, *shape[1:]), gname)
    check_weights(cfg, shapes, f.path)

    from tqdm import tqdm

    def read(gname: str):
        t = f.tensors[gname]
        if dtype != "f32" and len(t.shape) == 2 and t.ggml_type in PACKED_TYPES:
            return QuantizedMatrix(f.raw(gname), t.ggml_type, t.shape)  # the file's bytes, mapped
        return f.tensor(gname)

    weights: dict[str, np.ndarray | QuantizedMatrix] = {}
    total = sum(f.tensors[g].nbytes for g in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {Path(f.path).name}",
              disable=not progress, file=sys.stderr, leave=False) as bar:
        for gname, canon in names.items():
            w = read(gname)
            if canon is not None:
                weights[canon] = w
            else:
                # Row slices of a C-contiguous array are C-contiguous: no copies needed.
                i = int(_LAYER_RE.fullmatch(gname).group(1))
                kind = gname.rsplit(".", 1)[1]
                weights[f"layers.{i}.attention.wq.{kind}"] = w[:q_end]  # [H*Hd, D] (or [H*Hd])
                weights[f"layers.{i}.attention.wk.{kind}"] = w[q_end:k_end]  # [K*Hd, D]
                weights[f"layers.{i}.attention.wv.{kind}"] = w[k_end:]  # [K*Hd, D]
            bar.update(f.tensors[gname].nbytes)
    metadata = dict(f.metadata)
    f.close()
    return cfg, weights, metadata
