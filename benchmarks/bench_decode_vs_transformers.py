"""Decode and prefill speed of scratchlm against Hugging Face transformers, side by side in one run.

Both load the same GGUF file (the default model unless --model is given); transformers dequantizes
it to fp32 torch weights, scratchlm to fp32 NumPy weights. Both decode greedily with a KV cache.
Run:  .venv/bin/python benchmarks/bench_decode_vs_transformers.py [--model FILE.gguf] [--prompt-tokens 512] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def bench_ours(path, P, G):
    from scratchlm.benchmark import run_bench
    return run_bench(path, prompt_tokens=P, gen_tokens=G)


def bench_transformers(path, P, G, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    path = Path(path)
    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor(np.random.default_rng(0).integers(100, 1000, P))[None]
    with torch.no_grad():
        t0 = time.perf_counter()
        out = m(ids, use_cache=True)
        prefill_s = time.perf_counter() - t0
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(G):
            out = m(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - t0
    return {"load_s": load_s, "prefill_tok_s": P / prefill_s, "decode_tok_s": G / decode_s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--bf16", action="store_true", help="also time transformers in bfloat16")
    a = ap.parse_args()
    import torch
    from scratchlm import assets

    path = a.model or assets.default_model_path()
    rows = {"scratchlm (numpy fp32)": bench_ours(path, a.prompt_tokens, a.gen_tokens),
            "transformers fp32": bench_transformers(path, a.prompt_tokens, a.gen_tokens, torch.float32)}
    if a.bf16:
        rows["transformers bf16"] = bench_transformers(path, a.prompt_tokens, a.gen_tokens, torch.bfloat16)
    ref = rows["transformers fp32"]
    print(f"{'':24} {'load s':>8} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, r in rows.items():
        print(f"{name:24} {r['load_s']:8.2f} {r['prefill_tok_s']:14.1f} {r['decode_tok_s']:13.1f}")
    ours = rows["scratchlm (numpy fp32)"]
    print(f"ratio scratchlm / transformers fp32: decode {ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x, "
          f"prefill {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x, load {ref['load_s'] / ours['load_s']:.1f}x faster")
    print(json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items() if isinstance(vv, float)} for k, v in rows.items()}),
          file=sys.stderr)


if __name__ == "__main__":
    main()
