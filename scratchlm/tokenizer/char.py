"""A character-level tokenizer: one id per distinct character of a corpus.

It is a byte-level BPE `Tokenizer` whose merges only rebuild characters from their UTF-8 bytes, so it
decodes, streams and exports (tokenizer.json, GGUF) like any other, and encodes with a dict lookup:

- ids 0..n-1: the corpus's characters, sorted by code point;
- then the helper tokens a multi-byte character is built from: its lead byte, its continuation
  bytes and its longer prefixes (e.g. "é" = C3 A9 needs C3 and A9). A pure-ASCII corpus has none;
  the model never sees them in training (they exist so that Hugging Face tokenizers and llama.cpp,
  which merge bytes, can represent the vocabulary);
- then the special tokens (by default "<|endoftext|>", the end-of-text/EOS token).

Merges: for every multi-byte character, (prefix of j bytes, byte j) for j = 1..len-1, shortest first.
A merge joins an unfinished prefix with a continuation byte, and UTF-8 is prefix-free, so two
characters never merge with each other: BPE with these merges gives exactly one token per character.

Encoding a character that is not in the vocabulary raises TokenizerError (BPE would silently drop it).

Saved format (`save(path)`), a small JSON file read back by `scratchlm.load_tokenizer`:

    {"type": "scratchlm-char-tokenizer", "version": 1,
     "chars": ["\\n", " ", "!", ...],                # the characters, in id order (ids 0..n-1)
     "special_tokens": {"<|endoftext|>": 98},        # text -> id
     "bos_token": null, "eos_token": "<|endoftext|>", "add_bos": false, "chat_template": null}

The helper tokens are not stored: they follow from "chars" by the rule above.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

from ..errors import FormatError, TokenizerError
from .bpe import Tokenizer
from .pretokenize import GPT2_PATTERN, PreTokenizer

CHAR_FORMAT = "scratchlm-char-tokenizer"
DEFAULT_SPECIALS = ("<|endoftext|>",)
_MAX_CHARS = 1_200_000  # more than every Unicode code point

def end_ids(specials: dict[str, int]) -> list[int]:
    """Ids of the special tokens that end a document or a turn (the file readers' list, in its order)."""
    from .readers import END_TOKEN_TEXTS  # readers imports this module: import at call time

    return [specials[t] for t in END_TOKEN_TEXTS if t in specials]


def char_vocabulary(chars: list[str]) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """(tokens, merges) of the byte-level BPE form of a character vocabulary (see the module doc)."""
    tokens = [c.encode("utf-8") for c in chars]
    known = set(tokens)
    helpers: set[bytes] = set()
    merges: set[tuple[bytes, bytes]] = set()
    for b in tokens:
        for j in range(1, len(b)):
            helpers.add(b[:j])
            helpers.add(b[j:j + 1])
            merges.add((b[:j], b[j:j + 1]))
    tokens += sorted(helpers - known, key=lambda x: (len(x), x))
    return tokens, sorted(merges, key=lambda m: (len(m[0]) + len(m[1]), m))


class CharTokenizer(Tokenizer):
    """One token per character; see the module doc. Build with `train_char_tokenizer(text)`."""

    def __init__(self, chars: Iterable[str], *, special_tokens: Iterable[str] | dict[str, int] = DEFAULT_SPECIALS,
                 bos_token: str | None = None, eos_token: str | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        chars = list(chars)
        for c in chars:
            if not isinstance(c, str) or len(c) != 1 or 0xD800 <= ord(c) <= 0xDFFF:
                raise TokenizerError(f"a character tokenizer needs single characters (no lone surrogates), got {c!r}")
        if len(set(chars)) != len(chars):
            raise TokenizerError("a character tokenizer lists a character twice")
        tokens, merges = char_vocabulary(chars)
        if isinstance(special_tokens, dict):
            specials = dict(special_tokens)
            for text, i in specials.items():
                if not isinstance(i, int) or isinstance(i, bool) or not len(tokens) <= i < _MAX_CHARS:
                    raise TokenizerError(f"special token {text!r} has id {i!r}, expected an id >= {len(tokens)}")
            if len(set(specials.values())) != len(specials):
                raise TokenizerError("two special tokens share an id")
        else:
            specials = {s: len(tokens) + k for k, s in enumerate(dict.fromkeys(special_tokens))}
        for s in specials:
            if not isinstance(s, str) or not s:
                raise TokenizerError(f"special tokens must be non-empty strings, got {s!r}")
        eos = end_ids(specials)
        if eos_token is not None:
            if eos_token not in specials:
                raise TokenizerError(f"eos_token {eos_token!r} is not one of the special tokens")
            eos = [specials[eos_token]] + [i for i in eos if i != specials[eos_token]]
        if bos_token is not None and bos_token not in specials:
            raise TokenizerError(f"bos_token {bos_token!r} is not one of the special tokens")
        super().__init__(
            tokens=tokens, special_tokens=specials, pre_tokenizer=PreTokenizer([GPT2_PATTERN], name="gpt2"),
            merges=merges, ignore_merges=False, bos_id=specials.get(bos_token) if bos_token else None,
            eos_ids=eos, add_bos=add_bos, chat_template=chat_template, name="char")
        self.chars = chars
        self._char_ids = {c: i for i, c in enumerate(chars)}

    def _encode_ordinary(self, text: str) -> list[int]:
        # The same ids BPE with the merges above gives, by one dict lookup per character.
        try:
            return list(map(self._char_ids.__getitem__, text))
        except KeyError as e:
            raise TokenizerError(f"character {e.args[0]!r} is not in the vocabulary of this character "
                                 f"tokenizer ({len(self.chars)} characters)") from None

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        return tuple(self._encode_ordinary(piece))

    def to_dict(self) -> dict:
        return {"type": CHAR_FORMAT, "version": 1, "chars": self.chars, "special_tokens": self.special_tokens,
                "bos_token": self.bos_token if self.bos_id is not None else None,
                "eos_token": self.eos_token if self.eos_id is not None else None,
                "add_bos": self.add_bos, "chat_template": self.chat_template}

    def save(self, path: str | os.PathLike) -> None:
        """Write the small JSON format of the module doc (read back by `scratchlm.load_tokenizer`)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
            f.write("\n")

    def __repr__(self) -> str:
        return (f"CharTokenizer({len(self.chars)} characters, vocab_size={self.vocab_size}, "
                f"{len(self.special_tokens)} special, eos={self.eos_ids})")


def char_tokenizer_from_dict(d: dict, source: str) -> CharTokenizer:
    """A CharTokenizer from the parsed JSON of its saved format, checked field by field."""
    if d.get("type") != CHAR_FORMAT or d.get("version") != 1:
        raise FormatError(f"{source}: not a version-1 {CHAR_FORMAT} file")
    chars, specials = d.get("chars"), d.get("special_tokens", {})
    if not isinstance(chars, list) or not chars or len(chars) > _MAX_CHARS:
        raise FormatError(f"{source}: 'chars' must be a non-empty list of characters")
    if not isinstance(specials, dict):
        raise FormatError(f"{source}: 'special_tokens' must be an object of text -> id")
    for key in ("bos_token", "eos_token", "chat_template"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise FormatError(f"{source}: {key!r} must be a string or null")
    if not isinstance(d.get("add_bos", False), bool):
        raise FormatError(f"{source}: 'add_bos' must be true or false")
    try:
        return CharTokenizer(chars, special_tokens=specials, bos_token=d.get("bos_token"),
                             eos_token=d.get("eos_token"), add_bos=d.get("add_bos", False),
                             chat_template=d.get("chat_template"))
    except TokenizerError as e:
        raise FormatError(f"{source}: {e}") from None
