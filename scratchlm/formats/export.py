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

Files are written to a temporary name and renamed, so an interrupted export leaves no half file behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import UnsupportedError
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
    from ..model import to_numpy

    return {n: np.asarray(to_numpy(w), dtype=np.float32) for n, w in model.weights.items()}


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


def gguf_tensors(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GGUF tensor name -> float32 array [out, in], from canonical weights (gguf.py's key map, inverted)."""
    layer_map = gguf_format._LAYER_NAMES[cfg.arch]
    fused_qkv = cfg.arch == "gpt2"
    inv_layer = {canon: g for g, canon in layer_map.items()
                 if canon is not None and not (fused_qkv and canon.startswith(("attention.wq", "attention.wk", "attention.wv")))}
    inv_global = {canon: g for g, canon in gguf_format._GLOBAL_NAMES.items()}
    out: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            if rest in inv_layer:
                out[f"blk.{i}.{inv_layer[rest]}"] = w
            elif not fused_qkv:
                raise UnsupportedError(f"no GGUF name for tensor {name!r}")
        else:
            out[inv_global[name]] = w
    if fused_qkv:
        for i in range(cfg.n_layers):
            for kind in ("weight", "bias"):
                parts = [weights[f"layers.{i}.attention.w{x}.{kind}"] for x in "qkv"]
                out[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(parts, axis=0)  # [(H+2K)*Hd, D] or [(H+2K)*Hd]
    scaling = cfg.rope_scaling
    if scaling:
        # llama.cpp reads long-context rope scaling as per-frequency divisors of the inverse frequencies.
        from ..ops import rope_inv_freq

        base = rope_inv_freq(cfg.head_dim, cfg.rope_theta, None)  # [Hd/2]
        scaled = rope_inv_freq(cfg.head_dim, cfg.rope_theta, scaling)  # [Hd/2]
        out["rope_freqs.weight"] = (base / scaled).astype(np.float32)
    return out


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


def export_gguf(model, path, dtype: str = "f32") -> Path:
    """Write `model` (config, weights, tokenizer) as a GGUF file llama.cpp and transformers can load."""
    np_dtype = _check_dtype(dtype)
    cfg = model.config
    if cfg.arch == "gpt2" and (cfg.n_kv_heads != cfg.n_heads or cfg.head_dim * cfg.n_heads != cfg.dim):
        raise UnsupportedError("GPT-2 in GGUF needs n_kv_heads == n_heads and head_dim == dim / n_heads")
    tok = _export_tokenizer(model)
    Writer, VT = _gguf_writer_class()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = Writer(tmp, cfg.arch)  # also writes general.architecture
    arch = cfg.arch
    w.add_name(str(model.info.get("name") or "scratchlm"))
    w.add_file_type(0 if dtype == "f32" else 1)  # llama_ftype: ALL_F32 / MOSTLY_F16
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
    for name, arr in gguf_tensors(cfg, _host_weights(model)).items():
        if arr.ndim == 2:
            arr = arr.astype(np_dtype)  # matrices in the chosen dtype; vectors stay float32 (llama.cpp's convention)
        w.add_tensor(name, np.ascontiguousarray(arr))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    _replace(tmp, path)
    return path


# ---- Hugging Face ---------------------------------------------------------------------------------


def hf_state_dict(cfg: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face name -> array, from canonical weights (safetensors_hf.py's key map, inverted)."""
    H, K, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out: dict[str, np.ndarray] = {}
    if cfg.arch == "llama":
        top, layer, prefix = safetensors_hf.LLAMA_TOP, safetensors_hf.LLAMA_LAYER, "model.layers.{}."
    else:
        top, layer, prefix = safetensors_hf.GPT2_TOP, safetensors_hf.GPT2_LAYER, "h.{}."
    for hf_name, (canon, how) in top.items():
        if canon in weights:
            out[hf_name if cfg.arch == "llama" else "transformer." + hf_name] = weights[canon]
    if cfg.arch == "gpt2" and "output.weight" in weights:
        out["lm_head.weight"] = weights["output.weight"]
    for i in range(cfg.n_layers):
        for hf_suffix, (canon, how) in layer.items():
            name = prefix.format(i) + hf_suffix
            if cfg.arch == "gpt2":
                name = "transformer." + name
            c = f"layers.{i}.{canon}"
            if how == "qkv":  # GPT-2's fused c_attn: q, k, v rows side by side, Conv1D [in, out]
                fused = np.concatenate([weights[c.format(x)] for x in "qkv"], axis=0)  # [3*D, D] or [3*D]
                out[name] = fused.T if fused.ndim == 2 else fused  # [3*D, D] -> [D, 3*D]
            elif how == "T":
                out[name] = weights[c].T  # Conv1D stores [in, out]
            elif how == "q":
                out[name] = meta_to_hf(weights[c], H, Hd)  # interleaved -> rotate-half rows
            elif how == "k":
                out[name] = meta_to_hf(weights[c], K, Hd)
            else:
                out[name] = weights[c]
    return out


def hf_config(cfg: ModelConfig, tok, dtype: str) -> dict:
    """config.json for LlamaForCausalLM / GPT2LMHeadModel (the form most hub checkpoints have)."""
    torch_dtype = {"f32": "float32", "f16": "float16"}[dtype]
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
    return out


def export(source, fmt: str, out, dtype: str = "f32") -> Path:
    """Load `source` (a run directory or any model scratchlm reads) and export it: fmt "gguf" or "hf"."""
    if fmt not in ("gguf", "hf"):
        raise UnsupportedError(f"export format {fmt!r} is not supported (choose gguf or hf)")
    _check_dtype(dtype)
    import scratchlm

    model = scratchlm.load(source)
    return export_gguf(model, out, dtype) if fmt == "gguf" else export_hf(model, out, dtype)
