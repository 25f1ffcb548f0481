"""Pre-tokenization: cut text into pieces with regexes before BPE runs on each piece.

BPE never merges across piece boundaries, so these regexes decide a lot: whether " hello" keeps
its leading space, whether "2024" may become one token, how runs of spaces are split.

A pre-tokenizer here is a list of regexes applied one after another, the way llama.cpp
(`unicode_regex_split`) and Hugging Face (`Sequence` of `Split`s) do it: each regex cuts every
fragment left by the previous one into its matches *and* the gaps between them (nothing is lost).
With a single regex that covers every character (all the ones below do) this is just `findall`.
"""

from __future__ import annotations

import re

import regex

from ..errors import UnsupportedError

# Llama 3 (and tiktoken's cl100k_base): letters may take one leading non-letter (" hello", "_init"),
# numbers are cut into groups of up to 3 digits, contractions are case-insensitive.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GPT-2 (and Hugging Face's ByteLevel(use_regex=true)): only a space may lead a word or number;
# "\s+(?!\S)" leaves the last space of a run to start the next word.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Every digit on its own (Hugging Face's Digits(individual_digits=true), llama.cpp's first "smollm" step).
DIGIT_PATTERN = r"\p{N}"

# Digits one by one, then GPT-2, as one regex: a digit is always a piece of its own, and "the end of
# a fragment" for the whitespace lookahead now also means "a digit comes next". Tested equal to
# applying the two regexes in sequence.
SMOLLM_FUSED = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
FUSED: dict[tuple[str, ...], str] = {(DIGIT_PATTERN, GPT2_PATTERN): SMOLLM_FUSED}

# Speed: the stdlib `re` runs these patterns about twice as fast as `regex` when the classes are
# small. On ASCII-only text \p{L} is exactly [A-Za-z], \p{N} is [0-9] and \s (Unicode White_Space)
# is [\t\n\x0b\x0c\r ], so these ASCII forms give the same pieces as the patterns above there.
_WS = r"\t\n\x0b\x0c\r "
LLAMA3_ASCII = (
    r"'(?:[sS]|[tT]|[rR][eE]|[vV][eE]|[mM]|[lL][lL]|[dD])|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]{1,3}"
    rf"| ?[^{_WS}A-Za-z0-9]+[\r\n]*|[{_WS}]*[\r\n]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
GPT2_ASCII = (
    rf"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"
)
SMOLLM_ASCII = (
    rf"[0-9]|'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}0-9])|[{_WS}]+"
)
# Mixed text is cut into blocks at places no piece can straddle, so ASCII blocks take the fast path.
# Llama 3: right after "\n" when a non-space follows (the only pieces holding "\n" are whitespace
# runs, which end there, and punctuation+newlines, which end there too; none looks further ahead).
# GPT-2: between a non-space and a space (no piece holds both, and none looks ahead over that cut).
FAST_PATHS: dict[str, tuple[str, str]] = {
    LLAMA3_PATTERN: (LLAMA3_ASCII, r"\n(?=\S)"),
    GPT2_PATTERN: (GPT2_ASCII, r"\S(?=\s)"),
    SMOLLM_FUSED: (SMOLLM_ASCII, r"\S(?=\s)"),
}

# The patterns compiled.py has as code (`_llama3_end`, `_gpt2_end`), by the kind number it uses.
KERNEL_LLAMA3, KERNEL_GPT2, KERNEL_SMOLLM = 0, 1, 2
KERNEL_KINDS: dict[str, int] = {LLAMA3_PATTERN: KERNEL_LLAMA3, GPT2_PATTERN: KERNEL_GPT2, SMOLLM_FUSED: KERNEL_SMOLLM}

# Regex lists per GGUF `tokenizer.ggml.pre` name, as llama.cpp applies them (src/llama-vocab.cpp).
GGUF_PRE_TOKENIZERS: dict[str, list[str]] = {
    "llama3": [LLAMA3_PATTERN],
    "llama-bpe": [LLAMA3_PATTERN],
    "llama-v3": [LLAMA3_PATTERN],
    "dbrx": [LLAMA3_PATTERN],
    "smaug-bpe": [LLAMA3_PATTERN],
    "gpt-2": [GPT2_PATTERN],
    "gpt2": [GPT2_PATTERN],
    "mpt": [GPT2_PATTERN],
    "olmo": [GPT2_PATTERN],
    "jais": [GPT2_PATTERN],
    # StarCoder-family vocabularies (SmolLM/SmolLM2 included) were trained with digits split one by one.
    "smollm": [DIGIT_PATTERN, GPT2_PATTERN],
    "starcoder": [DIGIT_PATTERN, GPT2_PATTERN],
    "refact": [DIGIT_PATTERN, GPT2_PATTERN],
    "command-r": [DIGIT_PATTERN, GPT2_PATTERN],
    "codeshell": [DIGIT_PATTERN, GPT2_PATTERN],
    "exaone": [DIGIT_PATTERN, GPT2_PATTERN],
    "minerva-7b": [DIGIT_PATTERN, GPT2_PATTERN],
    # llama.cpp's fallback for a missing or unknown name: punctuation runs first, then GPT-2, then digits.
    "default": [r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"],
}


class PreTokenizer:
    """A compiled list of regexes applied in sequence; `split(text)` returns the pieces in order.

    `prefix_space[i]` mirrors Hugging Face's ByteLevel(add_prefix_space=true): before regex i runs,
    a fragment that does not start with " " gets one prepended.
    """

    def __init__(self, patterns: list[str], prefix_space: list[bool] | None = None, name: str = ""):
        if not patterns:
            raise UnsupportedError(f"pre-tokenizer {name!r} has no regex")
        self.patterns = list(patterns)
        self.name = name
        try:
            self._compiled = [regex.compile(p) for p in self.patterns]
        except regex.error as e:
            raise UnsupportedError(f"pre-tokenizer {name!r}: cannot compile regex: {e}") from None
        self.prefix_space = list(prefix_space) if prefix_space else [False] * len(self.patterns)
        # The common case (one regex, or a sequence known to equal one; no prefix space) is a single
        # C-level findall: the hot path.
        single = None
        if not any(self.prefix_space):
            single = self.patterns[0] if len(self.patterns) == 1 else FUSED.get(tuple(self.patterns))
        self.findall = regex.compile(single).findall if single else None
        fast = FAST_PATHS.get(single) if single else None
        self._ascii_findall = re.compile(fast[0]).findall if fast else None
        self._safe_cut = regex.compile(fast[1]) if fast else None
        self.block_chars = 1 << 16  # size of the blocks mixed text is cut into (a knob for tests)
        self.kernel_kind = KERNEL_KINDS.get(single) if single else None

    def split(self, text: str) -> list[str]:
        if self._ascii_findall is not None:
            return self._split_fast(text)
        if self.findall is not None:
            return self.findall(text)
        return self.split_sequential(text)

    def split_sequential(self, text: str) -> list[str]:
        """The reference semantics: each regex in turn cuts every fragment (slow, always right)."""
        fragments = [text]
        for rx, prefix in zip(self._compiled, self.prefix_space):
            out: list[str] = []
            for frag in fragments:
                if prefix and not frag.startswith(" "):
                    frag = " " + frag
                out.extend(split_keep_gaps(rx, frag))
            fragments = out
        return fragments

    def _split_fast(self, text: str) -> list[str]:
        if text.isascii():
            return self._ascii_findall(text)
        if len(text) <= self.block_chars:
            return self.findall(text)
        out: list[str] = []
        pos, n = 0, len(text)
        while pos < n:
            m = self._safe_cut.search(text, pos + self.block_chars) if pos + self.block_chars < n else None
            end = m.end() if m else n
            block = text[pos:end]
            out += self._ascii_findall(block) if block.isascii() else self.findall(block)
            pos = end
        return out

    def __repr__(self) -> str:
        return f"PreTokenizer({self.name!r}, {len(self.patterns)} regex)"


def split_keep_gaps(rx: "regex.Pattern", text: str) -> list[str]:
    """Matches of `rx` in `text` and the non-empty gaps between them, in order (HF's "Isolated")."""
    out = []
    pos = 0
    for m in rx.finditer(text):
        start, end = m.span()
        if start == end:  # an empty match cuts nothing
            continue
        if start > pos:
            out.append(text[pos:start])
        out.append(text[start:end])
        pos = end
    if pos < len(text):
        out.append(text[pos:])
    return out


def gguf_pre_tokenizer(pre: str | None) -> PreTokenizer:
    """The pre-tokenizer llama.cpp uses for a GGUF `tokenizer.ggml.pre` value."""
    key = (pre or "default").lower()
    if key not in GGUF_PRE_TOKENIZERS:
        known = ", ".join(sorted(GGUF_PRE_TOKENIZERS))
        raise UnsupportedError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {known})")
    return PreTokenizer(GGUF_PRE_TOKENIZERS[key], name=key)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    Byte-level vocabularies (GPT-2, tokenizer.json, GGUF "gpt2") store tokens as text in which each
    byte is one character: printable Latin-1 bytes stand for themselves, the other 68 bytes (controls,
    space, 0x7F-0xA0, 0xAD) are moved to U+0100 onwards in byte order, so " " is "Ġ" and "\\n" is "Ċ".
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def unicode_to_bytes() -> dict[str, int]:
    """The inverse of `bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}
