"""Byte-level BPE: text -> pieces (regex) -> bytes -> merged tokens, and back.

Encoding one piece starts from its UTF-8 bytes, one symbol per byte, and repeatedly merges the
adjacent pair with the lowest rank (leftmost first on ties) until no pair can merge. Two ways of
ranking a pair exist in the files people have, and both are kept exactly:

- tiktoken files (Llama 3's tokenizer.model): a pair (a, b) may merge when the bytes a+b are a token,
  and its rank is that token's rank (= its id). A piece that is itself a token is taken whole.
- merge lists (tokenizer.json, GGUF): only the listed pairs merge, ranked by their line in the list.

Most text repeats the same pieces ("the", " self", "    "), so each distinct piece is merged once and
remembered in a bounded dict; encoding a large text is then one regex `findall` plus dict lookups.
Long texts go to `compiled.py` instead: the same steps compiled with numba, with no Python object per
piece (3-4x faster than this path, and faster than tiktoken); this module stays the reference.
"""

from __future__ import annotations

import heapq
import sys
from itertools import chain
from typing import Iterable

import regex

from ..errors import FormatError, TokenizerError
from .pretokenize import PreTokenizer

# Pieces up to this many bytes are merged with the simple scan (fewer Python ops for short pieces);
# longer ones use the heap, which stays O(n log n) on a megabyte of one repeated character.
_SHORT_PIECE = 48
# The per-piece cache is cleared when it grows past this many entries (a bound on memory),
# and pieces longer than _CACHE_MAX_CHARS are never cached (they rarely repeat).
_CACHE_MAX_ENTRIES = 500_000
_CACHE_MAX_CHARS = 128
# Long texts are encoded by the compiled kernel (compiled.py), ~3x faster than the Python path here, but
# with fixed costs: a tokenizer's tables (~35 ms for Llama 3) and, once per process, numba itself (~0.2 s
# to import after NumPy, ~0.3 s for its first compiled call, a few ms per cached function to load).
# Measured on the 2-core box (5 MB, Llama 3): the Python path takes ~0.21 s per million characters cold,
# the kernel ~0.06 s. With numba already in the process only the tables need paying for (from ~256 k
# characters); without it, a first text of 1 M characters costs ~0.4 s more, once, and every later one
# gains ~0.15 s per million (a 5 MB first text already gains). Prompts stay on the Python path: a
# model's load-to-first-token never waits for numba.
COMPILED_MIN_CHARS = 1 << 18  # numba already imported (by us or by the model's kernels)
COMPILED_FIRST_MIN_CHARS = 1 << 20  # numba not imported yet
COMPILED_WARM_MIN_CHARS = 1 << 12  # this tokenizer's tables built: below this the ~20 us call set-up dominates


def bpe_merge(parts: list[bytes], ranks: dict, pair_keys: bool = False) -> list[bytes]:
    """Merge adjacent byte strings, lowest rank first (leftmost on ties), until none can merge.

    `ranks` maps a pair to its rank: keyed by the concatenation a+b (tiktoken: a pair merges when
    the joined bytes are a token), or by the tuple (a, b) when `pair_keys` (a merge list).

    >>> bpe_merge([b"a", b"b", b"c"], {b"ab": 0, b"bc": 1, b"abc": 2})
    [b'abc']
    """
    if len(parts) <= _SHORT_PIECE:
        return _merge_scan(parts, ranks, pair_keys)
    return _merge_heap(parts, ranks, pair_keys)


_BYTE_TOKENS = [bytes([b]) for b in range(256)]
_NO_MERGE = 1 << 62  # rank of a pair that cannot merge: above every real rank


def _merge_scan(parts: list[bytes], ranks: dict, pair_keys: bool) -> list[bytes]:
    # pair_rank[i] is the rank of (parts[i], parts[i+1]); min() and index() (C loops) find the
    # lowest, leftmost pair; after a merge only the two neighbouring ranks change.
    get = ranks.get
    parts = list(parts)
    if pair_keys:
        pair_rank = [get(pair, _NO_MERGE) for pair in zip(parts, parts[1:])]
    else:
        pair_rank = [get(a + b, _NO_MERGE) for a, b in zip(parts, parts[1:])]
    while pair_rank:
        best = min(pair_rank)
        if best == _NO_MERGE:
            break
        i = pair_rank.index(best)
        parts[i] = m = parts[i] + parts[i + 1]
        del parts[i + 1]
        del pair_rank[i]
        if i < len(pair_rank):
            pair_rank[i] = get((m, parts[i + 1]), _NO_MERGE) if pair_keys else get(m + parts[i + 1], _NO_MERGE)
        if i > 0:
            pair_rank[i - 1] = get((parts[i - 1], m), _NO_MERGE) if pair_keys else get(parts[i - 1] + m, _NO_MERGE)
    return parts


def _merge_heap(parts: list[bytes], ranks: dict, pair_keys: bool) -> list[bytes]:
    # Symbols live in a linked list over their start positions (nxt/prv; an absorbed symbol becomes
    # None). Candidate pairs sit in a heap of plain ints rank*n + left position, so popping gives
    # "lowest rank, leftmost first". A popped entry may be stale; it is used only if the pair now at
    # that position still has that rank, which makes it equivalent to the live entry with that key.
    get = ranks.get
    n = len(parts)
    sym: list[bytes | None] = list(parts)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        r = get((sym[i], sym[i + 1])) if pair_keys else get(sym[i] + sym[i + 1])
        if r is not None:
            heap.append(r * n + i)
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    while heap:
        r, i = divmod(pop(heap), n)
        a = sym[i]
        j = nxt[i]
        if a is None or j == -1:
            continue
        b = sym[j]
        if (get((a, b)) if pair_keys else get(a + b)) != r:
            continue
        sym[i] = m = a + b
        sym[j] = None
        k = nxt[j]
        nxt[i] = k
        if k != -1:
            prv[k] = i
            r = get((m, sym[k])) if pair_keys else get(m + sym[k])
            if r is not None:
                push(heap, r * n + i)
        p = prv[i]
        if p != -1:
            r = get((sym[p], m)) if pair_keys else get(sym[p] + m)
            if r is not None:
                push(heap, r * n + p)
    return [s for s in sym if s is not None]


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list of tiktoken-style ranks (a pair merges when a+b is a token, ranked by its id).

    Each token of two or more bytes, in rank order, gets the pair that BPE over its own bytes, using
    only lower-ranked tokens, ends with: the last merge that builds it. A token no such BPE reaches
    (it can only be taken whole) gets no merge.

    >>> merges_from_ranks({b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4})
    [(b'a', b'b'), (b'ab', b'c')]
    """
    out = []
    get = ranks.get
    for token, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_r = -1, r
            for i in range(len(parts) - 1):
                pr = get(parts[i] + parts[i + 1])
                if pr is not None and pr < best_r:
                    best, best_r = i, pr
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2 and parts[0] in ranks and parts[1] in ranks:
            out.append((parts[0], parts[1]))
    return out


def _first_index(items: list) -> dict:
    """item -> the index of its first occurrence. Built in C from the end backwards, so the first
    occurrence is written last (~3 ms for 128k items; a Python loop with a membership test took ~25 ms)."""
    return dict(zip(reversed(items), range(len(items) - 1, -1, -1)))


def fix_surrogates(text: str) -> str:
    """Python strings may hold lone UTF-16 surrogates, which have no UTF-8 form.

    Like tiktoken: join valid surrogate pairs into their character and replace lone ones by U+FFFD.
    """
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class Tokenizer:
    """A byte-level BPE tokenizer: encode text to ids, decode ids to text.

    Built by the readers in `scratchlm.tokenizer.readers` (`load_tokenizer`); the constructor takes
    the vocabulary already in bytes:

    - `tokens[id]`: the bytes of every ordinary (mergeable) token; None for an id that is only special.
    - `special_tokens`: text -> id of control tokens (BOS, EOS, chat markers), never produced by BPE.
    - `merges`: the ordered merge list as pairs of token bytes, or None for tiktoken-style ranking
      (a pair merges when its concatenation is a token, ranked by that token's id).
    - `ignore_merges`: take a piece whole when it is itself a token (tiktoken always does this).
    """

    def __init__(
        self,
        *,
        tokens: list[bytes | None],
        special_tokens: dict[str, int],
        pre_tokenizer: PreTokenizer,
        merges: list[tuple[bytes, bytes]] | None = None,
        ignore_merges: bool = False,
        bos_id: int | None = None,
        eos_ids: Iterable[int] = (),
        eos_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        name: str = "bpe",
    ):
        self.name = name
        self.pre_tokenizer = pre_tokenizer
        self.special_tokens = dict(special_tokens)
        n = len(tokens)
        for text, i in self.special_tokens.items():
            if not isinstance(i, int) or i < 0:
                raise FormatError(f"special token {text!r} has a bad id {i!r}")
            n = max(n, i + 1)
        self.vocab_size = n
        # id -> bytes for decoding; special ids decode to their text (like tiktoken and HF).
        self._decoder: list[bytes | None] = list(tokens) + [None] * (n - len(tokens))
        self._tokens = list(tokens)  # the ordinary tokens by id, for the compiled encoder's tables
        self._encoder: dict[bytes, int] = _first_index(self._tokens)
        self._encoder.pop(None, None)
        for text, i in self.special_tokens.items():
            if self._decoder[i] is None:
                self._decoder[i] = text.encode("utf-8")
        self._special_ids = frozenset(self.special_tokens.values())
        self._missing_bytes = frozenset(bytes([b]) for b in range(256) if bytes([b]) not in self._encoder)

        if merges is None:
            self._ranks: dict = self._encoder  # tiktoken: the rank of a pair is the id of a+b
            self._pair_keys = False
            self.ignore_merges = True
        else:
            self._ranks = _first_index(merges)  # a repeated pair keeps its first (best) rank
            self._pair_keys = True
            self.ignore_merges = bool(ignore_merges)
        self.merges_mode = "tiktoken" if merges is None else "merges"

        self.bos_id = bos_id
        self.eos_ids: list[int] = []
        for i in ([eos_id] if eos_id is not None else []) + list(eos_ids):
            if i is not None and 0 <= i < n and i not in self.eos_ids:
                self.eos_ids.append(int(i))
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.add_bos = bool(add_bos) and bos_id is not None
        self.chat_template = chat_template
        self.bos_token = self._text_of(bos_id)
        self.eos_token = self._text_of(self.eos_id)

        # Pieces already encoded on the Python path. (It used to be seeded with every whole token: 50 ms
        # of the Llama 3 load to save ~0.3 us per distinct piece; `_encode_bytes` looks those up anyway.)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._special_regex_cache: dict[frozenset, "regex.Pattern"] = {}
        # The compiled encoder: None until a long text needs it, False where it cannot be used.
        # `compiled_min_chars` is the length from which it is used (None: never; tests set 0); it is
        # COMPILED_FIRST_MIN_CHARS while numba is not imported, unless set lower than the default.
        self._compiled = None
        self.compiled_min_chars: int | None = COMPILED_MIN_CHARS

    # ---- encoding -------------------------------------------------------------------------

    def encode(self, text: str, *, allowed_special=(), add_bos: bool = False) -> list[int]:
        """Token ids of `text`.

        Special-token text ("<|eot_id|>") is ordinary text unless listed in `allowed_special`
        (a set of strings, or "all"), so user input cannot inject control tokens by accident.
        `add_bos=True` puts the BOS id first (when the vocabulary has one).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        text = fix_surrogates(text)
        out: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        allowed = self._allowed_set(allowed_special)
        if not allowed:
            out.extend(self._encode_ordinary(text))
            return out
        rx = self._special_regex(allowed)
        pos = 0
        for m in rx.finditer(text):
            if m.start() > pos:
                out.extend(self._encode_ordinary(text[pos:m.start()]))
            out.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            out.extend(self._encode_ordinary(text[pos:]))
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` with no special-token handling at all."""
        return self._encode_ordinary(fix_surrogates(text))

    def _encode_ordinary(self, text: str) -> list[int]:
        if self._use_compiled(len(text)):
            return self._compiled.encode(text, self._encode_bytes)
        return self._encode_python(text)

    def _use_compiled(self, n: int) -> bool:
        """Whether a text of `n` characters goes to the compiled kernel (see COMPILED_MIN_CHARS)."""
        limit = self.compiled_min_chars
        if limit is None or self._compiled is False:
            return False
        if self._compiled is not None:
            return n >= min(limit, COMPILED_WARM_MIN_CHARS)
        if "numba" not in sys.modules and limit >= COMPILED_MIN_CHARS:
            limit = max(limit, COMPILED_FIRST_MIN_CHARS)
        if n < limit:
            return False
        self._compiled = self._build_compiled()
        return self._compiled is not False

    def _build_compiled(self):
        """The compiled encoder of this vocabulary, or False: an unknown regex, an odd vocabulary, no numba."""
        kind = self.pre_tokenizer.kernel_kind
        if kind is None:
            return False
        try:
            from . import compiled  # imports numba: only here, never on the load path
        except ImportError:
            return False
        pair_ranks = self._ranks if self._pair_keys else None
        if self._missing_bytes and not self._pair_keys:
            return False  # tiktoken ranks with a dropped byte would join bytes that are not adjacent
        enc = compiled.compiled_encoder(kind, self._tokens, self._encoder, pair_ranks, self.ignore_merges)
        return False if enc is None else enc

    def _encode_python(self, text: str) -> list[int]:
        """The reference encoder: `regex` split, a dict of pieces, `bpe_merge` for each new piece."""
        pieces = self.pre_tokenizer.split(text)
        cache = self._cache
        try:
            # The common case, all C-level: every piece seen before (or a whole token).
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:
            pass
        # Merge each distinct new piece once.
        new = {p: self._encode_piece(p) for p in set(pieces).difference(cache)}
        overflow = len(cache) + len(new) > _CACHE_MAX_ENTRIES
        uncached = any(len(p) > _CACHE_MAX_CHARS for p in new)
        lookup = {**cache, **new} if overflow or uncached else cache
        if overflow:
            cache.clear()
        cache.update((p, ids) for p, ids in new.items() if len(p) <= _CACHE_MAX_CHARS)
        return list(chain.from_iterable(map(lookup.__getitem__, pieces)))

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        return self._encode_bytes(piece.encode("utf-8"))

    def _encode_bytes(self, data: bytes) -> tuple[int, ...]:
        """The ids of one piece's UTF-8 bytes (the compiled encoder calls this for long pieces)."""
        enc = self._encoder
        if self.ignore_merges:
            i = enc.get(data)
            if i is not None:
                return (i,)
        parts = list(map(_BYTE_TOKENS.__getitem__, data))  # one bytes object per byte
        if self._missing_bytes and not self._missing_bytes.isdisjoint(parts):
            # Like Hugging Face's BPE with no unk token: a byte with no token is dropped before merging.
            parts = [p for p in parts if p not in self._missing_bytes]
        parts = bpe_merge(parts, self._ranks, self._pair_keys)
        try:
            return tuple(enc[p] for p in parts)
        except KeyError:
            missing = next(p for p in parts if p not in enc)
            raise TokenizerError(
                f"the vocabulary has no token for bytes {missing!r} (in piece {data[:40]!r})"
            ) from None

    def _allowed_set(self, allowed_special) -> frozenset:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special must be a set of special-token strings or 'all', got {allowed_special!r}")
        allowed = frozenset(allowed_special)
        unknown = allowed - self.special_tokens.keys()
        if unknown:
            raise TokenizerError(f"not special tokens of this vocabulary: {sorted(unknown)[:5]}")
        return allowed

    def _special_regex(self, allowed: frozenset) -> "regex.Pattern":
        rx = self._special_regex_cache.get(allowed)
        if rx is None:
            # Longest first, so "<|end|>" never shadows "<|endoftext|>" at the same position.
            alts = sorted(allowed, key=lambda s: (-len(s), s))
            rx = regex.compile("|".join(regex.escape(s) for s in alts))
            self._special_regex_cache[allowed] = rx
        return rx

    # ---- decoding -------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The raw bytes of `ids` joined (special ids give their text)."""
        ids = list(ids)
        dec = self._decoder
        try:
            if ids and (min(ids) < 0 or max(ids) >= len(dec)):
                raise IndexError
            return b"".join([dec[i] for i in ids])
        except (IndexError, TypeError):
            for i in ids:
                self._check_id(i)
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (as tiktoken's errors="replace")."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, id: int) -> bytes:
        """The bytes of one token."""
        self._check_id(id)
        return self._decoder[id]

    def id_to_piece(self, id: int) -> str:
        """A token as readable text for display: its UTF-8 text, with invalid bytes shown as \\xNN."""
        return self.token_bytes(id).decode("utf-8", errors="backslashreplace")

    def is_special(self, id: int) -> bool:
        return id in self._special_ids

    # ---- the vocabulary, for saving and export ------------------------------------------------

    def ordinary_tokens(self) -> list[bytes | None]:
        """bytes of every ordinary (mergeable) token by id; None for special ids and gaps."""
        return [None if i in self._special_ids else b for i, b in enumerate(self._decoder)]

    def merge_list(self) -> list[tuple[bytes, bytes]]:
        """The merges as pairs of token bytes, by rank. For tiktoken-style ranks they are derived
        (see `merges_from_ranks`); with ignore_merges the two forms encode alike."""
        if not self._pair_keys:
            return merges_from_ranks(self._encoder)
        return sorted(self._ranks, key=self._ranks.__getitem__)

    def save(self, path) -> None:
        """Write a Hugging Face tokenizer.json (read by `scratchlm.load_tokenizer`, HF tokenizers, transformers)."""
        import json

        from .readers import tokenizer_to_hf_json  # readers imports this module

        with open(path, "w", encoding="utf-8") as f:
            json.dump(tokenizer_to_hf_json(self), f, ensure_ascii=False, indent=1)
            f.write("\n")

    def _check_id(self, i) -> None:
        try:
            ok = 0 <= i < self.vocab_size and self._decoder[i] is not None
        except TypeError:
            raise TokenizerError(f"token id {i!r} is not an integer") from None
        if not ok:
            raise TokenizerError(f"token id {i} is out of range [0, {self.vocab_size}) for tokenizer {self.name!r}")

    def _text_of(self, i: int | None) -> str | None:
        if i is None or not (0 <= i < self.vocab_size) or self._decoder[i] is None:
            return None
        return self._decoder[i].decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, {len(self.special_tokens)} special, "
                f"bos={self.bos_id}, eos={self.eos_ids}, {self.merges_mode})")
