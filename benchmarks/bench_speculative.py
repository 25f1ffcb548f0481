"""Speculative decoding against plain decoding, side by side in one run: greedy chat answers to
"Summarise this text" over two real texts (benchmarks/data: the README's opening, the Gettysburg Address).

Modes: plain; --lookup N (prompt lookup, K drafts); --draft (the default model requantized to Q4_0 with
`scratchlm quantize`, made once under benchmarks/out/: the same vocabulary, but as large as the target, so
it shows acceptance, not the speed a small draft would give). The modes are interleaved, `--repeats` times
(the machine is shared and noisy), and the medians are reported. Decode tok/s = tokens after the first one /
seconds from the first streamed piece to the end (the prefill, and the draft's, come before the first piece).
Every speculative run is checked to give the plain run's tokens.

    .venv/bin/python benchmarks/bench_speculative.py [--max-tokens 128] [--repeats 3] [--lookup 3] [--k 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import scratchlm  # noqa: E402
from scratchlm import assets  # noqa: E402

TEXTS = {"readme": HERE / "data" / "readme_intro.txt", "gettysburg": HERE / "data" / "gettysburg.txt"}
OUT = HERE / "out"


def run(model, text: str, max_tokens: int, **kw):
    """One greedy answer: (token ids, decode seconds, speculative stats or None)."""
    msgs = [{"role": "user", "content": "Summarise this text:\n\n" + text}]
    stream = model.chat(msgs, temperature=0, max_tokens=max_tokens, stream=True, **kw)
    it = iter(stream)
    next(it, None)  # the prefill and the first token(s)
    t0 = time.perf_counter()
    for _ in it:
        pass
    return list(stream.token_ids), time.perf_counter() - t0, stream.speculative


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookup", type=int, default=3, help="n-gram length of prompt lookup (default 3)")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (default 4)")
    ap.add_argument("--no-draft", action="store_true", help="skip the Q4_0 draft model")
    a = ap.parse_args()

    model = scratchlm.load(progress=False)
    modes = {"plain": {}, f"lookup {a.lookup}": {"lookup": a.lookup, "draft_tokens": a.k}}
    if not a.no_draft:
        from scratchlm.formats.export import quantize_model
        OUT.mkdir(exist_ok=True)
        path = OUT / "SmolLM2-135M-Instruct.Q4_0.gguf"
        if not path.exists():
            quantize_model(assets.default_model_path(), path, "Q4_0", progress=False)
        modes["draft Q4_0"] = {"draft": scratchlm.load(path, progress=False), "draft_tokens": a.k}

    results = {}
    for name, p in TEXTS.items():
        text = p.read_text()
        ref, secs, stats = None, {m: [] for m in modes}, {}
        for r in range(a.repeats):
            for mode, kw in modes.items():  # interleaved: each repeat runs every mode once
                ids, s, st = run(model, text, a.max_tokens, **kw)
                if ref is None:
                    ref = ids
                if ids != ref:
                    raise SystemExit(f"{name}, {mode}: tokens differ from plain greedy decoding")
                secs[mode].append(s)
                stats[mode] = st
                print(f"{name} repeat {r} {mode}: {(len(ids) - 1) / s:.1f} tok/s", file=sys.stderr, flush=True)
        n = len(ref) - 1
        plain = statistics.median(secs["plain"])
        results[name] = {m: {"decode_tok_s": n / statistics.median(v), "speedup": plain / statistics.median(v),
                             "secs": v, **(stats[m] or {})} for m, v in secs.items()}
        results[name]["tokens"] = len(ref)

    print(f"\nSmolLM2-135M-Instruct Q4_1, greedy chat 'Summarise this text', K={a.k}, median of {a.repeats}\n")
    print("| text | tokens | mode | decode tok/s | speed-up | accepted / drafted | tokens per step |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for name, res in results.items():
        for mode in modes:
            r = res[mode]
            acc = f"{r['accepted']}/{r['drafted']} = {r['accepted'] / max(1, r['drafted']):.0%}" if "drafted" in r else "-"
            per = f"{(res['tokens'] - 1) / r['rounds']:.2f}" if "rounds" in r else "1"
            print(f"| {name} | {res['tokens']} | {mode} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f}x | {acc} | {per} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "speculative.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
