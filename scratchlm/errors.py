"""Errors a user can act on.

Every error raised for bad input is a ``ValueError`` or ``OSError`` subclass with a
one-line message; the CLI prints that line and exits non-zero, without a traceback.
"""


class ScratchLMError(Exception):
    """Base class of scratchlm's own errors (never raised directly)."""


class FormatError(ScratchLMError, ValueError):
    """A model or tokenizer file is malformed: truncated, wrong magic, absurd sizes, bad offsets..."""


class UnsupportedError(ScratchLMError, ValueError):
    """A well-formed file uses a feature scratchlm does not implement (a quant type, an architecture)."""


class TokenizerError(ScratchLMError, ValueError):
    """Bad tokenizer input: an out-of-range id, a disallowed special token, a missing tokenizer."""


class PromptError(ScratchLMError, ValueError):
    """A prompt that cannot be run: empty with no BOS token, or longer than the context."""


class ModelNotFoundError(ScratchLMError, FileNotFoundError):
    """A model path (or the default model package) does not exist."""


class DraftModelError(ScratchLMError, ValueError):
    """A draft model for speculative decoding that cannot draft for the target: another vocabulary."""
