"""Training data: text file(s) -> token ids in a memory-mapped file, a train/validation split, and
random-window batches.

    tokens.bin   the ids of the whole corpus, uint16 (uint32 when the vocabulary has more than 65536 ids)
    tokens.json  {"dtype", "count", "vocab_size", "tokenizer", "sources": [{"path", "bytes"}], "val_fraction"}

The split is deterministic: the last `val_fraction` of the tokens is the validation set, so a run
and its resume (and two runs with different seeds) always see the same held-out text.
Batches are windows at random offsets drawn from a seeded `np.random.Generator`; its state is
part of every checkpoint, which is what lets a resumed run see exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import FormatError

BIN_NAME = "tokens.bin"
META_NAME = "tokens.json"
MAX_CORPUS_BYTES = 1 << 31  # 2 GiB of text: far beyond what a CPU trains on; a guard against a wrong path


class DataError(FormatError):
    """A corpus that cannot be trained on: missing, empty, unreadable or too short for the context."""


def read_corpus(paths) -> tuple[str, list[dict]]:
    """The text of the corpus files, concatenated in order, and [{"path", "bytes"}] for the metadata."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise DataError("no training data given (--data FILE)")
    texts, sources, total = [], [], 0
    for p in paths:
        if not p.exists():
            raise DataError(f"{p}: no such file")
        if not p.is_file():
            raise DataError(f"{p}: not a file")
        size = p.stat().st_size
        total += size
        if total > MAX_CORPUS_BYTES:
            raise DataError(f"{p}: the corpus exceeds {MAX_CORPUS_BYTES >> 30} GiB")
        try:
            text = p.read_text(encoding="utf-8", errors="replace")  # a stray bad byte becomes U+FFFD, not a crash
        except OSError as e:
            raise DataError(f"{p}: cannot read: {e.strerror or e}") from None
        texts.append(text)
        sources.append({"path": str(p), "bytes": size})
    text = "".join(texts)
    if not text.strip():
        raise DataError(f"the corpus is empty: {', '.join(str(p) for p in paths)}")
    return text, sources


def token_dtype(vocab_size: int):
    """uint16 holds ids below 65536; a larger vocabulary needs uint32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_tokens(ids, out_dir, *, vocab_size: int, tokenizer_name: str, sources: list[dict],
                 val_fraction: float = 0.1) -> "TokenData":
    """Write ids to out_dir/tokens.bin (+ tokens.json) atomically and return them memory-mapped."""
    from .checkpoint import atomic_write

    out_dir = Path(out_dir)
    dtype = token_dtype(vocab_size)
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise DataError(f"token id out of range [0, {vocab_size}) in the encoded corpus")
    arr = arr.astype(dtype)
    atomic_write(out_dir / BIN_NAME, arr.tobytes())
    meta = {"dtype": np.dtype(dtype).name, "count": int(arr.size), "vocab_size": int(vocab_size),
            "tokenizer": tokenizer_name, "sources": sources, "val_fraction": float(val_fraction)}
    atomic_write(out_dir / META_NAME, (json.dumps(meta, indent=1) + "\n").encode())
    return TokenData(out_dir)


def encode_corpus(paths, tokenizer, out_dir, *, val_fraction: float = 0.1) -> "TokenData":
    """Read the corpus files, encode them with `tokenizer`, write tokens.bin/tokens.json in out_dir."""
    text, sources = read_corpus(paths)
    ids = tokenizer.encode(text)
    return write_tokens(ids, out_dir, vocab_size=tokenizer.vocab_size,
                        tokenizer_name=getattr(tokenizer, "name", type(tokenizer).__name__),
                        sources=sources, val_fraction=val_fraction)


class TokenData:
    """The memory-mapped token ids of a corpus and its deterministic train/validation split."""

    def __init__(self, folder):
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_NAME).read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{folder / META_NAME}: cannot read token metadata ({e})") from None
        dtype = meta.get("dtype")
        if dtype not in ("uint16", "uint32"):
            raise DataError(f"{folder / META_NAME}: dtype must be uint16 or uint32, got {dtype!r}")
        count = meta.get("count")
        itemsize = np.dtype(dtype).itemsize
        path = folder / BIN_NAME
        size = path.stat().st_size if path.is_file() else -1
        if not isinstance(count, int) or count < 0 or size != count * itemsize:
            raise DataError(f"{path}: expected {count!r} {dtype} ids, the file has {size} bytes")
        vf = float(meta.get("val_fraction", 0.1))
        if not 0.0 <= vf < 1.0:
            raise DataError(f"{folder / META_NAME}: val_fraction must be in [0, 1), got {vf}")
        self.meta = meta
        self.vocab_size = int(meta["vocab_size"])
        self.tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
        n_val = int(round(count * vf))
        self.train = self.tokens[:count - n_val]  # the first 90%: the model learns from these
        self.val = self.tokens[count - n_val:]  # the last 10%: held out, only evaluated

    def split(self, name: str) -> np.ndarray:
        return self.train if name == "train" else self.val

    def check_context(self, T: int) -> None:
        """Both splits must hold at least one window of T inputs plus the next-token target."""
        for name in ("train", "val"):
            n = len(self.split(name))
            if n < T + 1:
                raise DataError(f"the {name} split has {n} tokens, fewer than context + 1 = {T + 1}; "
                                f"use a shorter --context or more data")


def get_batch(tokens: np.ndarray, B: int, T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """B windows of T tokens at random offsets: inputs [B,T] and next-token targets [B,T] (int64)."""
    n = len(tokens)
    if n < T + 1:
        raise DataError(f"{n} tokens cannot fill a window of {T} inputs plus a target")
    starts = rng.integers(0, n - T, size=B)  # [B]; the last valid start is n-T-1
    idx = starts[:, None] + np.arange(T + 1)  # [B,T+1]
    w = np.asarray(tokens[idx], dtype=np.int64)  # [B,T+1]: one gather from the memmap
    return w[:, :-1], w[:, 1:]  # inputs [B,T], targets shifted by one [B,T]


class SeededSampler:
    """A sampler's random generator, from a seed or a checkpoint's saved state (exact resume)."""

    what = "data-sampler"  # named in the error for a bad saved state

    def __init__(self, seed: int):
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def state(self) -> dict:
        """The generator's full state (JSON-serialisable: PCG64's state is two Python ints)."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        try:
            self.rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError) as e:
            raise FormatError(f"bad {self.what} RNG state in checkpoint: {e}") from None


class BatchSampler(SeededSampler):
    """Random-window batches from one split, reproducible from (seed) or from a saved state."""

    def __init__(self, tokens: np.ndarray, batch: int, context: int, seed: int):
        super().__init__(seed)
        self.tokens, self.B, self.T = tokens, int(batch), int(context)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        return get_batch(self.tokens, self.B, self.T, self.rng)


def eval_batches(tokens: np.ndarray, n: int, batch: int, context: int, seed: int) -> list:
    """A fixed list of n batches (the same at every evaluation, so losses are comparable over time)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [get_batch(tokens, batch, context, rng) for _ in range(n)]


# --- baselines ---------------------------------------------------------------------------------


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, alpha: float = 1.0) -> float:
    """Validation cross-entropy (nats/token) of token frequencies with add-alpha smoothing."""
    counts = np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size).astype(np.float64)  # [V]
    logp = np.log(counts + alpha) - np.log(counts.sum() + alpha * vocab_size)  # [V]
    return float(-logp[np.asarray(val, dtype=np.int64)].mean())


def bigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int, alpha: float = 0.1) -> float:
    """Validation cross-entropy (nats/token) of a count-based bigram model p(next | prev) with add-alpha
    smoothing, fitted on the training tokens: the score a model that looks one token back can reach.

    Counts are kept sparse (one code prev*V+next per observed pair), so a 50k vocabulary costs
    memory proportional to the corpus, not V*V.
    """
    V = int(vocab_size)
    tr = np.asarray(train, dtype=np.int64)
    va = np.asarray(val, dtype=np.int64)
    if len(va) < 2:
        raise DataError("the validation split needs at least 2 tokens for a bigram baseline")
    codes, counts = np.unique(tr[:-1] * V + tr[1:], return_counts=True)  # observed pairs, sorted
    row_tot = np.bincount(tr[:-1], minlength=V).astype(np.float64)  # [V] times each token was a prev
    q = va[:-1] * V + va[1:]  # [N-1] validation pairs
    pos = np.clip(np.searchsorted(codes, q), 0, max(len(codes) - 1, 0))
    c = np.where(codes[pos] == q, counts[pos], 0).astype(np.float64) if len(codes) else np.zeros(len(q))
    logp = np.log(c + alpha) - np.log(row_tot[va[:-1]] + alpha * V)
    return float(-logp.mean())


# --- the offline demo corpus ----------------------------------------------------------------------

# Modules of the Python standard library, present on every CPython install: plain, well-written code.
STDLIB_DEMO_FILES = ("textwrap.py", "string.py", "bisect.py", "heapq.py", "fnmatch.py", "glob.py", "shlex.py",
                     "colorsys.py", "copy.py", "abc.py", "keyword.py", "queue.py", "sched.py", "graphlib.py",
                     "contextlib.py", "functools.py", "operator.py", "random.py", "statistics.py", "fractions.py",
                     "difflib.py", "csv.py", "pprint.py", "reprlib.py", "enum.py", "dataclasses.py", "argparse.py")


def stdlib_corpus(out_path, files=STDLIB_DEMO_FILES, max_bytes: int | None = None) -> Path:
    """Concatenate the given standard-library modules (those that exist here) into one text file."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in files:
        p = root / name
        if p.is_file():
            parts.append(f"# ===== {name} =====\n" + p.read_text(encoding="utf-8", errors="replace"))
    if not parts:
        raise DataError(f"no standard-library source files found under {root}")
    text = "\n".join(parts)
    if max_bytes is not None:
        text = text[:max_bytes]
    out_path = Path(out_path)
    out_path.write_text(text, encoding="utf-8")
    return out_path
