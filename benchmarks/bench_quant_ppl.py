"""How much each quantization type costs: perplexity, KL and top-1 against the unquantized weights.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_quant_ppl.py [--ctx 512] [--windows 6] [--kl-windows 2]
                                                                [--types Q8_0,Q6_K,...] [--json]

What llama.cpp's `llama-perplexity` (with `--kl-divergence`) reports, computed with `scratchlm.perplexity`:
- Base: the default model widened to float32 at load (`dtype="f32"`). The original SmolLM2-135M float
  weights are not shipped offline, only the Q4_1 file: every other file here is `scratchlm quantize` of
  that Q4_1 file (dequantized tensor by tensor), so each row measures the type's rounding of weights that
  already sit on a Q4_1 grid. The "Q4_1 (shipped)" row is the file itself, run packed.
- Text: the English prose of README.md, docs/walkthrough.md, docs/finetune.md and docs/training.md
  (fenced code blocks and table rows dropped): written in this repository, so held out from any
  training set; no repetition. The first `--windows` windows of `--ctx` tokens, llama-perplexity's rule
  (each window's second half scored).
- KL(base || type), mean over the scored positions of the first `--kl-windows` windows (float64
  log-softmax), and top-1: how often the type's argmax equals the base's.
Files go to benchmarks/out/quant-ppl/ and are reused when present.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import scratchlm  # noqa: E402
from scratchlm import assets  # noqa: E402
from scratchlm.formats.export import quantize_model  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "quant-ppl"
TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_1", "Q4_0")
DOCS = ("README.md", "docs/walkthrough.md", "docs/finetune.md", "docs/training.md")


def held_out_text() -> str:
    """The repository's English prose: its docs without fenced code blocks and table rows."""
    parts = []
    for name in DOCS:
        doc = (ROOT / name).read_text(encoding="utf-8")
        doc = re.sub(r"^```.*?^```\n?", "", doc, flags=re.S | re.M)
        parts.append("\n".join(line for line in doc.splitlines() if not line.startswith("|")))
    return "\n\n".join(parts)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def scored_logp(model, ids: np.ndarray, ctx: int, windows: int) -> np.ndarray:
    """log-softmax [windows * (ctx - ctx//2 - 1), V] at the positions llama-perplexity scores."""
    out = []
    for w in range(windows):
        logits = model.logits(ids[w * ctx:(w + 1) * ctx])  # [ctx, V]
        out.append(log_softmax(logits[ctx // 2:-1]))  # [ctx - ctx//2 - 1, V]
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--kl-windows", type=int, default=2)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    src = assets.default_model_path()
    OUT.mkdir(parents=True, exist_ok=True)

    base = scratchlm.load(src, dtype="f32")
    text = held_out_text()
    ids = np.asarray(base.tokenizer.encode(text), np.int64)
    if len(ids) < a.ctx * a.windows:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {a.windows} windows of {a.ctx}")
    ids = ids[:a.ctx * a.windows]
    print(f"text: {len(ids)} tokens of {len(text)} characters; base: {src.name} widened to f32", file=sys.stderr)

    t0 = time.perf_counter()
    base_ppl = scratchlm.perplexity(base, ids, ctx=a.ctx, progress=False)
    base_logp = scored_logp(base, ids, a.ctx, a.kl_windows)
    rows = [dict(type="f32 (base)", mb=None, ppl=base_ppl.ppl, stderr=base_ppl.ppl_stderr, kl=0.0, top1=1.0)]
    print(f"f32: {base_ppl.ppl:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    del base

    files = [("Q4_1 (shipped)", src)]
    for t in a.types.split(","):
        path = OUT / f"smollm2-{t.lower()}.gguf"
        if not path.exists():
            quantize_model(src, path, t, progress=False)
        files.append((t, path))
    for name, path in files:
        t0 = time.perf_counter()
        m = scratchlm.load(path)
        p = scratchlm.perplexity(m, ids, ctx=a.ctx, progress=False)
        logp = scored_logp(m, ids, a.ctx, a.kl_windows)
        kl = float(np.mean(np.sum(np.exp(base_logp) * (base_logp - logp), axis=-1)))
        top1 = float(np.mean(logp.argmax(-1) == base_logp.argmax(-1)))
        rows.append(dict(type=name, mb=path.stat().st_size / 1e6, ppl=p.ppl, stderr=p.ppl_stderr, kl=kl, top1=top1))
        print(f"{name}: {p.ppl:.4f} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        del m

    if a.json:
        print(json.dumps(dict(tokens=base_ppl.tokens, ctx=a.ctx, rows=rows)))
        return 0
    print(f"| type | file MB | perplexity ({base_ppl.tokens} tokens) | vs f32 | mean KL(f32 ∥ type) | top-1 = f32 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mb = "-" if r["mb"] is None else f"{r['mb']:.1f}"
        rel = (r["ppl"] / base_ppl.ppl - 1) * 100
        print(f"| {r['type']} | {mb} | {r['ppl']:.3f} ± {r['stderr']:.3f} | {rel:+.2f}% | {r['kl']:.5f} | "
              f"{r['top1'] * 100:.2f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
