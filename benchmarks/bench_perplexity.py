"""Our perplexity against llama.cpp's logits scored by the same rule (llama-perplexity's), on one GGUF file.

Text: bench_fidelity.prose() (English prose written in this repository, so held out from any training set),
repeated until it gives `--windows` windows of `--ctx` tokens. Both sides use the same token ids (ours; the
script checks that llama.cpp's tokenizer gives the same ones). llama.cpp's side: llamacpp_worker.py logits
(llama-cpp-python's C API, use_extra_bufts off) over each window, with the window's first token replaced by
BOS where the tokenizer adds BOS; its logits at positions ctx//2..ctx-2 are scored here in float64 against
the next token. Ours: scratchlm.perplexity(model, ids, ctx, batch).

    .venv/bin/python benchmarks/bench_perplexity.py [--model FILE.gguf] [--ctx 512] [--windows 4]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_fidelity import OUT, llamacpp, prose  # noqa: E402

import scratchlm  # noqa: E402
from scratchlm import assets  # noqa: E402


def score_logits(logits: np.ndarray, window: np.ndarray, first: int) -> np.ndarray:
    """NLLs float64 of window[first+1:] under logits [ctx, V] rows first..ctx-2."""
    x = logits[first:-1].astype(np.float64)  # [ctx-1-first, V]
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, window[first + 1:, None], axis=-1)[:, 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args(argv)
    file = Path(a.model) if a.model else assets.default_model_path()
    OUT.mkdir(exist_ok=True)

    model = scratchlm.load(file)
    tok = model.tokenizer
    text, need = prose(), a.ctx * a.windows + 1
    while len(tok.encode(text)) < need:
        text = text + "\n\n" + prose()
    (OUT / "ppl-text.txt").write_text(text, encoding="utf-8")
    ids = np.asarray(tok.encode(text, add_bos=tok.add_bos), np.int64)[:a.ctx * a.windows]
    llamacpp("tokenize", str(file), "--text", str(OUT / "ppl-text.txt"), "--out", str(OUT / "ppl-llamacpp-ids.npy"))
    lc_ids = np.load(OUT / "ppl-llamacpp-ids.npy")
    ours_no_bos = np.asarray(tok.encode(text), np.int64)
    same_ids = len(lc_ids) == len(ours_no_bos) and bool((lc_ids == ours_no_bos).all())

    t = time.perf_counter()
    r = scratchlm.perplexity(model, ids, ctx=a.ctx, batch=a.batch, add_bos=tok.add_bos)
    ours_s = time.perf_counter() - t

    first, nll, lc_s = a.ctx // 2, [], 0.0
    for w in range(a.windows):
        win = ids[w * a.ctx:(w + 1) * a.ctx].copy()
        inp = win.copy()
        if tok.add_bos:
            inp[0] = tok.bos_id
        np.save(OUT / "ppl-window.npy", inp)
        info = llamacpp("logits", str(file), "--ids", str(OUT / "ppl-window.npy"), "--out", str(OUT / "ppl-logits.npy"))
        lc_s += info["s"]
        nll.append(score_logits(np.load(OUT / "ppl-logits.npy"), win, first))
    v = np.concatenate(nll)
    m = v.mean()
    lc_ppl = math.exp(m)
    lc_err = math.sqrt(((v * v).mean() - m * m) / (len(v) - 1)) * lc_ppl

    res = {"model": file.name, "ctx": a.ctx, "windows": a.windows, "tokens": r.tokens, "llamacpp_tokens": len(v),
           "same_ids_as_llamacpp_tokenizer": same_ids, "add_bos": bool(tok.add_bos),
           "ours_ppl": r.ppl, "ours_stderr": r.ppl_stderr, "llamacpp_ppl": lc_ppl, "llamacpp_stderr": lc_err,
           "rel_diff": r.ppl / lc_ppl - 1, "ours_s": ours_s, "llamacpp_logits_s": lc_s}
    print(json.dumps(res))
    print(f"{file.name}, ctx {a.ctx}, {r.tokens} tokens scored: ours {r.ppl:.4f} ± {r.ppl_stderr:.4f}, "
          f"llama.cpp logits {lc_ppl:.4f} ± {lc_err:.4f} ({100 * (r.ppl / lc_ppl - 1):+.3f}%); "
          f"time ours {ours_s:.1f} s, llama.cpp's forward {lc_s:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
