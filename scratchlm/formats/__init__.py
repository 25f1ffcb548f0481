"""Readers for the files people have. Each format maps its own names to the canonical (Meta) ones.

  gguf.py            a .gguf file (llama.cpp's container; quantized blocks dequantized by quant.py)
  safetensors_hf.py  a Hugging Face directory (config.json + *.safetensors + tokenizer.json)
  meta.py            a Meta directory (params.json + consolidated.NN.pth + tokenizer.model)
  permute.py         the one q/k row permutation between Hugging Face and Meta layouts
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FormatError, ModelNotFoundError, TokenizerError


def detect_format(path: Path) -> str:
    """'gguf', 'hf', 'meta' or 'run' (a scratchlm training run) for a model path, or a one-line error saying what was expected."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or directory")
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise FormatError(f"{path}: not a GGUF file (expected a .gguf file, or a Hugging Face or Meta model directory)")
    if (path / "scratchlm-run.json").is_file():  # a training run (training/checkpoint.py); it has a config.json too
        return "run"
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file():
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise FormatError(f"{path}: not a model directory (no config.json, params.json or single .gguf file)")


DTYPES = (None, "f32")


def load_checkpoint(path, progress: bool = False, dtype: str | None = None):
    """Read any supported checkpoint: returns (ModelConfig, canonical weights, tokenizer or None, info).

    dtype None keeps matrices in their stored type (quant.QuantizedMatrix: ggml blocks, fp16, bf16);
    "f32" widens every weight to a float32 array (the path training and exact references use)."""
    from ..errors import UnsupportedError

    if dtype not in DTYPES:
        raise UnsupportedError(f"dtype {dtype!r} is not supported (choose 'f32', or None for the stored types)")
    from ..tokenizer import load_tokenizer

    path = Path(path)
    fmt = detect_format(path)
    tokenizer = None
    if fmt == "run":
        from ..training.checkpoint import load_run
        cfg, weights, tokenizer, info = load_run(path, progress=progress)
        return cfg, weights, tokenizer, dict(info, source=str(path), format=fmt)
    if fmt == "gguf":
        from .gguf import load_gguf
        if path.is_dir():
            path = sorted(path.glob("*.gguf"))[0]
        cfg, weights, metadata = load_gguf(path, progress=progress, dtype=dtype)
        info = {"eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
                "name": metadata.get("general.name"),
                "file_type": metadata.get("general.file_type")}
        if "tokenizer.ggml.model" in metadata:
            from ..tokenizer import tokenizer_from_gguf_metadata
            tokenizer = tokenizer_from_gguf_metadata(metadata, str(path))
        else:
            info["tokenizer_error"] = f"{path} holds no tokenizer (no tokenizer.ggml.* keys)"
    elif fmt == "hf":
        from .safetensors_hf import load_hf_dir
        cfg, weights, info = load_hf_dir(path, progress=progress, dtype=dtype)
        if (path / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(path / "tokenizer.json")
        else:
            info["tokenizer_error"] = f"{path} has no tokenizer.json"
    else:
        from ..chat import LLAMA3_TEMPLATE
        from .meta import load_meta_dir
        cfg, weights, info = load_meta_dir(path, progress=progress, dtype=dtype)
        if not (path / "tokenizer.model").is_file():
            raise TokenizerError(f"{path} has no tokenizer.model (a Meta directory needs one)")
        tokenizer = load_tokenizer(path / "tokenizer.model")
        if not tokenizer.chat_template:  # Meta ships no template: use Llama 3's header format
            tokenizer.chat_template = LLAMA3_TEMPLATE
    info = dict(info, source=str(path), format=fmt)
    return cfg, weights, tokenizer, info
