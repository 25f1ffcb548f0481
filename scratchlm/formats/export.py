"""Export a model to the files other tools run: GGUF (llama.cpp) and a Hugging Face directory (transformers).

    >>> model = scratchlm.load("runs/tiny")                       # doctest: +SKIP
    >>> export_gguf(model, "tiny.gguf", dtype="f16")               # llama.cpp: llama-cli -m tiny.gguf
    >>> export_hf(model, "tiny-hf")                                # AutoModelForCausalLM.from_pretrained("tiny-hf")

Both writers use the readers' key maps backwards (gguf.py's and safetensors_hf.py's), so one table per
format names every tensor, and reading an export back gives the weights that were written.

- GGUF: canonical rows are already in Meta's interleaved q/k order, which GGUF uses, so Llama tensors are
  written as they are; GPT-2's q/k/v are fused into attn_qkv (weights and biases) as llama.cpp expects.
  llama3 rope scaling becomes the rope_freqs tensor (per-frequency divisors), as llama.cpp's converter
  writes it. f16 stores matrices in float16 and keeps vectors (norms, biases, rope_freqs) in float32.
  The tokenizer goes in as a "gpt2" (byte-level BPE) vocabulary: tokens in GPT-2's byte-as-character
  form, merges, token types, special ids, the pre-tokenizer name and the chat template.
- Hugging Face: config.json, model.safetensors (q/k rows permuted back to rotate-half order by
  permute.py; GPT-2's Conv1D matrices transposed to [in, out]), tokenizer.json, tokenizer_config.json,
  generation_config.json.

The GGUF writer streams: the header (every tensor's offset follows from its shape and ggml type) is written
first, then each tensor is fetched, encoded (quantize.py: F32, F16, BF16 or a block type) and written in turn,
so a quantized export holds one tensor at a time beside the model (`quantize_model`, `scratchlm quantize`).
`write_hf_shards` streams a sharded Hugging Face directory the same way.

Files are written to a temporary name and renamed, so an interrupted export leaves no half file behind.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..config import ModelConfig
from ..errors import FormatError, UnsupportedError
from . import gguf as gguf_format
from . import safetensors_hf
from .permute import meta_to_hf

DTYPES = {"f32": np.float32, "f16": np.float16}

# llama.cpp token types (llama_token_type), as the GGUF reader uses them.
TT_NORMAL, TT_CONTROL, TT_UNUSED = 1, 3, 5


# ---- shared -------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in DTYPES:
        raise UnsupportedError(f"export dtype {dtype!r} is not supported (choose f32 or f16)")
    return np.dtype(DTYPES[dtype])


def _host_weights(model) -> dict[str, np.ndarray]:
    """The model's canonical weights as float32 NumPy arrays (whatever backend holds them)."""
    return {n: _host(w) for n, w in model.weights.items()}


def _export_tokenizer(model):
    """The model's tokenizer if it can be exported (a byte-level BPE `Tokenizer`), else None."""
    from ..tokenizer import Tokenizer

    tok = model.tokenizer
    if tok is None:
        return None
    if not isinstance(tok, Tokenizer):
        raise UnsupportedError(f"cannot export a tokenizer of type {type(tok).__name__} (only byte-level BPE and "
                               "character tokenizers)")
    if tok.vocab_size > model.config.vocab_size:
        raise UnsupportedError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size} "
                               "embedding rows")
    return tok


def _replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.write("\n")
    _replace(tmp, path)


# ---- GGUF ---------------------------------------------------------------------------------------


def _host(x) -> np.ndarray:
    """A float32 NumPy array from whatever holds a weight (NumPy, torch, CuPy, or a lazy array-like)."""
    from ..model import to_numpy

    return np.asarray(to_numpy(x), dtype=np.float32)


# A tensor to write: (name in the file, shape, a function returning its float32 array or a row-sliceable
# stand-in). Fetching is deferred so a writer can hold one tensor at a time.
TensorPlan = list[tuple[str, tuple[int, ...], Callable[[], object]]]


def gguf_plan(cfg: ModelConfig, weights: Mapping[str, object]) -> TensorPlan:
    """The GGUF tensors of a model (gguf.py's key map, inverted), in config.expected_shapes' order, each
    fetched from canonical `weights` only when called."""
    from ..config import expected_shapes

    layer_map = gguf_format._LAYER_NAMES[cfg.arch]
    fused_qkv = cfg.arch == "gpt2"
    inv_layer = {canon: g for g, canon in layer_map.items()
                 if canon is not None and not (fused_qkv and canon.startswith(("attention.wq", "attention.wk", "attention.wv")))}
    inv_global = {canon: g for g, canon in gguf_format._GLOBAL_NAMES.items()}
    plan: TensorPlan = []

    def fetch(name):
        return lambda: weights[name]

    for name, shape in expected_shapes(cfg).items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest in inv_layer:
                plan.append((f"blk.{i}.{inv_layer[rest]}", shape, fetch(name)))
            elif not fused_qkv:
                raise UnsupportedError(f"no GGUF name for tensor {name!r}")
        else:
            plan.append((inv_global[name], shape, fetch(name)))
    if fused_qkv:
        qkv_rows = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        for i in range(cfg.n_layers):
            for kind, shape in (("weight", (qkv_rows, cfg.dim)), ("bias", (qkv_rows,))):
                parts = [f"layers.{i}.attention.w{x}.{kind}" for x in "qkv"]
                # [(H+2K)*Hd, D] or [(H+2K)*Hd]: q, k, v rows one after the other
                plan.append((f"blk.{i}.attn_qkv.{kind}", shape,
                             lambda parts=parts: np.concatenate([_host(weights[p]) for p in parts], axis=0)))
    scaling = cfg.rope_scaling
    if scaling:
        # llama.cpp reads long-context rope scaling as per-frequency divisors of the inverse frequencies.
        from ..ops import rope_inv_freq

        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)  # [Hd/2]
        scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)  # [Hd/2]
        freqs = (base / scaled).astype(np.float32)
        plan.append(("rope_freqs.weight", freqs.shape, lambda: freqs))
    return plan


def gguf_tensors(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array [out, in], from canonical weights (gguf.py's key map, inverted)."""
    return {name: _host(f()) for name, _, f in gguf_plan(cfg, weights)}


def _pre_name(pre) -> str:
    """The `tokenizer.ggml.pre` name llama.cpp maps to exactly these regexes."""
    from ..tokenizer.pretokenize import GGUF_PRE_TOKENIZERS

    if any(pre.prefix_space):
        raise UnsupportedError("a pre-tokenizer that adds a prefix space has no GGUF equivalent")
    for name in ("llama-bpe", "gpt-2", "smollm", *GGUF_PRE_TOKENIZERS):
        if GGUF_PRE_TOKENIZERS[name] == pre.patterns:
            return name
    raise UnsupportedError(f"pre-tokenizer {pre.name!r} matches no tokenizer.ggml.pre name llama.cpp knows")


def gguf_vocab(tok, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE tokenizer, padded to `n_vocab` entries.

    Ordinary tokens are written in GPT-2's byte-as-character form, specials as their text (type CONTROL).
    Ids with no token, and repeats of a text already listed (llama.cpp needs every text once), become
    unused "[PAD<id>]" entries.
    """
    from ..tokenizer.pretokenize import bytes_to_unicode

    to_text = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(map(to_text.__getitem__, b))

    ordinary = tok.ordinary_tokens()
    special_of = {i: t for t, i in tok.special_tokens.items()}
    texts: list[str] = []
    types: list[int] = []
    seen: set[str] = set()
    for i in range(n_vocab):
        if i in special_of:
            t, ty = special_of[i], TT_CONTROL
        elif i < len(ordinary) and ordinary[i] is not None:
            t, ty = text(ordinary[i]), TT_NORMAL
        else:
            t, ty = None, TT_UNUSED
        if t is None or t in seen:
            t, ty = f"[PAD{i}]", TT_UNUSED
            while t in seen:
                t = "[" + t + "]"
        seen.add(t)
        texts.append(t)
        types.append(ty)
    merges = [f"{text(a)} {text(b)}" for a, b in tok.merge_list()]
    return texts, types, merges


def _gguf_writer_class():
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        """gguf-py refuses empty arrays, which the GGUF format allows; a character vocabulary of an ASCII-only
        corpus has no merges, and llama.cpp still requires the tokenizer.ggml.merges key."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer, GGUFValueType


def _gguf_metadata(w, VT, cfg: ModelConfig, tok, name: str, file_type: int) -> None:
    """The key/values llama.cpp and transformers read: architecture numbers, then the tokenizer."""
    arch = cfg.arch
    w.add_name(name)
    w.add_file_type(file_type)  # llama.cpp's llama_ftype (LLAMA_FTYPE_ALL_F32 = 0, MOSTLY_F16 = 1, ...)
    w.add_uint32(f"{arch}.context_length", cfg.max_seq_len)
    w.add_uint32(f"{arch}.embedding_length", cfg.dim)
    w.add_uint32(f"{arch}.block_count", cfg.n_layers)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.ffn_dim)
    w.add_uint32(f"{arch}.attention.head_count", cfg.n_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.n_kv_heads)
    if arch == "llama":
        w.add_float32("llama.attention.layer_norm_rms_epsilon", cfg.norm_eps)
        w.add_float32("llama.rope.freq_base", cfg.rope_theta)
        w.add_uint32("llama.rope.dimension_count", cfg.head_dim)
        w.add_uint32("llama.attention.key_length", cfg.head_dim)
        w.add_uint32("llama.attention.value_length", cfg.head_dim)
        w.add_uint32("llama.vocab_size", cfg.vocab_size)
    else:
        w.add_float32("gpt2.attention.layer_norm_epsilon", cfg.norm_eps)
    if tok is not None:
        texts, types, merges = gguf_vocab(tok, cfg.vocab_size)
        w.add_string("tokenizer.ggml.model", "gpt2")
        w.add_string("tokenizer.ggml.pre", _pre_name(tok.pre_tokenizer))
        w.add_key_value("tokenizer.ggml.tokens", texts, VT.ARRAY, sub_type=VT.STRING)
        w.add_key_value("tokenizer.ggml.token_type", types, VT.ARRAY, sub_type=VT.INT32)
        w.add_key_value("tokenizer.ggml.merges", merges, VT.ARRAY, sub_type=VT.STRING)
        if tok.bos_id is not None:
            w.add_uint32("tokenizer.ggml.bos_token_id", tok.bos_id)
        if tok.eos_id is not None:
            w.add_uint32("tokenizer.ggml.eos_token_id", tok.eos_id)
        w.add_bool("tokenizer.ggml.add_bos_token", bool(tok.add_bos))
        w.add_bool("tokenizer.ggml.add_eos_token", False)
        if tok.chat_template:
            w.add_string("tokenizer.chat_template", tok.chat_template)


# Weights per piece when a tensor is encoded piece by piece (rows of a big embedding): 64 MB of float32.
_PIECE_WEIGHTS = 1 << 24


def _pieces(src, shape: tuple[int, ...], ggml_type: int):
    """A tensor's bytes in `ggml_type`, as uint8 [rows, bytes per row] pieces of a few thousand rows, so a
    lazily generated or dequantized-on-access matrix never needs a second full float32 copy."""
    from ..quantize import quantize

    if len(shape) < 2:
        yield quantize(_host(src).reshape(shape), ggml_type).reshape(1, -1)  # a vector: one row of bytes
        return
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    if len(shape) > 2:
        src = _host(src).reshape(rows, cols)  # [..., cols] -> [rows, cols]
    step = max(1, _PIECE_WEIGHTS // cols)
    for r in range(0, rows, step):
        piece = _host(src[r : r + step])
        if piece.shape != (min(step, rows - r), cols):
            raise UnsupportedError(f"rows came out with shape {list(piece.shape)}, expected [{min(step, rows - r)}, {cols}]")
        yield quantize(piece, ggml_type)


def _encode(src, shape: tuple[int, ...], ggml_type: int) -> np.ndarray:
    """All of a tensor's bytes in `ggml_type` (uint8 [rows, bytes per row]), filled piece by piece."""
    from ..quant import nbytes_for

    if len(shape) < 2:
        return next(_pieces(src, shape, ggml_type))
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    out = np.empty((rows, nbytes_for(ggml_type, cols)), np.uint8)
    r = 0
    for piece in _pieces(src, shape, ggml_type):
        out[r : r + piece.shape[0]] = piece
        r += piece.shape[0]
    return out


def write_gguf(path, cfg: ModelConfig, weights: Mapping[str, object], tokenizer=None, *,
               types: Mapping[str, int], file_type: int, name: str = "scratchlm", progress: bool = False,
               desc: str = "writing") -> Path:
    """Write a GGUF file from canonical `weights` (any mapping: Model.weights, or arrays made on demand),
    each tensor in the ggml type `types[gguf name]` gives it, streaming one tensor at a time.

    The header goes first: the offsets of all tensors follow from their shapes and types, so nothing needs
    to be encoded before the file can be laid out. Written to PATH.tmp and renamed at the end."""
    from gguf import GGMLQuantizationType

    from ..quant import GGML_TYPES, nbytes_for

    if cfg.arch == "gpt2" and (cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.dim):
        raise UnsupportedError("GPT-2 in GGUF needs n_kv_heads == n_heads and head_dim == dim / n_heads")
    plan = gguf_plan(cfg, weights)
    missing = [n for n, _, _ in plan if n not in types]
    if missing:
        raise UnsupportedError(f"no ggml type given for tensor {missing[0]!r}")
    Writer, VT = _gguf_writer_class()
    path = Path(path)
    if path.is_dir():
        raise UnsupportedError(f"{path} is a directory; give the .gguf file to write")
    tmp = path.with_name(path.name + ".tmp")
    w = Writer(tmp, cfg.arch)  # also writes general.architecture
    _gguf_metadata(w, VT, cfg, tokenizer, name, file_type)
    if any(GGML_TYPES[types[n]].block_size > 1 for n, _, _ in plan):
        w.add_quantization_version(2)  # GGML_QNT_VERSION: the block layouts of today's ggml
    for n, shape, _ in plan:
        count = int(np.prod(shape))
        w.add_tensor_info(n, shape, np.dtype(np.float32), nbytes_for(types[n], count),
                          raw_dtype=GGMLQuantizationType(types[n]))
    from tqdm import tqdm

    total = sum(int(np.prod(shape)) for _, shape, _ in plan)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="w", unit_scale=True, desc=desc, disable=not progress, file=sys.stderr,
                  leave=False) as bar:
            for n, shape, fetch in plan:
                try:
                    data = _encode(fetch(), shape, types[n])
                except (FormatError, UnsupportedError) as e:  # say which tensor
                    raise type(e)(f"tensor {n!r}: {e}") from None
                w.write_tensor_data(data)
                del data
                bar.update(int(np.prod(shape)))
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    w.close()
    _replace(tmp, path)
    return path


def export_gguf(model, path, dtype: str = "f32") -> Path:
    """Write `model` (config, weights, tokenizer) as a GGUF file llama.cpp and transformers can load:
    matrices in `dtype` (f32 or f16), vectors (norms, biases, rope_freqs) in float32 as llama.cpp keeps them."""
    from ..quantize import F16, F32

    _check_dtype(dtype)
    cfg = model.config
    tok = _export_tokenizer(model)
    matrix = F32 if dtype == "f32" else F16
    types = {n: matrix if len(shape) == 2 else F32 for n, shape, _ in gguf_plan(cfg, model.weights)}
    return write_gguf(path, cfg, model.weights, tok, types=types, file_type=0 if dtype == "f32" else 1,
                      name=str(model.info.get("name") or "scratchlm"))


def quantize_model(source, out, file_type: str, *, adapter=None, progress: bool | None = None) -> tuple[Path, dict[str, int]]:
    """`scratchlm quantize`: load any model scratchlm reads (merging a LoRA adapter into it when given) and
    write it as a GGUF of llama.cpp's `file_type` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K_M, Q5_K_M, Q6_K), with
    llama.cpp's choice of type per tensor (quantize.tensor_types). Returns the path and that choice."""
    from ..quantize import FILE_TYPES, QUANT_TYPES, tensor_types

    if file_type not in QUANT_TYPES:
        raise UnsupportedError(f"unknown quantization type {file_type!r} (choose {', '.join(QUANT_TYPES)})")
    import scratchlm

    if progress is None:
        progress = sys.stderr.isatty()
    # weights stay packed and are dequantized one tensor at a time as they are written; an adapter is
    # added into float32 weights
    model = scratchlm.load(source, adapter=adapter, progress=progress, dtype="f32" if adapter is not None else None)
    if adapter is not None:
        model.adapter.merge_into(model)
    cfg = model.config
    tok = _export_tokenizer(model)
    shapes = {n: shape for n, shape, _ in gguf_plan(cfg, model.weights)}
    types = tensor_types(file_type, shapes, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                         arch=cfg.arch)
    path = write_gguf(out, cfg, model.weights, tok, types=types, file_type=FILE_TYPES[file_type][1],
                      name=str(model.info.get("name") or "scratchlm"), progress=progress, desc=f"quantizing {file_type}")
    return path, types


# ---- Hugging Face ---------------------------------------------------------------------------------


def hf_plan(cfg: ModelConfig, weights: Mapping[str, object]) -> TensorPlan:
    """The Hugging Face tensors of a model (safetensors_hf.py's key map, inverted), each fetched from
    canonical `weights` only when called: q/k rows permuted back to rotate-half order, GPT-2's Conv1D
    matrices transposed to [in, out] and its q/k/v fused into c_attn."""
    from ..config import expected_shapes

    H, K, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    have = expected_shapes(cfg)
    plan: TensorPlan = []
    if cfg.arch == "llama":
        top, layer, prefix = safetensors_hf.LLAMA_TOP, safetensors_hf.LLAMA_LAYER, "model.layers.{}."
    else:
        top, layer, prefix = safetensors_hf.GPT2_TOP, safetensors_hf.GPT2_LAYER, "h.{}."
    for hf_name, (canon, how) in top.items():
        if canon in have:
            plan.append((hf_name if cfg.arch == "llama" else "transformer." + hf_name, have[canon],
                         lambda c=canon: weights[c]))
    if cfg.arch == "gpt2" and "output.weight" in have:
        plan.append(("lm_head.weight", have["output.weight"], lambda: weights["output.weight"]))
    for i in range(cfg.n_layers):
        for hf_suffix, (canon, how) in layer.items():
            name = prefix.format(i) + hf_suffix
            if cfg.arch == "gpt2":
                name = "transformer." + name
            c = f"layers.{i}.{canon}"
            if how == "qkv":  # GPT-2's fused c_attn: q, k, v rows side by side, Conv1D [in, out]
                parts = [c.format(x) for x in "qkv"]
                shape = tuple(sum(have[p][0] for p in parts) if d == 0 else n for d, n in enumerate(have[parts[0]]))
                shape = shape[::-1] if len(shape) == 2 else shape  # [3*D, D] -> [D, 3*D]

                def fused(parts=parts):
                    f = np.concatenate([_host(weights[p]) for p in parts], axis=0)  # [3*D, D] or [3*D]
                    return f.T if f.ndim == 2 else f
                plan.append((name, shape, fused))
            elif how == "T":  # Conv1D stores [in, out]
                plan.append((name, have[c][::-1], lambda c=c: _host(weights[c]).T))
            elif how in ("q", "k"):  # interleaved -> rotate-half rows
                heads = H if how == "q" else K
                plan.append((name, have[c], lambda c=c, heads=heads: meta_to_hf(_host(weights[c]), heads, Hd)))
            else:
                plan.append((name, have[c], lambda c=c: weights[c]))
    return plan


def hf_state_dict(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face name -> array, from canonical weights (safetensors_hf.py's key map, inverted)."""
    return {name: f() for name, _, f in hf_plan(cfg, weights)}


def hf_config(cfg: ModelConfig, tok, dtype: str) -> dict:
    """config.json for LlamaForCausalLM / GPT2LMHeadModel (the form most hub checkpoints have)."""
    torch_dtype = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype]
    bos = tok.bos_id if tok is not None else None
    eos = tok.eos_id if tok is not None else None
    if cfg.arch == "llama":
        scaling = cfg.rope_scaling
        if scaling and scaling.get("rope_type") != "llama3":
            raise UnsupportedError(f"rope scaling {scaling.get('rope_type')!r} (per-frequency factors from a GGUF) "
                                   "has no config.json form")
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": dict(scaling) if scaling else None,
            "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1,
            "use_cache": True, "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": torch_dtype,
        }
    if cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.dim:
        raise UnsupportedError("GPT-2 needs n_kv_heads == n_heads and head_dim == dim / n_heads")
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
        "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len, "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
        "tie_word_embeddings": cfg.tie_embeddings, "scale_attn_weights": True,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": torch_dtype,
    }


def hf_tokenizer_config(tok, max_len: int) -> dict:
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
           "bos_token": tok.bos_token if tok.bos_id is not None else None,
           "eos_token": tok.eos_token if tok.eos_id is not None else None,
           "add_bos_token": bool(tok.add_bos), "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": max_len}
    if tok.chat_template:
        cfg["chat_template"] = tok.chat_template
    return cfg


def export_hf(model, out_dir, dtype: str = "f32") -> Path:
    """Write `model` as a Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    from safetensors.numpy import save_file

    np_dtype = _check_dtype(dtype)
    cfg = model.config
    tok = _export_tokenizer(model)
    config = hf_config(cfg, tok, dtype)  # before writing anything: it may refuse the model
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UnsupportedError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: np.ascontiguousarray(a, dtype=np_dtype) for n, a in hf_state_dict(cfg, _host_weights(model)).items()}
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    _replace(tmp, out / "model.safetensors")
    _write_hf_side_files(out, cfg, tok, config)
    return out


def _write_hf_side_files(out: Path, cfg: ModelConfig, tok, config: dict) -> None:
    """config.json, the tokenizer files and generation_config.json of a Hugging Face directory."""
    _write_json(out / "config.json", config)
    gen = {"_from_model_config": True}
    if tok is not None:
        from ..tokenizer.readers import tokenizer_to_hf_json

        _write_json(out / "tokenizer.json", tokenizer_to_hf_json(tok))
        _write_json(out / "tokenizer_config.json", hf_tokenizer_config(tok, cfg.max_seq_len))
        if tok.bos_id is not None:
            gen["bos_token_id"] = tok.bos_id
        if tok.eos_ids:
            gen["eos_token_id"] = tok.eos_ids if len(tok.eos_ids) > 1 else tok.eos_ids[0]
    _write_json(out / "generation_config.json", gen)


_ST_DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 30)}  # safetensors name, ggml type id


def write_hf_shards(out_dir, cfg: ModelConfig, weights: Mapping[str, object], tokenizer=None, *,
                    dtype: str = "bf16", shard_bytes: int = 5 * 10**9, progress: bool = False) -> Path:
    """Write a Hugging Face directory with the weights in model-0000i-of-0000N.safetensors shards (at most
    `shard_bytes` each, as save_pretrained splits them) and model.safetensors.index.json, streaming tensor by
    tensor from canonical `weights` (any mapping), so memory holds one tensor (or a slice of rows) at a time.

    The safetensors package can only write a whole dict at once; the format is simple enough to stream:
    an 8-byte header length, a JSON header (padded with spaces to a multiple of 8, as the reference writer
    does) giving every tensor's byte range, then the bytes in that order."""
    if dtype not in _ST_DTYPES:
        raise UnsupportedError(f"dtype {dtype!r} is not supported (choose f32, f16 or bf16)")
    st_name, ggml_type = _ST_DTYPES[dtype]
    config = hf_config(cfg, tokenizer, dtype)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UnsupportedError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    plan = hf_plan(cfg, weights)
    size = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    shards: list[list] = [[]]
    used = 0
    for entry in plan:
        nbytes = int(np.prod(entry[1])) * size
        if shards[-1] and used + nbytes > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    from tqdm import tqdm

    weight_map, total = {}, 0
    with tqdm(total=sum(int(np.prod(s)) for _, s, _ in plan), unit="w", unit_scale=True, desc="writing",
              disable=not progress, file=sys.stderr, leave=False) as bar:
        for fname, entries in zip(files, shards):
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, _ in entries:
                nbytes = int(np.prod(shape)) * size
                header[name] = {"dtype": st_name, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
                weight_map[name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            tmp = out / (fname + ".tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(len(raw).to_bytes(8, "little"))
                    f.write(raw)
                    for name, shape, fetch in entries:
                        for piece in _pieces(fetch(), shape, ggml_type):
                            piece.tofile(f)
                        bar.update(int(np.prod(shape)))
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _replace(tmp, out / fname)
            total += offset
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_hf_side_files(out, cfg, tokenizer, config)
    return out


def export(source, fmt: str, out, dtype: str = "f32") -> Path:
    """Load `source` (a run directory or any model scratchlm reads) and export it: fmt "gguf" or "hf"."""
    if fmt not in ("gguf", "hf"):
        raise UnsupportedError(f"export format {fmt!r} is not supported (choose gguf or hf)")
    _check_dtype(dtype)
    import scratchlm

    model = scratchlm.load(source)
    return export_gguf(model, out, dtype) if fmt == "gguf" else export_hf(model, out, dtype)
