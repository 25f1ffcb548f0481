"""scratchlm: a language-model engine written from scratch in Python and NumPy.

    >>> import scratchlm
    >>> model = scratchlm.load()                  # the default model, SmolLM2-135M-Instruct (Q4_1 GGUF)
    >>> model.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0)
"""

from __future__ import annotations

import sys

from .config import ModelConfig
from .model import Model
from .perplexity import perplexity  # scratchlm.perplexity is the function; `from scratchlm.perplexity import score` still works

__version__ = "0.1.0"
version = __version__

__all__ = ["load", "load_tokenizer", "perplexity", "Model", "ModelConfig", "version", "__version__"]


def load(path=None, *, adapter=None, progress: bool | None = None, dtype: str | None = None) -> Model:
    """Load a model: a .gguf file, a Hugging Face directory or a Meta directory (None = the default model).

    Weights stay in the type the file stores them in (quantized blocks, fp16, bf16), memory-mapped where
    the file allows, and are multiplied from there (kernels.py); `dtype="f32"` widens every weight to
    float32 at load instead (more memory, and what training from a checkpoint needs).

    `adapter`: a LoRA adapter directory in Hugging Face PEFT format (ours from `scratchlm finetune`, or
    one trained elsewhere with PEFT) to attach; its names and shapes must match the model.
    `progress` shows a progress bar on stderr while the weights load (default: when stderr is a terminal).
    """
    from . import assets
    from .formats import load_checkpoint

    if path is None:
        path = assets.default_model_path()
    if progress is None:
        progress = sys.stderr.isatty()
    cfg, weights, tokenizer, info = load_checkpoint(path, progress=progress, dtype=dtype)
    model = Model(cfg, weights, tokenizer, info=info)
    if adapter is not None:
        from .training.lora import load_adapter
        load_adapter(model, adapter)
    return model


def load_tokenizer(path):
    """Load a tokenizer: tiktoken-format file (Llama 3's tokenizer.model), tokenizer.json, .gguf, or a directory."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)
