"""Byte-level BPE tokenization, written here: `load_tokenizer(path)` -> `Tokenizer`.

    >>> from scratchlm.tokenizer import load_tokenizer      # doctest: +SKIP
    >>> tok = load_tokenizer("Llama-3.2-1B/original/tokenizer.model")
    >>> tok.encode("Hello world")
    [9906, 1917]
"""

from .bpe import Tokenizer, bpe_merge
from .pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, PreTokenizer
from .readers import (
    load_tokenizer,
    read_tiktoken_ranks,
    tokenizer_from_gguf_metadata,
    tokenizer_from_hf_json,
    tokenizer_from_tiktoken_file,
)

__all__ = [
    "Tokenizer",
    "PreTokenizer",
    "bpe_merge",
    "load_tokenizer",
    "read_tiktoken_ranks",
    "tokenizer_from_gguf_metadata",
    "tokenizer_from_hf_json",
    "tokenizer_from_tiktoken_file",
    "GPT2_PATTERN",
    "LLAMA3_PATTERN",
]
