"""Hugging Face checkpoints: our own safetensors reader and the HF -> canonical (Meta) key map.

A safetensors file is:

    8 bytes   N, the header length (little-endian uint64)
    N bytes   a JSON object: {"__metadata__": {str: str}?, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}
    the rest  the data section; each tensor's bytes are data[begin:end] (offsets relative to the data section),
              row-major, little-endian.

We check everything the header claims before touching the data: every tensor's byte range must match
its shape and dtype, and the ranges must tile the data section exactly (no overlap, no gap, nothing past
the end). A Hugging Face model directory adds config.json (the numbers), maybe generation_config.json
(stop tokens) and either one model.safetensors or shards listed by model.safetensors.index.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig, check_weights, config_value, expected_shapes, is_int
from ..errors import FormatError, ModelNotFoundError, UnsupportedError
from ..quant import GGML_TYPE_IDS, QuantizedMatrix
from .permute import hf_to_meta

# Bytes per element of every dtype the safetensors format defines (so any valid header can be checked),
# and the numpy dtype of those we can load. Everything is little-endian in the file.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
LOADABLE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
MAX_HEADER = 100 << 20  # the reference implementation refuses headers above 100 MB too


def _reject_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise FormatError(f"duplicate key {k!r}")
        d[k] = v
    return d


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: put the 16 bits in the high half of a uint32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


class SafetensorsFile:
    """One .safetensors file: the checked header, and its tensors read on demand as float32."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise FormatError(f"{self.path}: not a safetensors file (only {size} bytes)")
                n = int.from_bytes(head, "little")
                if n > MAX_HEADER or 8 + n > size:
                    raise FormatError(f"{self.path}: header length {n} is impossible for a file of {size} bytes")
                raw = f.read(n)
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror or e}") from None
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
        except FormatError as e:
            raise FormatError(f"{self.path}: header has a {e}") from None
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise FormatError(f"{self.path}: header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise FormatError(f"{self.path}: header is not a JSON object")
        self.data_start = 8 + n
        self.data_size = size - self.data_start
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise FormatError(f"{self.path}: __metadata__ must be an object of strings")
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> (dtype, shape, begin, end)
        for name, e in header.items():
            self.entries[name] = self._check_entry(name, e)
        # The byte ranges must tile the data section: sorted by start, each begins where the last ended.
        pos = 0
        for name, (_, _, begin, end) in sorted(self.entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
            if begin != pos:
                what = "overlaps the previous tensor" if begin < pos else f"leaves a gap of {begin - pos} bytes"
                raise FormatError(f"{self.path}: tensor {name!r} at data offset {begin} {what}")
            pos = end
        if pos != self.data_size:
            raise FormatError(f"{self.path}: tensors cover {pos} bytes but the data section has {self.data_size}")
        self._mm = None

    def _check_entry(self, name: str, e) -> tuple[str, tuple[int, ...], int, int]:
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"{self.path}: tensor {name!r}: header entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise FormatError(f"{self.path}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(is_int(d) and d >= 0 for d in shape):
            raise FormatError(f"{self.path}: tensor {name!r} has a bad shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(is_int(o) for o in offs) and 0 <= offs[0] <= offs[1]):
            raise FormatError(f"{self.path}: tensor {name!r} has bad data_offsets {offs!r}")
        begin, end = offs
        nbytes = DTYPE_SIZES[dtype]
        for d in shape:  # Python ints: no overflow however large the claimed dims
            nbytes *= d
        if end - begin != nbytes:
            raise FormatError(f"{self.path}: tensor {name!r} {dtype}{shape} needs {nbytes} bytes, data_offsets give {end - begin}")
        if end > self.data_size:
            raise FormatError(f"{self.path}: tensor {name!r} ends at data offset {end}, past the end of the file's data ({self.data_size})")
        return dtype, tuple(shape), begin, end

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def read_stored(self, name: str) -> np.ndarray:
        """The tensor as stored, a read-only view of the memory-mapped file: float32, float16, or (bfloat16)
        uint16 bit patterns."""
        dtype, shape, begin, end = self.entries[name]
        if dtype not in LOADABLE:
            raise UnsupportedError(f"{self.path}: tensor {name!r} has dtype {dtype}; supported: F32, F16, BF16")
        if self._mm is None:
            if self.data_size == 0:
                self._mm = np.zeros(0, np.uint8)
            else:
                self._mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start, shape=(self.data_size,))
        return self._mm[begin:end].view(np.ndarray).view(LOADABLE[dtype]).reshape(shape)  # no copy

    def read(self, name: str) -> np.ndarray:
        """The tensor as a new float32 C-contiguous array (F32, F16 and BF16 files)."""
        raw = self.read_stored(name)
        return bf16_to_f32(raw) if self.dtype(name) == "BF16" else raw.astype(np.float32)  # a new array either way

    def close(self) -> None:
        self._mm = None  # numpy unmaps when the last view is gone (a packed weight may keep one)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file, as float32 arrays."""
    with SafetensorsFile(path) as f:
        return {name: f.read(name) for name in f.entries}


# ---------------------------------------------------------------------------------------------------
# config.json -> ModelConfig

def _rope_from_hf(c: dict, source: str) -> tuple[float, dict | None]:
    """rope_theta and our rope_scaling dict, from either the transformers 5 form (rope_parameters holding
    rope_theta too) or the older one (rope_theta + rope_scaling), which is what most hub checkpoints have."""
    params = c.get("rope_parameters")
    if params is None:
        params = c.get("rope_scaling")
        theta = config_value(c, "rope_theta", "float", source, 10000.0)
    else:
        if not isinstance(params, dict):
            raise FormatError(f"{source}: rope_parameters must be an object")
        theta = config_value(params, "rope_theta", "float", source, config_value(c, "rope_theta", "float", source, 10000.0))
    if params is None:
        return theta, None
    if not isinstance(params, dict):
        raise FormatError(f"{source}: rope_scaling must be an object or null")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise UnsupportedError(f"{source}: rope scaling type {kind!r} is not supported (only 'llama3')")
    scaling = {"rope_type": "llama3"}
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        scaling[k] = config_value(params, k, "float", source + " rope_scaling")
    scaling["original_max_position_embeddings"] = config_value(params, "original_max_position_embeddings", "int", source + " rope_scaling")
    return theta, scaling


def config_from_hf(c: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json (already parsed) of a llama or gpt2 model."""
    mt = c.get("model_type")
    if mt == "llama":
        if c.get("hidden_act", "silu") != "silu":
            raise UnsupportedError(f"{source}: hidden_act {c['hidden_act']!r} is not supported (only 'silu')")
        for k in ("attention_bias", "mlp_bias"):
            if c.get(k):
                raise UnsupportedError(f"{source}: {k}=true is not supported for llama models")
        D = config_value(c, "hidden_size", "int", source)
        H = config_value(c, "num_attention_heads", "int", source)
        theta, scaling = _rope_from_hf(c, source)
        return ModelConfig(
            arch="llama", dim=D, n_layers=config_value(c, "num_hidden_layers", "int", source), n_heads=H,
            n_kv_heads=config_value(c, "num_key_value_heads", "int", source, H), vocab_size=config_value(c, "vocab_size", "int", source),
            ffn_dim=config_value(c, "intermediate_size", "int", source),
            max_seq_len=config_value(c, "max_position_embeddings", "int", source),
            norm_eps=config_value(c, "rms_norm_eps", "float", source, 1e-6), rope_theta=theta, rope_scaling=scaling,
            tie_embeddings=config_value(c, "tie_word_embeddings", "bool", source, False),
            head_dim=config_value(c, "head_dim", "int", source, 0), extra={"format": "hf", "model_type": mt})
    if mt == "gpt2":
        act = c.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedError(f"{source}: activation_function {act!r} is not supported (only the tanh GELU 'gelu_new')")
        for k in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
            if c.get(k):
                raise UnsupportedError(f"{source}: {k}=true is not supported")
        if c.get("scale_attn_weights", True) is not True:
            raise UnsupportedError(f"{source}: scale_attn_weights=false is not supported")
        D = config_value(c, "n_embd", "int", source)
        H = config_value(c, "n_head", "int", source)
        return ModelConfig(
            arch="gpt2", dim=D, n_layers=config_value(c, "n_layer", "int", source), n_heads=H, n_kv_heads=H,
            vocab_size=config_value(c, "vocab_size", "int", source), ffn_dim=config_value(c, "n_inner", "int", source, 4 * D),
            max_seq_len=config_value(c, "n_positions", "int", source),
            norm_eps=config_value(c, "layer_norm_epsilon", "float", source, 1e-5),
            tie_embeddings=config_value(c, "tie_word_embeddings", "bool", source, True), extra={"format": "hf", "model_type": mt})
    raise UnsupportedError(f"{source}: model_type {mt!r} is not supported (supported: 'llama', 'gpt2')")


# ---------------------------------------------------------------------------------------------------
# The key map: Hugging Face name -> (canonical names, how to transform).
#
# Transform kinds: "copy"; "q" / "k" (rotate-half -> interleaved rows, see permute.py); "T" (GPT-2's
# Conv1D stores [in, out]: transpose to [out, in]); "qkv" (GPT-2's fused c_attn: transpose, then split
# rows into q, k, v; for the bias just split).

LLAMA_LAYER = {
    "input_layernorm.weight": ("attention_norm.weight", "copy"),
    "self_attn.q_proj.weight": ("attention.wq.weight", "q"),
    "self_attn.k_proj.weight": ("attention.wk.weight", "k"),
    "self_attn.v_proj.weight": ("attention.wv.weight", "copy"),
    "self_attn.o_proj.weight": ("attention.wo.weight", "copy"),
    "post_attention_layernorm.weight": ("ffn_norm.weight", "copy"),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", "copy"),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", "copy"),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", "copy"),
}
LLAMA_TOP = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", "copy"),
    "model.norm.weight": ("norm.weight", "copy"),
    "lm_head.weight": ("output.weight", "copy"),
}
GPT2_LAYER = {
    "ln_1.weight": ("attention_norm.weight", "copy"),
    "ln_1.bias": ("attention_norm.bias", "copy"),
    "attn.c_attn.weight": ("attention.w{}.weight", "qkv"),
    "attn.c_attn.bias": ("attention.w{}.bias", "qkv"),
    "attn.c_proj.weight": ("attention.wo.weight", "T"),
    "attn.c_proj.bias": ("attention.wo.bias", "copy"),
    "ln_2.weight": ("ffn_norm.weight", "copy"),
    "ln_2.bias": ("ffn_norm.bias", "copy"),
    "mlp.c_fc.weight": ("feed_forward.w1.weight", "T"),
    "mlp.c_fc.bias": ("feed_forward.w1.bias", "copy"),
    "mlp.c_proj.weight": ("feed_forward.w2.weight", "T"),
    "mlp.c_proj.bias": ("feed_forward.w2.bias", "copy"),
}
GPT2_TOP = {
    "wte.weight": ("tok_embeddings.weight", "copy"),
    "wpe.weight": ("pos_embeddings.weight", "copy"),
    "ln_f.weight": ("norm.weight", "copy"),
    "ln_f.bias": ("norm.bias", "copy"),
}
# Buffers some checkpoints carry that are not weights (recomputed by every implementation): skipped by name.
IGNORED = (re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
           re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)"))


def map_hf_name(name: str, arch: str) -> tuple[str, str] | None:
    """(canonical name, transform) for a Hugging Face tensor name; None for an ignored buffer.

    Raises FormatError for a name that is neither a known weight nor an ignored buffer."""
    if any(p.fullmatch(name) for p in IGNORED):
        return None
    if arch == "llama":
        if name in LLAMA_TOP:
            return LLAMA_TOP[name]
        m = re.fullmatch(r"model\.layers\.(0|[1-9]\d{0,6})\.(.+)", name)
        if m and m.group(2) in LLAMA_LAYER:
            canon, how = LLAMA_LAYER[m.group(2)]
            return f"layers.{m.group(1)}.{canon}", how
    else:
        # Older GPT-2 checkpoints (the original "gpt2" on the hub) have no "transformer." prefix.
        short = name[len("transformer."):] if name.startswith("transformer.") else name
        if name == "lm_head.weight":
            return "output.weight", "copy"
        if short in GPT2_TOP:
            return GPT2_TOP[short]
        m = re.fullmatch(r"h\.(0|[1-9]\d{0,6})\.(.+)", short)
        if m and m.group(2) in GPT2_LAYER:
            canon, how = GPT2_LAYER[m.group(2)]
            return f"layers.{m.group(1)}.{canon}", how
    raise FormatError(f"unknown tensor {name!r} for a {arch} model")


def _canonical_shapes(hf_name: str, canon: str, how: str, shape: tuple[int, ...], source: str) -> dict[str, tuple]:
    """The canonical tensors (names and shapes) one HF tensor becomes, computed from its header alone."""
    if how == "T":
        if len(shape) != 2:
            raise FormatError(f"{source}: tensor {hf_name!r} has shape {list(shape)}, expected a matrix")
        return {canon: (shape[1], shape[0])}
    if how == "qkv":
        # c_attn.weight is [D, 3D] (in, out); c_attn.bias is [3D].
        out = shape[-1]
        if len(shape) not in (1, 2) or out % 3:
            raise FormatError(f"{source}: tensor {hf_name!r} has shape {list(shape)}, expected [D, 3*D] or [3*D]")
        part = (out // 3, shape[0]) if len(shape) == 2 else (out // 3,)
        return {canon.format(x): part for x in "qkv"}
    return {canon: shape}


def _transform(w: np.ndarray, canon: str, how: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    if how == "q":
        return {canon: hf_to_meta(w, cfg.n_heads, cfg.head_dim)}
    if how == "k":
        return {canon: hf_to_meta(w, cfg.n_kv_heads, cfg.head_dim)}
    if how == "T":
        return {canon: np.ascontiguousarray(w.T)}  # [in, out] -> [out, in]
    if how == "qkv":
        wt = w.T if w.ndim == 2 else w  # [D, 3D] -> [3D, D]
        q, k, v = np.split(wt, 3, axis=0)  # [3D, ...] -> 3 x [D, ...]
        return {canon.format("q"): np.ascontiguousarray(q), canon.format("k"): np.ascontiguousarray(k),
                canon.format("v"): np.ascontiguousarray(v)}
    return {canon: w}


def _read_json(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)  # config files are tiny; never read an arbitrarily large one
        d = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise FormatError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise FormatError(f"{path}: {what} is not valid JSON") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: {what} is not a JSON object")
    return d


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a directory: model.safetensors, or the shards its index lists."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index_path = path / "model.safetensors.index.json"
    if not index_path.is_file():
        found = sorted(p.name for p in path.glob("*.safetensors"))
        raise FormatError(f"{path}: no model.safetensors or model.safetensors.index.json"
                          + (f" (found {', '.join(found[:3])})" if found else ""))
    index = _read_json(index_path, "the shard index")
    wm = index.get("weight_map")
    if not isinstance(wm, dict) or not wm:
        raise FormatError(f"{index_path}: 'weight_map' must be a non-empty object")
    for tensor, fname in wm.items():
        if not isinstance(fname, str) or not fname or os.path.basename(fname) != fname or fname in (".", ".."):
            raise FormatError(f"{index_path}: tensor {tensor!r} points to a bad file name {fname!r}")
    names = sorted(set(wm.values()))
    for fname in names:
        if not (path / fname).is_file():
            raise FormatError(f"{index_path}: shard {fname!r} is missing from {path}")
    return [path / n for n in names]


def _stored_matrix(w: np.ndarray, dtype: str):
    """A 2-D float16 / bfloat16-bits array as the QuantizedMatrix of its type (a view when w is contiguous)."""
    return QuantizedMatrix(np.ascontiguousarray(w).view(np.uint8), GGML_TYPE_IDS[dtype], w.shape)


def load_hf_dir(path, progress: bool = False, dtype: str | None = None
                ) -> tuple[ModelConfig, dict[str, np.ndarray | QuantizedMatrix], dict]:
    """Load a Hugging Face model directory: (config, canonical weights, info).

    16-bit matrices stay 16-bit (QuantizedMatrix of type F16 or BF16, viewing the mapped file where no
    reordering is needed); vectors and F32 tensors become float32 arrays. dtype="f32": every weight float32.

    info holds what else the directory says: eos_token_id / bos_token_id (generation_config.json wins
    over config.json: it is what HF's generate uses), torch_dtype, the tokenizer.json path if present,
    and the safetensors files read."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise FormatError(f"{path}: not a Hugging Face model directory (no config.json)")
    c = _read_json(path / "config.json", "config.json")
    cfg = config_from_hf(c, str(path / "config.json"))
    files = _shard_files(path)

    # Pass 1: headers only. Map every name, compute canonical shapes, check strictly before reading data.
    opened = [SafetensorsFile(f) for f in files]
    plan = []  # (file, hf name, canonical name, transform)
    shapes: dict[str, tuple] = {}
    seen: dict[str, Path] = {}
    index = None
    if files[0].name != "model.safetensors":
        index = _read_json(path / "model.safetensors.index.json", "the shard index")["weight_map"]
    for sf in opened:
        for name in sf.entries:
            if name in seen:
                raise FormatError(f"{sf.path}: tensor {name!r} also appears in {seen[name].name}")
            seen[name] = sf.path
            if index is not None and index.get(name) != sf.path.name:
                raise FormatError(f"{sf.path}: tensor {name!r} is not listed for this file in model.safetensors.index.json")
            try:
                mapped = map_hf_name(name, cfg.arch)
            except FormatError as e:
                raise FormatError(f"{sf.path}: {e}") from None
            if mapped is None:
                continue
            canon, how = mapped
            if cfg.tie_embeddings and canon == "output.weight":
                plan.append((sf, name, canon, "tied"))  # kept only if it is a copy of the embedding
                continue
            for cn, shp in _canonical_shapes(name, canon, how, sf.shape(name), str(sf.path)).items():
                if cn in shapes:
                    raise FormatError(f"{sf.path}: two tensors map to {cn!r} (the second is {name!r})")
                shapes[cn] = shp
            plan.append((sf, name, canon, how))
    if index is not None:
        absent = [n for n in index if n not in seen]
        if absent:
            raise FormatError(f"{path}: tensor {absent[0]!r} is listed in the index but in no shard")
    where = str(files[0]) if len(files) == 1 else f"{path} ({len(files)} shards)"
    check_weights(cfg, shapes, where)

    # Pass 2: read, convert to float32, transform.
    weights: dict[str, np.ndarray] = {}
    tied_copies = []
    steps = plan
    if progress:
        from tqdm import tqdm
        steps = tqdm(plan, desc=f"loading {path.name}", unit="tensor")
    for sf, name, canon, how in steps:
        kind = sf.dtype(name)
        packed = dtype != "f32" and kind in ("F16", "BF16") and len(sf.shape(name)) == 2
        w = sf.read_stored(name) if packed else sf.read(name)
        if how == "tied":
            tied_copies.append((sf, name, w))
            continue
        for cn, a in _transform(w, canon, how, cfg).items():  # the q/k permutation works on the 16-bit patterns too
            weights[cn] = _stored_matrix(a, kind) if packed else a
    for sf, name, w in tied_copies:
        # tie_word_embeddings with lm_head.weight stored anyway: fine only if it is the embedding.
        emb = weights["tok_embeddings.weight"]
        if isinstance(emb, QuantizedMatrix):
            emb = emb.raw.view(w.dtype).reshape(emb.shape) if w.dtype.itemsize == 2 else emb.dequantize()
        if w.shape != emb.shape or not np.array_equal(w, emb):
            raise FormatError(f"{sf.path}: tie_word_embeddings is true but {name!r} differs from the embedding")
    for sf in opened:
        sf.close()
    want = expected_shapes(cfg)
    for n, w in weights.items():  # belt and braces: the transforms must not change what pass 1 checked
        if w.shape != want[n]:
            raise FormatError(f"{where}: tensor {n!r} came out with shape {list(w.shape)}, expected {list(want[n])}")

    gen = {}
    if (path / "generation_config.json").is_file():
        gen = _read_json(path / "generation_config.json", "generation_config.json")
    info = {"format": "hf", "files": [str(f) for f in files],
            "torch_dtype": c.get("torch_dtype", c.get("dtype")),
            "tokenizer": str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else None}
    for key in ("eos_token_id", "bos_token_id"):
        v = gen.get(key, c.get(key))
        ok = v is None or is_int(v) or (isinstance(v, list) and all(is_int(x) for x in v))
        if not ok:
            raise FormatError(f"{path}: {key} must be an integer or a list of integers, got {v!r}")
        info[key] = v
    return cfg, weights, info
