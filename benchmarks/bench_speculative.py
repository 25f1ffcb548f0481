"""Speculative decoding against plain decoding, side by side in one run: greedy chat answers to
"Summarise this text" over two real texts (benchmarks/data: the README's opening, the Gettysburg Address).

Modes: plain; --lookup N (prompt lookup, K drafts); --draft (the default model requantized to Q4_0 with
`scratchlm quantize`, made once under benchmarks/out/: the same vocabulary, but as large as the target, so
it shows acceptance, not the speed a small draft would give). The modes are interleaved, `--repeats` times
(the machine is shared and noisy), and the medians are reported. Decode tok/s = tokens after the first one /
seconds from the first streamed piece to the end (the prefill, and the draft's, come before the first piece).
Speed-up: the median over repeats of plain's seconds / the mode's seconds in the same repeat (wall clock), and
the same ratio of this process's CPU seconds (steadier on a shared machine when run with SCRATCHLM_THREADS=1,
where CPU time is the work done). Every speculative run is checked to give the plain run's tokens.

    .venv/bin/python benchmarks/bench_speculative.py [--max-tokens 128] [--repeats 3] [--lookup 3] [--k 4]
    .venv/bin/python benchmarks/bench_speculative.py --verify-cost   # what verifying T rows costs
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
    """One greedy answer: (token ids, decode seconds (wall, CPU of this process), speculative stats or None)."""
    msgs = [{"role": "user", "content": "Summarise this text:\n\n" + text}]
    stream = model.chat(msgs, temperature=0, max_tokens=max_tokens, stream=True, **kw)
    it = iter(stream)
    next(it, None)  # the prefill and the first token(s)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in it:
        pass
    return list(stream.token_ids), (time.perf_counter() - t0, time.process_time() - c0), stream.speculative


def verify_cost(model, repeats: int) -> dict:
    """Milliseconds of one verify call (decode_batch of T rows of one sequence at position 300), T = 1, 2, 4, 8,
    interleaved, medians: what K drafts cost against a plain decode step (T = 1)."""
    import numpy as np
    cache = model.new_cache(320)
    model.forward(np.asarray([list(range(100, 400))]), cache, 0, last_only=True)  # 300 positions to attend to
    times = {T: [] for T in (1, 2, 4, 8)}
    for _ in range(repeats):
        for T in times:
            t0 = time.perf_counter()
            for _ in range(5):
                model.decode_batch([5] * T, [cache] * T, list(range(300, 300 + T)))
            times[T].append((time.perf_counter() - t0) / 5 * 1e3)
    return {T: statistics.median(v) for T, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lookup", type=int, default=3, help="n-gram length of prompt lookup (default 3)")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (default 4)")
    ap.add_argument("--no-draft", action="store_true", help="skip the Q4_0 draft model")
    ap.add_argument("--verify-cost", action="store_true", help="only time one verify forward of 1, 2, 4, 8 rows")
    a = ap.parse_args()

    model = scratchlm.load(progress=False)
    if a.verify_cost:
        ms = verify_cost(model, max(a.repeats, 5))
        print("| rows T | ms per verify forward | vs one decode step |\n| ---: | ---: | ---: |")
        for T, v in ms.items():
            print(f"| {T} | {v:.1f} | {v / ms[1]:.2f}x |")
        return 0
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
                print(f"{name} repeat {r} {mode}: {(len(ids) - 1) / s[0]:.1f} tok/s", file=sys.stderr, flush=True)
        n = len(ref) - 1
        res = {}
        for m, v in secs.items():
            wall = [w for w, _ in v]
            ratios = [pw / w for (pw, _), (w, _) in zip(secs["plain"], v)]  # paired: the same repeat
            cpu = statistics.median(c for _, c in secs["plain"]) / statistics.median(c for _, c in v)
            res[m] = {"decode_tok_s": n / statistics.median(wall), "speedup": statistics.median(ratios),
                      "cpu_speedup": cpu, "secs": v, **(stats[m] or {})}
        res["tokens"] = len(ref)
        results[name] = res

    print(f"\nSmolLM2-135M-Instruct Q4_1, greedy chat 'Summarise this text', K={a.k}, median of {a.repeats}\n")
    print("| text | tokens | mode | decode tok/s | speed-up (wall, paired) | speed-up (CPU time) | accepted / drafted | tokens per step |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, res in results.items():
        for mode in modes:
            r = res[mode]
            acc = f"{r['accepted']}/{r['drafted']} = {r['accepted'] / max(1, r['drafted']):.0%}" if "drafted" in r else "-"
            per = f"{(res['tokens'] - 1) / r['rounds']:.2f}" if "rounds" in r else "1"
            print(f"| {name} | {res['tokens']} | {mode} | {r['decode_tok_s']:.1f} | {r['speedup']:.2f}x | {r['cpu_speedup']:.2f}x | {acc} | {per} |")
    OUT.mkdir(exist_ok=True)
    (OUT / "speculative.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
