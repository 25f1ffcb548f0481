"""Train tokenizers from text: a character vocabulary, and byte-level BPE.

    >>> tok = train_bpe(open("corpus.txt").read(), 4096)       # doctest: +SKIP
    >>> tok.save("tokenizer.json")                             # a Hugging Face tokenizer.json
    >>> scratchlm.load_tokenizer("tokenizer.json").encode("def f(x):")

BPE training, byte-level (as GPT-2, tiktoken and Llama 3 do):

1. Special tokens are cut out of the text first, so they never take part in merges.
2. The regex pre-tokenizer cuts the rest into pieces (" hello", "123", "\\n    "). Merges never
   cross a piece boundary, so each *distinct* piece is kept once with its count (its multiplicity):
   a 10 MB corpus has a few hundred thousand distinct pieces, not millions of words.
3. Every piece starts as its UTF-8 bytes, ids 0..255. The vocabulary grows one merge at a time:
   the adjacent pair (a, b) with the highest count over all pieces (weighted by multiplicity) becomes a
   new token, and every occurrence of (a, b) is replaced, left to right, in every piece.

Tie-breaking (documented, and followed by the reference in the tests): among pairs with the same count
the one with the smallest (a, b) by token ids wins. When a merge yields bytes that are already a token
(two different pairs can spell the same bytes), the merge is recorded and the existing id is reused, as
Hugging Face's trainer does; training stops when the vocabulary has `vocab_size` tokens (specials
included) or no pair is left.

Speed: counting every pair again after each merge would cost O(corpus) per merge. Instead the pair
counts are kept up to date, with, for every pair, the set of pieces it occurs in. A merge rewrites only
those pieces and adjusts the counts of their old and new pairs. The best pair comes from a heap with
lazy deletion: an entry whose count is out of date is pushed back with the current count when it
reaches the top (an entry never understates its pair's count, because a count that grows is pushed anew).
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from typing import Iterable

import regex

from ..errors import TokenizerError
from .bpe import Tokenizer, fix_surrogates
from .char import CharTokenizer, DEFAULT_SPECIALS, end_ids
from .pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, PreTokenizer

__all__ = ["train_bpe", "train_char_tokenizer", "bpe_merges", "pretokenize_counts"]


def train_char_tokenizer(text: str, *, special_tokens: Iterable[str] = DEFAULT_SPECIALS) -> CharTokenizer:
    """A character tokenizer: one id per distinct character of `text` (by code point), then specials.

    See `scratchlm.tokenizer.char` for the ids and the saved format.
    """
    if not isinstance(text, str):
        raise TokenizerError(f"train_char_tokenizer() needs a str, got {type(text).__name__}")
    text = fix_surrogates(text)
    if not text:
        raise TokenizerError("cannot build a character vocabulary from empty text")
    return CharTokenizer(sorted(set(text)), special_tokens=tuple(special_tokens))


def pretokenize_counts(text: str, pattern: str, special_tokens: Iterable[str] = ()) -> Counter:
    """Distinct pieces of `text` with their counts: specials cut out first, then the regex splits the rest."""
    pre = PreTokenizer([pattern], name="train")
    specials = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    segments = regex.split("|".join(regex.escape(s) for s in specials), text) if specials else [text]
    counts: Counter = Counter()
    for seg in segments:
        if seg:
            counts.update(pre.split(seg))
    return counts


def bpe_merges(piece_counts: dict[str, int], n_tokens: int, progress: bool = False) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn merges until there are `n_tokens` ordinary tokens (or no pair is left).

    Returns (tokens, merges): tokens[id] are the bytes of each token (ids 0..255 are the bytes),
    merges are (left id, right id) pairs in the order learned.
    """
    tokens: list[bytes] = [bytes([i]) for i in range(256)]
    token_id: dict[bytes, int] = {b: i for i, b in enumerate(tokens)}
    merges: list[tuple[int, int]] = []
    # Pieces of one byte have no pairs and never change: leave them out.
    words: list[list[int]] = []
    freqs: list[int] = []
    for piece, n in piece_counts.items():
        b = piece.encode("utf-8")
        if len(b) > 1:
            words.append(list(b))
            freqs.append(n)

    counts: dict[tuple[int, int], int] = defaultdict(int)  # pair -> occurrences, weighted by piece counts
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> pieces that (may) hold it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            counts[p] += f
            where[p].add(wi)
    heap = [(-c, p) for p, c in counts.items()]
    heapq.heapify(heap)

    from tqdm import tqdm

    bar = tqdm(total=max(0, n_tokens - len(tokens)), desc="training BPE", unit="merge", disable=not progress)
    while len(tokens) < n_tokens and heap:
        neg, pair = heapq.heappop(heap)
        c = counts.get(pair, 0)
        if c != -neg:  # stale entry: put the pair back with its current count
            if c > 0:
                heapq.heappush(heap, (-c, pair))
            continue
        a, b = pair
        new_bytes = tokens[a] + tokens[b]
        new = token_id.get(new_bytes)
        if new is None:  # usually; an existing token is reused when two pairs spell the same bytes
            new = len(tokens)
            tokens.append(new_bytes)
            token_id[new_bytes] = new
            bar.update(1)
        merges.append(pair)
        grown: set[tuple[int, int]] = set()
        for wi in where.pop(pair):
            w = words[wi]
            out = _merge_word(w, a, b, new)
            if out is None:  # the pair left this piece in an earlier merge (sets are not pruned)
                continue
            f = freqs[wi]
            for p in zip(w, w[1:]):
                counts[p] -= f
            for p in zip(out, out[1:]):
                counts[p] += f
                where[p].add(wi)
                if new in p:
                    grown.add(p)
            words[wi] = out
        counts.pop(pair, None)  # every occurrence was merged (leftmost first leaves no (a, a) behind)
        for p in grown:
            heapq.heappush(heap, (-counts[p], p))
    bar.close()
    return tokens, merges


def _merge_word(w: list[int], a: int, b: int, new: int) -> list[int] | None:
    """`w` with every (a, b) replaced by `new`, left to right; None when (a, b) does not occur."""
    n = len(w)
    i = 0
    out: list[int] | None = None
    while i < n - 1:
        if w[i] == a and w[i + 1] == b:
            if out is None:
                out = w[:i]
            out.append(new)
            i += 2
        else:
            if out is not None:
                out.append(w[i])
            i += 1
    if out is None:
        return None
    if i == n - 1:
        out.append(w[i])
    return out


def train_bpe(text: str, vocab_size: int, *, special_tokens: Iterable[str] = DEFAULT_SPECIALS,
              pattern: str = LLAMA3_PATTERN, progress: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `text`, with `vocab_size` tokens in all.

    Ids: 0..255 are the bytes, then the learned tokens in the order learned, then `special_tokens`.
    `pattern` is the pre-tokenizer regex (default: Llama 3's, which is GPT-4's cl100k pattern;
    `scratchlm.tokenizer.GPT2_PATTERN` is the other common choice). With Llama 3's pattern a piece that
    is itself a token is taken whole (ignore_merges, as tiktoken and llama.cpp's "llama-bpe" do), so the
    tokenizer reads the same in Hugging Face tokenizers, llama.cpp and here.
    """
    if not isinstance(text, str):
        raise TokenizerError(f"train_bpe() needs a str, got {type(text).__name__}")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TokenizerError(f"vocab_size must be an integer, got {vocab_size!r}")
    specials = list(dict.fromkeys(special_tokens))
    if not all(isinstance(s, str) and s for s in specials):
        raise TokenizerError(f"special tokens must be non-empty strings, got {specials!r}")
    if vocab_size < 256 + len(specials) or vocab_size > 1 << 20:
        raise TokenizerError(f"vocab_size {vocab_size} must be in [{256 + len(specials)}, {1 << 20}] "
                             f"(256 bytes + {len(specials)} special tokens at least)")
    text = fix_surrogates(text)
    if not text:
        raise TokenizerError("cannot train a BPE tokenizer on empty text")
    counts = pretokenize_counts(text, pattern, specials)
    tokens, merges = bpe_merges(counts, vocab_size - len(specials), progress=progress)
    special_ids = {s: len(tokens) + k for k, s in enumerate(specials)}
    name = {LLAMA3_PATTERN: "llama-bpe", GPT2_PATTERN: "gpt2"}.get(pattern, "bpe")
    return Tokenizer(
        tokens=list(tokens),
        special_tokens=special_ids,
        pre_tokenizer=PreTokenizer([pattern], name=name),
        merges=[(tokens[a], tokens[b]) for a, b in merges],
        ignore_merges=pattern == LLAMA3_PATTERN,
        eos_ids=end_ids(special_ids),
        name=name,
    )
