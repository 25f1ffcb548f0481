"""The encoder's hot loop compiled with numba: split, look up and merge in one pass over the UTF-8 bytes.

The plain-Python encoder (`bpe.Tokenizer._encode_python`: a `regex` split, a dict of pieces, `bpe_merge`)
is the reference; this module does the same work without making a Python object per piece, the way
tiktoken does it in Rust:

1. `_llama3_end` / `_gpt2_end` find where the piece starting at a byte ends. They are the three
   pre-tokenizer regexes we meet (Llama 3, GPT-2, SmolLM2's digits+GPT-2) written out as the choices
   the regex engine makes, alternative by alternative; each comment quotes the alternative it stands for.
   Character classes (\\p{L}, \\p{N}, \\s) come from a table built with `regex` itself (`char_classes`).
2. A piece that is a whole token (when the vocabulary takes those whole) is one hash lookup.
3. Any other piece is merged by the scan `bpe._merge_scan` does: lowest rank, leftmost on ties.
   Pieces longer than `LONG_PIECE` bytes go back to Python (`bpe._merge_heap`, O(n log n)).

The tests hold every function here to its reference (the `regex` split, `bpe_merge`, tiktoken, HF).
Importing this module imports numba (~0.3 s, and ~0.4 s more for its first compiled call in a process),
so `bpe.py` imports it only for long texts.
"""

from __future__ import annotations

from itertools import repeat, starmap
from operator import add, itemgetter

import numpy as np
import regex
from numba import njit

from .pretokenize import KERNEL_GPT2 as GPT2, KERNEL_LLAMA3 as LLAMA3, KERNEL_SMOLLM as SMOLLM

# Character class bits in the table (the low three bits); the high bits hold a contraction letter.
LETTER, NUMBER, SPACE = 1, 2, 4
# Llama 3's contractions are case-insensitive: a character that matches (?i:x) for one of these letters
# carries 1 + its index here, shifted left by 3 ("ſ" U+017F folds to "s", so "'ſ" is a contraction).
FOLD_LETTERS = "strevmld"
_S, _T, _R, _E, _V, _M, _L, _D = range(1, 9)

# Longer pieces are merged in Python by the heap merge: the scan below is O(n^2) in the piece length.
LONG_PIECE = 256
NO_MERGE = np.int64(1 << 62)

# FNV-1a, 64 bit: simple, and good enough on short byte strings for a half-empty table.
_FNV_OFFSET = np.uint64(14695981039346656037)
_FNV_PRIME = np.uint64(1099511628211)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


# ---- character classes ---------------------------------------------------------------------------

_ascii_table: np.ndarray | None = None
_table: np.ndarray | None = None  # all of Unicode: the BMP filled at once, other planes as texts bring them
_astral_done: set[int] = set()


def _classify_into(table: np.ndarray, chars: str) -> None:
    """Set the class bits of the distinct characters `chars` in `table`, as `regex` sees them.

    Removing the runs of non-members leaves the members, so each class costs one `regex.sub` with few
    matches (~7 ms for the whole BMP; marking every member one by one took ~200 ms).
    """
    for bit, others in ((LETTER, r"\P{L}+"), (NUMBER, r"\P{N}+"), (SPACE, r"\S+")):
        members = regex.sub(others, "", chars)
        table[np.frombuffer(members.encode("utf-32-le"), np.uint32)] |= bit
    for ch in regex.sub(f"(?i:[^{FOLD_LETTERS}])+", "", chars):
        for k, x in enumerate(FOLD_LETTERS):
            if regex.fullmatch(f"(?i:{x})", ch):
                table[ord(ch)] |= (k + 1) << 3


def char_classes(limit: int) -> np.ndarray:
    """A new uint8 class table of the code points below `limit` (the tests compare it with `regex`)."""
    cps = np.arange(limit, dtype=np.uint32)
    cps[0xD800:0xE000] = 0  # surrogates cannot be encoded; they never reach the kernel (fix_surrogates)
    table = np.zeros(limit, np.uint8)
    _classify_into(table, cps.tobytes().decode("utf-32-le"))
    return table


def classes_for(data: np.ndarray, ascii_only: bool) -> np.ndarray:
    """A class table that covers every character of the UTF-8 `data`.

    ASCII text gets a 128-entry table; other text the table of all code points, whose entries past
    the BMP are filled only for the characters texts bring (all 17 planes at once would take ~90 ms).
    """
    global _ascii_table, _table
    if ascii_only:
        if _ascii_table is None:
            _ascii_table = char_classes(128)
        return _ascii_table
    if _table is None:
        table = np.zeros(0x110000, np.uint8)
        table[:0x10000] = char_classes(0x10000)
        _table = table
    if data.max() >= 0xF0:  # a 4-byte UTF-8 sequence: a code point past the BMP
        lead = np.flatnonzero(data >= 0xF0)
        b = [data[lead + i].astype(np.int64) for i in range(4)]
        cps = ((b[0] & 7) << 18) | ((b[1] & 0x3F) << 12) | ((b[2] & 0x3F) << 6) | (b[3] & 0x3F)
        new = set(np.unique(cps).tolist()) - _astral_done
        if new:
            _classify_into(_table, "".join(map(chr, sorted(new))))
            _astral_done.update(new)
    return _table


# ---- UTF-8 and classes inside the kernel -----------------------------------------------------------


@njit(cache=True)
def _char(data, pos):
    """(code point, byte length) of the UTF-8 character at `pos` (the bytes come from str.encode)."""
    b = np.int64(data[pos])
    if b < 0x80:
        return b, 1
    if b < 0xE0:
        return ((b & 0x1F) << 6) | (np.int64(data[pos + 1]) & 0x3F), 2
    if b < 0xF0:
        return ((b & 0x0F) << 12) | ((np.int64(data[pos + 1]) & 0x3F) << 6) | (np.int64(data[pos + 2]) & 0x3F), 3
    return (((b & 0x07) << 18) | ((np.int64(data[pos + 1]) & 0x3F) << 12)
            | ((np.int64(data[pos + 2]) & 0x3F) << 6) | (np.int64(data[pos + 3]) & 0x3F)), 4


@njit(cache=True)
def _class_at(data, pos, n, cls):
    """(class bits, byte length) of the character at `pos`; (0, 0) past the end (callers that would
    read that 0 as "other", [^\\s\\p{L}\\p{N}], check the end first)."""
    if pos >= n:
        return 0, 0
    cp, size = _char(data, pos)
    return np.int64(cls[cp]), size


@njit(cache=True)
def _run_end(data, pos, n, cls, bits):
    """End of the run of characters from `pos` whose class has one of `bits`."""
    while pos < n:
        c, size = _class_at(data, pos, n, cls)
        if c & bits == 0:
            break
        pos += size
    return pos


@njit(cache=True)
def _other_run_end(data, pos, n, cls):
    """End of the run of [^\\s\\p{L}\\p{N}] characters from `pos`."""
    while pos < n:
        c, size = _class_at(data, pos, n, cls)
        if c & 7 != 0:
            break
        pos += size
    return pos


@njit(cache=True)
def _space_run(data, pos, n, cls):
    """(end of the whitespace run from `pos`, start of its last character, end of its last CR/LF or -1)."""
    last = pos
    crlf_end = -1
    while pos < n:
        c, size = _class_at(data, pos, n, cls)
        if c & SPACE == 0:
            break
        if data[pos] == 13 or data[pos] == 10:
            crlf_end = pos + 1
        last = pos
        pos += size
    return pos, last, crlf_end


# ---- the pre-tokenizer regexes as code -------------------------------------------------------------


@njit(cache=True)
def _llama3_end(data, pos, n, cls):
    """End of the piece of LLAMA3_PATTERN that starts at `pos` (the first alternative that matches)."""
    c0, s0 = _class_at(data, pos, n, cls)
    # (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if data[pos] == 39:
        c1, s1 = _class_at(data, pos + 1, n, cls)
        f1 = c1 >> 3
        if f1 == _S or f1 == _T or f1 == _M or f1 == _D:
            return pos + 1 + s1
        if f1 == _R or f1 == _V or f1 == _L:
            c2, s2 = _class_at(data, pos + 1 + s1, n, cls)
            f2 = c2 >> 3
            if (f1 == _L and f2 == _L) or (f1 != _L and f2 == _E):
                return pos + 1 + s1 + s2
    # [^\r\n\p{L}\p{N}]?\p{L}+
    if c0 & LETTER:
        return _run_end(data, pos, n, cls, LETTER)
    if c0 & NUMBER == 0 and data[pos] != 13 and data[pos] != 10:
        c1, _ = _class_at(data, pos + s0, n, cls)
        if c1 & LETTER:
            return _run_end(data, pos + s0, n, cls, LETTER)
    # \p{N}{1,3}
    if c0 & NUMBER:
        end = pos + s0
        for _ in range(2):
            c, size = _class_at(data, end, n, cls)
            if c & NUMBER == 0:
                break
            end += size
        return end
    #  ?[^\s\p{L}\p{N}]+[\r\n]*
    start = pos
    if data[pos] == 32:
        c1, _ = _class_at(data, pos + 1, n, cls)
        if c1 & 7 == 0 and pos + 1 < n:
            start = pos + 1
    c, _ = _class_at(data, start, n, cls)
    if c & 7 == 0:
        end = _other_run_end(data, start, n, cls)
        while end < n and (data[end] == 13 or data[end] == 10):
            end += 1
        return end
    # Whitespace from here on. \s*[\r\n]+ : up to the run's last CR/LF, when it has one.
    end, last, crlf_end = _space_run(data, pos, n, cls)
    if crlf_end >= 0:
        return crlf_end
    # \s+(?!\S) : the run, less its last character when a non-space follows; else \s+ : one character.
    if end == n or last == pos:
        return end
    return last


@njit(cache=True)
def _gpt2_end(data, pos, n, cls, smollm):
    """End of the piece of GPT2_PATTERN (or SMOLLM_FUSED when `smollm`) that starts at `pos`."""
    c0, s0 = _class_at(data, pos, n, cls)
    # SMOLLM_FUSED only: \p{N} (every digit alone)
    if smollm and c0 & NUMBER:
        return pos + s0
    # 's|'t|'re|'ve|'m|'ll|'d (case-sensitive)
    if data[pos] == 39 and pos + 1 < n:
        b1 = data[pos + 1]
        if b1 == 115 or b1 == 116 or b1 == 109 or b1 == 100:  # s t m d
            return pos + 2
        if pos + 2 < n:
            b2 = data[pos + 2]
            if (b1 == 114 and b2 == 101) or (b1 == 118 and b2 == 101) or (b1 == 108 and b2 == 108):  # re ve ll
                return pos + 3
    # " ?\p{L}+", " ?\p{N}+" (GPT-2 only), " ?[^\s\p{L}\p{N}]+": a space may lead each of them.
    start = pos
    c = c0
    if data[pos] == 32 and pos + 1 < n:
        c1, _ = _class_at(data, pos + 1, n, cls)
        if c1 & (LETTER | NUMBER) or c1 & 7 == 0:
            start, c = pos + 1, c1
    if c & LETTER:
        return _run_end(data, start, n, cls, LETTER)
    if c & NUMBER and not smollm:
        return _run_end(data, start, n, cls, NUMBER)
    if c & 7 == 0:
        return _other_run_end(data, start, n, cls)
    if start != pos:  # SMOLLM: " " then a digit: the space is a whitespace piece of its own
        return pos + 1
    # \s+(?!\S) (SMOLLM: \s+(?![^\s\p{N}])), then \s+
    end, last, _ = _space_run(data, pos, n, cls)
    if end == n or last == pos:
        return end
    if smollm:
        c, _ = _class_at(data, end, n, cls)
        if c & NUMBER:
            return end
    return last


@njit(cache=True)
def _piece_end(kind, data, pos, n, cls):
    if kind == LLAMA3:
        return _llama3_end(data, pos, n, cls)
    return _gpt2_end(data, pos, n, cls, kind == SMOLLM)


@njit(cache=True)
def split_ends(kind, data, cls):
    """Byte offsets where each piece of `data` ends: the compiled split, for the tests."""
    n = len(data)
    ends = np.empty(n, np.int64)
    k = 0
    pos = 0
    while pos < n:
        pos = _piece_end(kind, data, pos, n, cls)
        ends[k] = pos
        k += 1
    return ends[:k]


# ---- hash tables -------------------------------------------------------------------------------------
#
# Both byte-keyed tables (the vocabulary, the piece cache) are open addressing with linear probing over
# `slots` (an entry index, -1 = empty); entry k's key is keys[koffs[k]:koffs[k + 1]]. (Tried: keeping each
# key's first 16 bytes in its slot row to save the reads of koffs and keys; 15-20% slower per lookup,
# building the two words cost more than the reads it saved.)


@njit(cache=True)
def _hash_bytes(data, start, end):
    # FNV-1a, 64 bit, with a final shift-xor so the low bits (the slot) depend on every byte.
    h = _FNV_OFFSET
    for i in range(start, end):
        h = (h ^ np.uint64(data[i])) * _FNV_PRIME
    return h ^ (h >> np.uint64(29))


@njit(cache=True)
def _same_bytes(x, xa, xb, y, ya, yb):
    if xb - xa != yb - ya:
        return False
    for i in range(xb - xa):
        if x[xa + i] != y[ya + i]:
            return False
    return True


@njit(cache=True)
def _find(slots, keys, koffs, data, start, end):
    """(entry index of the key data[start:end] or -1, the slot where it is or would go)."""
    mask = np.uint64(len(slots) - 1)
    i = _hash_bytes(data, start, end) & mask
    while True:
        k = slots[i]
        if k < 0 or _same_bytes(keys, koffs[k], koffs[k + 1], data, start, end):
            return k, i
        i = (i + np.uint64(1)) & mask


@njit(cache=True)
def build_vocab_slots(keys, koffs, ids, bits):
    """Slots (2**bits) for the tokens `ids`, token i being keys[koffs[i]:koffs[i + 1]]."""
    slots = np.full(1 << bits, -1, np.int64)
    for t in ids:
        found, i = _find(slots, keys, koffs, keys, koffs[t], koffs[t + 1])
        if found < 0:
            slots[i] = t
    return slots


@njit(cache=True)
def _vocab_id(vocab, data, start, end):
    """The id of the token data[start:end], or -1 (vocabulary entries are indexed by id)."""
    slots, keys, koffs = vocab
    k, _ = _find(slots, keys, koffs, data, start, end)
    return k


@njit(cache=True)
def _pair_slot(key, mask):
    # Fibonacci hashing: the high half of key * 2**64/phi spreads consecutive ids over the table.
    return ((np.uint64(key) * _GOLDEN) >> np.uint64(32)) & mask


@njit(cache=True)
def build_pair_table(left, right, rank, merged, bits):
    """A merge list as a table (2**bits slots, bits <= 32): (left id, right id) -> (rank, merged id).

    Entries come in rank order; a pair listed twice keeps its first (best) rank, as `Tokenizer` does.
    Returns (keys, ranks, merged ids), key = left << 32 | right, -1 for an empty slot.
    """
    size = 1 << bits
    mask = np.uint64(size - 1)
    keys = np.full(size, -1, np.int64)
    ranks = np.zeros(size, np.int64)
    out = np.zeros(size, np.int64)
    for k in range(len(left)):
        key = (np.int64(left[k]) << 32) | np.int64(right[k])
        i = _pair_slot(key, mask)
        while keys[i] >= 0 and keys[i] != key:
            i = (i + np.uint64(1)) & mask
        if keys[i] < 0:
            keys[i] = key
            ranks[i] = rank[k]
            out[i] = merged[k]
    return keys, ranks, out


# ---- merging one piece -----------------------------------------------------------------------------------


@njit(cache=True)
def _pair(data, bnd, ids, i, vocab, pairs):
    """(rank, merged id) of symbols i and i+1, or (NO_MERGE, -1).

    tiktoken ranks (`pairs` a 1-slot placeholder): a pair merges when its bytes are a token, ranked by that id.
    A merge list: only listed pairs merge, ranked by their place in the list.
    """
    keys, ranks, merged = pairs
    if len(keys) > 1:
        key = (ids[i] << 32) | ids[i + 1]
        mask = np.uint64(len(keys) - 1)
        j = _pair_slot(key, mask)
        while True:
            k = keys[j]
            if k == key:
                return ranks[j], merged[j]
            if k < 0:
                return NO_MERGE, np.int64(-1)
            j = (j + np.uint64(1)) & mask
    t = _vocab_id(vocab, data, bnd[i], bnd[i + 2])
    if t < 0:
        return NO_MERGE, np.int64(-1)
    return t, t


@njit(cache=True)
def _merge_piece(data, start, end, out, nout, work, byte_ids, vocab, pairs):
    """BPE of data[start:end] (at most LONG_PIECE bytes), ids written to out[nout:]; returns the new nout.

    The scan of bpe._merge_scan: symbol starts `bnd`, ids `ids`, and the rank `rk[i]` and merged id
    `mg[i]` of each adjacent pair; merge the lowest rank (leftmost on ties), refresh its two neighbours.
    """
    bnd, ids, rk, mg = work
    m = 0
    for p in range(start, end):
        t = byte_ids[data[p]]
        if t < 0:  # no token for this byte: dropped before merging, as Hugging Face does
            continue
        bnd[m] = p
        ids[m] = t
        m += 1
    bnd[m] = end
    for i in range(m - 1):
        rk[i], mg[i] = _pair(data, bnd, ids, i, vocab, pairs)
    while m > 1:
        best = NO_MERGE
        bi = -1
        for i in range(m - 1):
            if rk[i] < best:
                best = rk[i]
                bi = i
        if bi < 0:
            break
        ids[bi] = mg[bi]
        for j in range(bi + 1, m - 1):  # drop symbol bi+1 and the pair that started at it
            bnd[j] = bnd[j + 1]
            ids[j] = ids[j + 1]
            rk[j] = rk[j + 1]
            mg[j] = mg[j + 1]
        bnd[m - 1] = bnd[m]
        m -= 1
        if bi < m - 1:
            rk[bi], mg[bi] = _pair(data, bnd, ids, bi, vocab, pairs)
        if bi > 0:
            rk[bi - 1], mg[bi - 1] = _pair(data, bnd, ids, bi - 1, vocab, pairs)
    for i in range(m):
        out[nout] = ids[i]
        nout += 1
    return nout


# ---- the piece cache -------------------------------------------------------------------------------------
#
# Merged pieces repeat (" DRAWINGS" 1,604 times in the benchmark text): each distinct one is merged once and
# kept, key bytes in `keys`, ids in `vals[voffs[k]:voffs[k + 1]]`. When full it is emptied, which bounds
# its memory (a few MB) and keeps it correct; state[0] is the number of entries.


@njit(cache=True)
def _cache_get(cache, data, start, end, out, nout):
    """Copy the cached ids of data[start:end] to out[nout:]; the new nout, or -1 if not cached."""
    slots, keys, koffs, vals, voffs, state = cache
    k, _ = _find(slots, keys, koffs, data, start, end)
    if k < 0:
        return -1
    for j in range(voffs[k], voffs[k + 1]):
        out[nout] = vals[j]
        nout += 1
    return nout


@njit(cache=True)
def _cache_put(cache, data, start, end, ids, a, b):
    """Remember ids[a:b] as the encoding of data[start:end] (not cached yet)."""
    slots, keys, koffs, vals, voffs, state = cache
    if end - start > len(keys) or b - a > len(vals):
        return  # does not fit even an empty cache (only with a tiny test cache)
    k = state[0]
    if k + 1 >= len(koffs) or koffs[k] + end - start > len(keys) or voffs[k] + b - a > len(vals):
        slots[:] = -1
        k = 0
    _, i = _find(slots, keys, koffs, data, start, end)
    slots[i] = k
    ka = koffs[k]
    keys[ka:ka + end - start] = data[start:end]
    koffs[k + 1] = ka + end - start
    va = voffs[k]
    vals[va:va + b - a] = ids[a:b]
    voffs[k + 1] = va + b - a
    state[0] = k + 1


# ---- the encoder -----------------------------------------------------------------------------------------


@njit(cache=True)
def encode_kernel(kind, data, pos, cls, out, nout, whole_tokens, byte_ids, vocab, pairs, cache):
    """Encode data[pos:] into out[nout:] until the end or a piece longer than LONG_PIECE that must merge.

    Returns (pos, end, nout): pos == len(data) when done, else data[pos:end] is the long piece
    for Python to merge, and the caller calls again from `end`.
    """
    n = len(data)
    work = (np.empty(LONG_PIECE + 1, np.int64), np.empty(LONG_PIECE + 1, np.int64),
            np.empty(LONG_PIECE, np.int64), np.empty(LONG_PIECE, np.int64))
    while pos < n:
        end = _piece_end(kind, data, pos, n, cls)
        if whole_tokens:
            t = _vocab_id(vocab, data, pos, end)
            if t >= 0:
                out[nout] = t
                nout += 1
                pos = end
                continue
        if end - pos > LONG_PIECE:
            return pos, end, nout
        cached = _cache_get(cache, data, pos, end, out, nout)
        if cached >= 0:
            nout = cached
        else:
            first = nout
            nout = _merge_piece(data, pos, end, out, nout, work, byte_ids, vocab, pairs)
            _cache_put(cache, data, pos, end, out, first, nout)
        pos = end
    return pos, pos, nout


# ---- the Python side ------------------------------------------------------------------------------------


def _table_bits(entries: int) -> int:
    """log2 of a power-of-two table size at most half full (short probe runs)."""
    return max(4, (2 * entries - 1).bit_length())


# The vocabulary table of a merge list that never looks up whole pieces: one empty slot, never probed.
_NO_TABLE = (np.full(1, -1, np.int64), np.zeros(1, np.uint8), np.zeros(2, np.int64))


def _vocab_table(tokens: list[bytes | None]) -> tuple:
    """The token bytes -> id table of `_vocab_id`, built in ~20 ms for 128k tokens (map/join, then numba).

    Keys are indexed by id, so the entry a lookup finds is the id itself; inserting in id order keeps
    the first id of equal bytes, as `Tokenizer._encoder` does.
    """
    by_id = [t or b"" for t in tokens]
    lengths = np.fromiter(map(len, by_id), np.int64, len(by_id))
    keys = np.frombuffer(b"".join(by_id), np.uint8)
    koffs = np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths)])
    ids = np.flatnonzero(lengths)
    return build_vocab_slots(keys, koffs, ids, _table_bits(len(ids))), keys, koffs


def compiled_encoder(kind: int, tokens: list[bytes | None], encoder: dict[bytes, int], pair_ranks: dict | None,
                     whole_tokens: bool, cache_entries: int = 1 << 16) -> "CompiledEncoder | None":
    """The compiled encoder of a vocabulary, or None where the kernel would not give the reference's ids.

    - `tokens[id]`: the bytes of every ordinary token (None for the others), `encoder` their inverse
      (the first id of equal bytes), as `Tokenizer` holds them.
    - `pair_ranks`: (a, b) -> rank for a merge list, or None for tiktoken ranks (a pair merges when
      a+b is a token, ranked by its id). The kernel keeps token ids, so every merge's parts and
      result must be ordinary tokens (real files always pass; an odd hand-built one stays in Python).
    - `whole_tokens`: a piece that is itself a token is taken whole (tiktoken, ignore_merges).
    - `cache_entries`: how many merged pieces the cache holds before it starts again (a knob for tests).
    """
    vocab = _vocab_table(tokens) if whole_tokens or pair_ranks is None else _NO_TABLE
    if pair_ranks is None:
        pairs = (np.full(1, -1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64))
    else:
        n = len(pair_ranks)
        get, none = encoder.get, repeat(-1)
        left = np.fromiter(map(get, map(itemgetter(0), pair_ranks), none), np.int64, n)
        right = np.fromiter(map(get, map(itemgetter(1), pair_ranks), none), np.int64, n)
        merged = np.fromiter(map(get, starmap(add, pair_ranks), none), np.int64, n)
        if n and min(left.min(), right.min(), merged.min()) < 0:
            return None
        rank = np.fromiter(pair_ranks.values(), np.int64, n)
        order = np.argsort(rank, kind="stable")
        pairs = build_pair_table(left[order], right[order], rank[order], merged[order], _table_bits(n))
    byte_ids = np.array([encoder.get(bytes([b]), -1) for b in range(256)], np.int64)
    return CompiledEncoder(kind, whole_tokens, byte_ids, vocab, pairs, cache_entries)


class CompiledEncoder:
    """A vocabulary's tables for `encode_kernel` (see `compiled_encoder`), and its piece cache."""

    def __init__(self, kind, whole_tokens, byte_ids, vocab, pairs, cache_entries):
        self.kind = kind
        self.whole_tokens = bool(whole_tokens)
        self.byte_ids = byte_ids
        self.vocab = vocab
        self.pairs = pairs
        # Room for `cache_entries` pieces of 16 bytes and 4 ids on average; whichever fills first empties it.
        # (slots, key bytes, key offsets, ids, id offsets, [entries]): ~4 MB at the default size.
        self.cache = (np.full(1 << _table_bits(cache_entries), -1, np.int64),
                      np.empty(16 * cache_entries, np.uint8), np.zeros(cache_entries + 1, np.int64),
                      np.empty(4 * cache_entries, np.int32), np.zeros(cache_entries + 1, np.int64),
                      np.zeros(1, np.int64))

    def encode(self, text: str, merge_long) -> list[int]:
        """Token ids of `text` (surrogates already fixed); `merge_long(bytes)` gives a long piece's ids."""
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        n = len(data)
        cls = classes_for(data, text.isascii())
        out = np.empty(n, np.int32)  # a piece never has more tokens than bytes
        pos, nout = 0, 0
        while True:
            pos, end, nout = encode_kernel(self.kind, data, pos, cls, out, nout, self.whole_tokens,
                                           self.byte_ids, self.vocab, self.pairs, self.cache)
            if pos >= n:
                return out[:nout].tolist()
            ids = merge_long(data[pos:end].tobytes())
            out[nout:nout + len(ids)] = ids
            nout += len(ids)
            pos = end
