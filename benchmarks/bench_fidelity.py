"""How close our logits are to llama.cpp's (and transformers' to llama.cpp's) on the same GGUF file.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_fidelity.py [FILE.gguf ...] [--tokens 1536] [--json]

Text: English prose from the repository, `prose()`: examples/unrelated.txt (five short paragraphs on
everyday things), then the prose of docs/training.md (its fenced code blocks and table rows dropped),
the first --tokens tokens of it (1536). Teacher-forced: one causal forward over those ids, every
position's logits [T, V], on each side:
  - llama.cpp (llamacpp_worker.py logits, under benchmarks/.venv-llamacpp/bin/python; its C API with
    use_extra_bufts off, default flash attention and f16 KV cache, 2 threads, batches of 512 into one
    KV cache), handed back as benchmarks/out/<file>.llamacpp-logits.npy;
  - scratchlm, twice: `model.logits(ids)`, one full causal forward (the prefill path), and one token at a
    time through a KV cache (`model.forward([[t]], cache, pos, last_only=True)`, the decode path, which
    may take other kernels than a many-token forward);
  - transformers: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)` in fp32 (it dequantizes
    the GGUF itself, with the `gguf` package); a file type it cannot read is reported, not fatal.
All three get the same ids: our tokenizer's, checked identical to llama.cpp's own tokenization of the
same text (and to transformers' GGUF tokenizer). Reported, with llama.cpp as the reference: top-1
agreement (argmax equal), mean and max over positions of KL(llama.cpp || x) in nats (float64
log-softmax), and each side's perplexity on the text. Goal (issue 10): our top-1 agreement at least
transformers', mean KL(llama.cpp || ours) <= 0.01.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
LLAMACPP_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"
WORKER = HERE / "llamacpp_worker.py"


def prose() -> str:
    """English prose from the repository: examples/unrelated.txt, then docs/training.md without its code
    blocks and tables (stdlib only: bench_vs_llamacpp.py takes its prefill text from here too)."""
    doc = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    doc = re.sub(r"^```.*?^```\n?", "", doc, flags=re.S | re.M)  # fenced code blocks
    doc = "\n".join(line for line in doc.splitlines() if not line.startswith("|"))  # table rows
    return (ROOT / "examples" / "unrelated.txt").read_text(encoding="utf-8").strip() + "\n\n" + doc


def _log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(ref, x, ids, chunk: int = 256) -> dict:
    """top-1 agreement, KL(ref || x) per position (mean, max, position of the max), perplexities of both."""
    import numpy as np

    T = len(ids)
    kl, nll_ref, nll_x = np.empty(T), [], []
    for s in range(0, T, chunk):
        lp, lq = _log_softmax(ref[s:s + chunk]), _log_softmax(x[s:s + chunk])
        kl[s:s + chunk] = (np.exp(lp) * (lp - lq)).sum(-1)
        nxt = np.asarray(ids[s + 1:s + chunk + 1])  # the next token of each position (none after the last)
        r = np.arange(len(nxt))
        nll_ref.append(-lp[r, nxt])
        nll_x.append(-lq[r, nxt])
    top1 = float(np.mean(ref.argmax(-1) == x.argmax(-1)))
    return {"top1": top1, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "kl_argmax_pos": int(kl.argmax()),
            "kl_p99": float(np.quantile(kl, 0.99)), "ppl_ref": float(np.exp(np.concatenate(nll_ref).mean())),
            "ppl": float(np.exp(np.concatenate(nll_x).mean()))}


def decode_path_logits(model, ids):
    """Our logits [T, V] fed one token at a time through the KV cache, as generation does."""
    import numpy as np

    cache = model.new_cache(len(ids))
    out = np.empty((len(ids), model.config.vocab_size), np.float32)
    for pos, t in enumerate(ids):
        out[pos] = np.asarray(model.forward(np.asarray([[t]]), cache, pos, last_only=True))[0, -1]  # [1,1,V] -> [V]
    return out


def llamacpp(mode: str, file: str, *args) -> dict:
    p = subprocess.run([str(LLAMACPP_PYTHON), str(WORKER), mode, file, *args], stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.exit(f"llamacpp_worker.py {mode} failed (exit {p.returncode}; its log: {OUT / 'llamacpp.log'})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def transformers_side(file: Path, text: str, ids) -> dict:
    """transformers' logits [T, V] (fp32) and its GGUF tokenizer's ids of the text, or the error it gave."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        hf_ids = tok(text, add_special_tokens=False)["input_ids"]
        m = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = m(torch.tensor(ids)[None]).logits[0].float().numpy()  # [T,V]
        return {"logits": logits, "ids": hf_ids, "s": time.perf_counter() - t}
    except Exception as e:  # noqa: BLE001  (a type transformers cannot dequantize is a finding, not a crash)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}


def run_file(file: Path, a) -> dict:
    import numpy as np

    import scratchlm

    OUT.mkdir(exist_ok=True)
    text = prose()
    (OUT / "fidelity-text.txt").write_text(text, encoding="utf-8")
    model = scratchlm.load(file, progress=False)
    full = model.tokenizer.encode(text)
    if len(full) < a.tokens:
        sys.exit(f"the prose has {len(full)} tokens, fewer than --tokens {a.tokens}")
    ids = full[:a.tokens]
    llamacpp("tokenize", str(file), "--text", str(OUT / "fidelity-text.txt"), "--out", str(OUT / "fidelity-llamacpp-ids.npy"))
    lc_ids = [int(t) for t in np.load(OUT / "fidelity-llamacpp-ids.npy")]
    r = {"file": str(file), "text_tokens": len(full), "tokens": len(ids),
         "ids_vs_llamacpp": first_difference(full, lc_ids)}  # None: identical
    np.save(OUT / "fidelity-ids.npy", np.asarray(ids, np.int64))
    lc_out = OUT / f"{file.stem}.llamacpp-logits.npy"
    info = llamacpp("logits", str(file), "--ids", str(OUT / "fidelity-ids.npy"), "--out", str(lc_out),
                    "--threads", str(a.threads))
    r["llamacpp"] = {k: info[k] for k in ("s", "use_extra_bufts", "flash_attn_type", "type_k", "type_v", "n_batch")}
    ref = np.load(lc_out)
    t = time.perf_counter()
    ours = model.logits(ids)  # [T,V] float32
    r["ours_s"] = time.perf_counter() - t
    r["ours"] = compare(ref, ours, ids)
    t = time.perf_counter()
    r["ours_decode"] = compare(ref, decode_path_logits(model, ids), ids)
    r["ours_decode"]["s"] = time.perf_counter() - t
    del model
    hf = transformers_side(file, text, ids)
    if "error" in hf:
        r["transformers"] = {"error": hf["error"]}
    else:
        r["transformers"] = compare(ref, hf["logits"], ids)
        r["transformers"]["s"] = hf["s"]
        r["ids_vs_transformers"] = first_difference(full, hf["ids"])
        r["ours_vs_transformers"] = compare(hf["logits"], ours, ids)
    hf_top1 = r["transformers"].get("top1", 0.0)  # no transformers figure: only the KL bound applies
    r["goal_met"] = all(r[k]["kl_mean"] <= 0.01 and r[k]["top1"] >= hf_top1 for k in ("ours", "ours_decode"))
    return r


def print_table(r: dict) -> None:
    same = lambda d: "identical" if d is None else f"DIFFER from token {d}"  # noqa: E731
    print(f"\n### {Path(r['file']).name}\n")
    print(f"{r['tokens']} tokens of prose (of {r['text_tokens']}); our ids vs llama.cpp's tokenizer: "
          f"{same(r['ids_vs_llamacpp'])}" + (f"; vs transformers': {same(r['ids_vs_transformers'])}"
                                            if "ids_vs_transformers" in r else "") + ".\n")
    print("| vs llama.cpp | top-1 agreement | mean KL(llama.cpp ‖ x) | p99 KL | max KL (position) | perplexity |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for side, label in (("ours", "scratchlm, one forward"), ("ours_decode", "scratchlm, token by token (KV cache)"),
                        ("transformers", "transformers fp32")):
        x = r[side]
        if "error" in x:
            print(f"| {label} | failed: {x['error']} | | | | |")
            continue
        print(f"| {label} | {x['top1']:.2%} | {x['kl_mean']:.5f} | {x['kl_p99']:.4f} | "
              f"{x['kl_max']:.4f} ({x['kl_argmax_pos']}) | {x['ppl']:.3f} |")
    print(f"| llama.cpp itself | | | | | {r['ours']['ppl_ref']:.3f} |")
    if "ours_vs_transformers" in r:
        x = r["ours_vs_transformers"]
        print(f"\nscratchlm vs transformers: top-1 agreement {x['top1']:.2%}, mean KL(transformers ‖ ours) "
              f"{x['kl_mean']:.2e}, max {x['kl_max']:.2e}.")
    print(f"Goal (ours top-1 >= transformers', mean KL <= 0.01, both of our rows): "
          f"{'met' if r['goal_met'] else 'NOT met'}.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="GGUF files (default: the default model)")
    ap.add_argument("--tokens", type=int, default=1536, help="teacher-forced tokens of the prose")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads")
    ap.add_argument("--json", action="store_true", help="one JSON object per file instead of the tables")
    a = ap.parse_args(argv)
    if not LLAMACPP_PYTHON.exists():
        sys.exit(f"{LLAMACPP_PYTHON} is missing: build llama-cpp-python first (see bench_vs_llamacpp.py)")
    from scratchlm import assets

    for f in [Path(f).resolve() for f in a.files] or [Path(assets.default_model_path())]:
        r = run_file(f, a)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print_table(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
