"""Decode, prefill and load-to-first-token speed of scratchlm against llama.cpp, side by side, on GGUF files.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_vs_llamacpp.py [FILE.gguf ...] [--threads 2] [--json]

llama.cpp is llama-cpp-python built here from source (GGML_NATIVE=ON) in a venv of its own:

    python3 -m venv benchmarks/.venv-llamacpp
    CMAKE_ARGS=-DGGML_NATIVE=ON benchmarks/.venv-llamacpp/bin/pip install llama-cpp-python numpy

Each side is a worker process of its own (ours under this venv's python, llama.cpp's under
benchmarks/.venv-llamacpp/bin/python: llamacpp_worker.py), and the two take turns step by step
(turns.py: this shared VM's speed drifts within seconds; two steps a fraction of a second apart see the
same machine). llama.cpp runs with n_threads = n_threads_batch = --threads, through its C API with
use_extra_bufts off (llamacpp_worker.py says why); scratchlm with the environment as it is (it uses every
core; with a --threads other than the core count the usual thread variables are set to it).

One step, each side, the same token ids on both (our tokenizer's):
  - prefill: --prefill-tokens (512) tokens of real English prose (bench_fidelity.prose()) into an empty
    KV cache, logits of the last position only; llama.cpp's n_batch = n_ubatch >= that, so it is one
    batch, as llama-bench's pp512 is;
  - decode: a short prompt into a fresh (ours) / cleared (llama.cpp) cache, then --gen-tokens (64) greedy
    tokens one at a time; only those --gen-tokens decode calls are timed.
Speeds are tokens / the median step time; the ratio ours/llama.cpp is the median of the step pairs'
ratios, with quartiles. Peak RSS is each bench worker's own (ru_maxrss).

Load to first token: a fresh process each time, one untimed run per side (disk cache, numba's on-disk
cache), then --load-repeats runs taking turns; the time from just before `import scratchlm` (resp.
`import llama_cpp`) to the first greedy token of a short prompt, each side tokenizing it with its own
tokenizer. The import alone, and the whole process as the parent sees it (interpreter start-up
included), are shown apart. Medians; the ratio is the median of the pairs' ratios ours/llama.cpp (< 1:
ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import turns  # stdlib-only; nothing heavy is imported before the load timer starts

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
LLAMACPP_PYTHON = HERE / ".venv-llamacpp" / "bin" / "python"
WORKER = HERE / "llamacpp_worker.py"
PROMPT = "The history of computing is a story of"  # the short prompt of decode and of load-to-first-token


# --- our workers (run under this venv's python) ---------------------------------------------------------

def serve_ours(a) -> None:
    """A turns.serve worker: the same step as llamacpp_worker.py's bench mode, through scratchlm."""
    import numpy as np

    import scratchlm

    model = scratchlm.load(a.file, progress=False)
    dec, pre = _ids(a.decode_ids), _ids(a.prefill_ids)

    def one():
        cache = model.new_cache(len(pre))  # preallocated before the timer, as llama.cpp's context is
        t = time.perf_counter()
        model.forward(np.asarray([pre]), cache, 0, last_only=True)  # [1,1,V]
        prefill_s = time.perf_counter() - t
        cache = model.new_cache(len(dec) + a.gen_tokens + 1)
        logits = model.forward(np.asarray([dec]), cache, 0, last_only=True)  # [1,1,V]
        tok = int(np.argmax(logits[0, -1]))
        toks = [tok]
        t = time.perf_counter()
        for pos in range(len(dec), len(dec) + a.gen_tokens):
            logits = model.forward(np.asarray([[tok]]), cache, pos, last_only=True)  # one greedy decode step
            tok = int(np.argmax(logits[0, -1]))
            toks.append(tok)
        decode_s = time.perf_counter() - t
        return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": toks}

    turns.serve(one, None, lambda: {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def first_token_ours(a) -> None:
    """One JSON line: seconds from just before `import scratchlm` to the first greedy token of --prompt."""
    t0 = time.perf_counter()
    import scratchlm
    import_s = time.perf_counter() - t0
    import numpy as np

    model = scratchlm.load(a.file, progress=False)
    ids = model.tokenizer.encode(a.prompt)
    cache = model.new_cache(len(ids) + 1)
    tok = int(np.argmax(model.forward(np.asarray([ids]), cache, 0, last_only=True)[0, -1]))
    s = time.perf_counter() - t0
    print(json.dumps({"import_s": import_s, "first_token_s": s, "token": tok, "ids": ids,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)


def _ids(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


# --- the comparison -----------------------------------------------------------------------------------

def token_ids(file: str, n_prefill: int):
    """(decode prompt ids, prefill ids): our tokenizer's, handed to both sides."""
    import scratchlm
    from bench_fidelity import prose

    tok = scratchlm.load_tokenizer(file)
    pre = tok.encode(prose())
    if len(pre) < n_prefill:
        sys.exit(f"the prose has {len(pre)} tokens, fewer than --prefill-tokens {n_prefill}")
    return tok.encode(PROMPT), pre[:n_prefill]


def _ratio(answers: dict, key: str, warmup: int):
    per = {side: [{"s": r[key]} for r in rs] for side, rs in answers.items()}
    return turns.quartiles(turns.pair_ratios(per, warmup, "ours", "llamacpp"))  # ours/llama.cpp in tokens/s


def speed(a, file: str, env: dict) -> dict:
    dec, pre = token_ids(file, a.prefill_tokens)
    common = ["--decode-ids", ",".join(map(str, dec)), "--prefill-ids", ",".join(map(str, pre)),
              "--threads", str(a.threads)]
    cmds = {"ours": [sys.executable, __file__, file, "--worker", "ours", "--gen-tokens", str(a.gen_tokens)] + common,
            "llamacpp": [str(LLAMACPP_PYTHON), str(WORKER), "bench", file, "--gen", str(a.gen_tokens)] + common
            + (["--extra-bufts"] if a.extra_bufts else [])}
    ready, answers, summaries = turns.take_turns(cmds, env, a.steps, a.warmup)
    out = {"llamacpp_info": ready["llamacpp"], "prompt_ids": dec, "prefill_tokens": len(pre), "gen_tokens": a.gen_tokens}
    for key, n in (("decode", a.gen_tokens), ("prefill", len(pre))):
        q1, med, q3 = _ratio(answers, key + "_s", a.warmup)
        out[key] = {side: n / statistics.median(r[key + "_s"] for r in rs[a.warmup:]) for side, rs in answers.items()}
        out[key].update(ratio=med, ratio_q1=q1, ratio_q3=q3)
    out["peak_rss_mb"] = {side: s["peak_rss_mb"] for side, s in summaries.items()}
    t_ours, t_ref = answers["ours"][-1]["tokens"], answers["llamacpp"][-1]["tokens"]
    same = next((i for i, (x, y) in enumerate(zip(t_ours, t_ref)) if x != y), len(t_ours))
    out["greedy_tokens_agree"] = [same, len(t_ours)]  # how many leading greedy tokens are the same
    out["pairs"] = a.steps
    return out


def load_times(a, file: str, env: dict) -> dict:
    cmds = {"ours": [sys.executable, __file__, file, "--worker", "ours-first-token", "--prompt", PROMPT],
            "llamacpp": [str(LLAMACPP_PYTHON), str(WORKER), "first-token", file, "--prompt", PROMPT,
                         "--threads", str(a.threads)] + (["--extra-bufts"] if a.extra_bufts else [])}
    runs = {side: [] for side in cmds}
    for k in range(a.load_repeats + 1):  # run 0 of each side is untimed
        for side in list(cmds) if k % 2 == 0 else list(cmds)[::-1]:
            time.sleep(turns.PAUSE_S)
            t = time.perf_counter()
            p = subprocess.run(cmds[side], env=env, stdout=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t
            if p.returncode != 0:
                sys.exit(f"the {side} first-token worker failed (exit {p.returncode})")
            r = json.loads(p.stdout.strip().splitlines()[-1])
            if k:
                runs[side].append(dict(r, process_s=wall))
    out = {}
    for key in ("first_token_s", "import_s", "process_s"):
        out[key] = {side: statistics.median(r[key] for r in rs) for side, rs in runs.items()}
    q1, med, q3 = turns.quartiles([o["first_token_s"] / r["first_token_s"] for o, r in zip(runs["ours"], runs["llamacpp"])])
    out["first_token_s"].update(ratio=med, ratio_q1=q1, ratio_q3=q3)
    out["same_prompt_ids"] = runs["ours"][0]["ids"] == runs["llamacpp"][0]["ids"]
    out["same_first_token"] = runs["ours"][0]["token"] == runs["llamacpp"][0]["token"]
    out["repeats"] = a.load_repeats
    return out


def print_table(file: str, r: dict, a) -> None:
    info = r["llamacpp_info"]
    print(f"\n### {Path(file).name}\n")
    print(f"llama.cpp: {info['threads']} threads, n_batch = n_ubatch = {info['n_batch']}, use_extra_bufts "
          f"{info['use_extra_bufts']}; ours: {os.cpu_count()} cores, the environment as is. "
          f"{r['pairs']} step pairs after {a.warmup} warm-up; load: {r['load']['repeats']} fresh processes each.\n")
    print("| figure | scratchlm | llama.cpp | ours / llama.cpp (median of pairs, quartiles) |")
    print("| --- | ---: | ---: | --- |")
    for key, label in (("decode", f"decode tok/s ({r['gen_tokens']} tokens)"),
                       ("prefill", f"prefill tok/s ({r['prefill_tokens']} tokens)")):
        x = r[key]
        print(f"| {label} | {x['ours']:.1f} | {x['llamacpp']:.1f} | **{x['ratio']:.2f}x** ({x['ratio_q1']:.2f}-{x['ratio_q3']:.2f}) |")
    ld = r["load"]
    x = ld["first_token_s"]
    print(f"| load to first token, s | {x['ours']:.2f} | {x['llamacpp']:.2f} | {x['ratio']:.2f}x the time "
          f"({x['ratio_q1']:.2f}-{x['ratio_q3']:.2f}) |")
    print(f"| of which the import, s | {ld['import_s']['ours']:.2f} | {ld['import_s']['llamacpp']:.2f} | |")
    print(f"| whole process (interpreter start-up included), s | {ld['process_s']['ours']:.2f} | "
          f"{ld['process_s']['llamacpp']:.2f} | |")
    print(f"| peak RSS of the bench worker, MB | {r['peak_rss_mb']['ours']:.0f} | {r['peak_rss_mb']['llamacpp']:.0f} | |")
    same, n = r["greedy_tokens_agree"]
    print(f"\nGreedy decode: the first {same} of {n} tokens are the same on both sides; load-to-first-token prompt "
          f"ids {'identical' if ld['same_prompt_ids'] else 'DIFFER'}, first token "
          f"{'the same' if ld['same_first_token'] else 'DIFFERS'}.")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="GGUF files (default: the default model)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp's threads (default: every core)")
    ap.add_argument("--steps", type=int, default=8, help="timed step pairs")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--load-repeats", type=int, default=5)
    ap.add_argument("--extra-bufts", action="store_true",
                    help="llama.cpp with its extra buffer types (weight repacking) on; it crashes on some machines")
    ap.add_argument("--json", action="store_true", help="one JSON object per file instead of the tables")
    ap.add_argument("--worker", choices=("ours", "ours-first-token"), help=argparse.SUPPRESS)
    ap.add_argument("--decode-ids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prefill-ids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--prompt", default=PROMPT, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    a.file = a.files[0] if a.files else None
    if a.worker == "ours":
        serve_ours(a)
        return 0
    if a.worker == "ours-first-token":
        first_token_ours(a)
        return 0
    if not LLAMACPP_PYTHON.exists():
        sys.exit(f"{LLAMACPP_PYTHON} is missing: build llama-cpp-python first (see this script's docstring)")
    from scratchlm import assets

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE)]))
    if a.threads != os.cpu_count():
        env.update({k: str(a.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                 "NUMBA_NUM_THREADS")})
    files = [str(Path(f).resolve()) for f in a.files] or [str(assets.default_model_path())]
    for file in files:
        r = {"file": file, **speed(a, file, env)}
        r["load"] = load_times(a, file, env)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print_table(file, r, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
