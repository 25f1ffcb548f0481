"""scratchlm: a language-model engine written from scratch in Python and NumPy."""

__version__ = "0.1.0"
version = __version__
