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


def load(path=None, *, adapter=None, progress: bool | None = None, dtype: str | None = None, device: str = "cpu",
         gpu_layers: int | None = None, stream_layers: bool = False, devices: str | None = None) -> Model:
    """Load a model: a .gguf file, a Hugging Face directory or a Meta directory (None = the default model).

    Weights stay in the type the file stores them in (quantized blocks, fp16, bf16), memory-mapped where
    the file allows, and are multiplied from there (kernels.py); `dtype="f32"` widens every weight to
    float32 at load instead (more memory, and what training from a checkpoint needs).

    `adapter`: a LoRA adapter directory in Hugging Face PEFT format (ours from `scratchlm finetune`, or
    one trained elsewhere with PEFT) to attach; its names and shapes must match the model.
    `progress` shows a progress bar on stderr while the weights load (default: when stderr is a terminal).

    `device`: "cpu" (NumPy, the default), "torch-cpu" (the same model code on torch tensors on the CPU) or
    "cuda" / "cuda:N". On a torch device `dtype` is the compute dtype, "f32", "bf16" or "f16" (default bf16
    on CUDA, f32 on torch-cpu); quantized weights are dequantized tensor by tensor into it on the device.
    `gpu_layers=N` puts blocks 0..N-1 on the torch device and keeps the rest on the host in NumPy;
    `stream_layers=True` keeps every block in host memory and copies each in for its turn; `devices=
    "cuda:0,cuda:1"` splits the blocks across devices (see devices.py).
    """
    from . import assets
    from .formats import load_checkpoint

    if path is None:
        path = assets.default_model_path()
    if progress is None:
        progress = sys.stderr.isatty()
    placed = device != "cpu" or gpu_layers is not None or stream_layers or devices or dtype in ("bf16", "f16")
    if not placed:
        cfg, weights, tokenizer, info = load_checkpoint(path, progress=progress, dtype=dtype)
        model = Model(cfg, weights, tokenizer, info=info)
    else:
        from . import devices as dev
        n = devices.count(",") + 1 if devices else 1  # enough blocks for the check that runs before loading
        dev.make_plan(n, device, dtype, gpu_layers, stream_layers, devices)  # a bad combination fails at once
        cfg, weights, tokenizer, info = load_checkpoint(path, progress=progress, dtype=None)  # stored types: converted below
        plan = dev.make_plan(cfg.n_layers, device, dtype, gpu_layers, stream_layers, devices)
        weights = dev.place_weights(weights, plan, progress=progress)
        model = Model(cfg, weights, tokenizer, info=dict(info, placement=plan.describe()))
        dev.apply_plan(model, plan)
    if adapter is not None:
        from .training.lora import load_adapter
        load_adapter(model, adapter)
    return model


def load_tokenizer(path):
    """Load a tokenizer: tiktoken-format file (Llama 3's tokenizer.model), tokenizer.json, .gguf, or a directory."""
    from .tokenizer import load_tokenizer as _load

    return _load(path)
