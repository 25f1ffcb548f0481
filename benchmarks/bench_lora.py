"""LoRA fine-tuning throughput: scratchlm against transformers + PEFT, side by side.

Same base (the default SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to fp32 by each side's own
loader), same packed rows of examples/sdu_weihai.jsonl with the same assistant-only loss mask, same
rank/alpha/dropout/targets, fp32, 2 threads. One step = forward + masked loss + backward + gradient
clipping + AdamW on the adapters. Each side runs in its own process (so peak memory is its own):

    python benchmarks/bench_lora.py                 # both sides, a table
    python benchmarks/bench_lora.py --steps 5 --batch 4 --context 256

The two processes take turns step by step (turns.py, as bench_training.py: this shared VM's speed drifts
within seconds, and two steps run back to back see the same machine). Both sides see the same rows in the
same order (a seeded permutation), so their losses can be compared. Figures: tokens/s = B*T / median step
time (every input position, as both sides process them all); the ratio = the median of the pairs' ratios;
peak RSS of the process (ru_maxrss), model loading included.
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import turns

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "sdu_weihai.jsonl"
TARGETS = "q,k,v,o,gate,up,down"
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rows(a):
    import scratchlm
    from scratchlm.training.finetune import load_rows

    tok = scratchlm.load_tokenizer(a.model) if a.model else scratchlm.load(progress=False).tokenizer
    return load_rows(DATA, tok, a.context)


def _batch_rows(n: int, B: int, step: int):
    """The rows of step `step` in the Finetuner's order (seed 0): epoch e is a permutation seeded (0, e)."""
    import numpy as np

    return np.asarray([np.random.default_rng([0, k // n]).permutation(n)[k % n] for k in range(step * B, (step + 1) * B)])


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup_ours(a):
    """Our base model and Finetuner; returns (step() -> loss, load seconds)."""
    import scratchlm
    from scratchlm.training.finetune import FinetuneArgs, Finetuner

    t0 = time.perf_counter()
    model = scratchlm.load(a.model, progress=False)
    load_s = time.perf_counter() - t0
    d = tempfile.mkdtemp()
    atexit.register(shutil.rmtree, d, True)
    ft = Finetuner.new(FinetuneArgs(data=str(DATA), out=d, base=a.model, rank=a.rank, alpha=a.alpha,
                                    dropout=a.dropout, targets=TARGETS, batch=a.batch, context=a.context,
                                    steps=a.warmup + a.steps, lr=2e-4, seed=0, plot=False, threads=a.threads),
                       model=model, progress=False, verbose=False)
    return lambda: ft.train_step()["loss"], load_s


def setup_torch(a):
    """The same base in transformers + PEFT; returns (step() -> loss, load seconds)."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from scratchlm import assets

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    path = Path(a.model) if a.model else assets.default_model_path()
    rows, masks, _ = _rows(a)
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    model = get_peft_model(base, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                            target_modules=HF_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    taken = iter(range(a.warmup + a.steps))

    def step():
        idx = _batch_rows(len(rows), a.batch, next(taken))
        x = torch.from_numpy(rows[idx, :-1])
        y = torch.from_numpy(rows[idx, 1:])
        m = torch.from_numpy(masks[idx, 1:].astype(np.float32))
        logits = model(input_ids=x).logits  # [B,T,V]
        logp = torch.log_softmax(logits, -1).gather(-1, y[..., None])[..., 0]  # [B,T]
        loss = -(logp * m).sum() / m.sum()  # the same assistant-only mean as ours
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    return step, load_s


def serve(a) -> None:
    """A worker (turns.serve): says its load time when ready, each step's loss, and its peak RSS at the end."""
    step, load_s = setup_ours(a) if a.side == "ours" else setup_torch(a)
    turns.serve(lambda: {"loss": step()}, load_s, lambda: {"peak_mib": _peak_mib()})


def side_cmd(name: str, a) -> list[str]:
    cmd = [sys.executable, __file__, "--side", name, "--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
           "--context", str(a.context), "--rank", str(a.rank), "--threads", str(a.threads)]
    return cmd + ["--model", a.model] if a.model else cmd


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the default model's GGUF)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--side", choices=("ours", "torch"), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.side:
        serve(a)
        return
    import statistics

    tokens = a.batch * a.context
    print(f"LoRA fine-tuning, SmolLM2-135M-Instruct base (fp32), r={a.rank} alpha={a.alpha:g} targets={TARGETS}, "
          f"batch {a.batch} x context {a.context} = {tokens} tokens/step, {a.threads} threads, {a.steps} timed steps "
          f"each, taking turns")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), OPENBLAS_NUM_THREADS=str(a.threads),
               MKL_NUM_THREADS=str(a.threads), PYTHONPATH=str(ROOT))
    load, answers, final = turns.take_turns({name: side_cmd(name, a) for name in ("ours", "torch")}, env,
                                            a.steps, a.warmup)  # warm-up steps first (allocations, first touches)
    med = {k: statistics.median(r["s"] for r in v[a.warmup:]) for k, v in answers.items()}
    peak = {k: v["peak_mib"] for k, v in final.items()}
    pairs = turns.pair_ratios(answers, a.warmup)
    print(f"{'':22}{'scratchlm':>14}{'transformers+PEFT':>20}")
    print(f"{'step time (median)':22}{med['ours']:>13.2f}s{med['torch']:>19.2f}s")
    print(f"{'tokens/s':22}{tokens / med['ours']:>14.1f}{tokens / med['torch']:>20.1f}")
    print(f"{'peak RSS (MiB)':22}{peak['ours']:>14.0f}{peak['torch']:>20.0f}")
    print(f"{'load (s)':22}{load['ours']:>14.2f}{load['torch']:>20.2f}")
    print(f"{'first-step loss':22}{answers['ours'][0]['loss']:>14.4f}{answers['torch'][0]['loss']:>20.4f}")
    print(f"speed ratio (scratchlm / transformers+PEFT): {statistics.median(pairs):.2f}x, the median of {len(pairs)} "
          f"step pairs ({', '.join(f'{r:.2f}' for r in pairs)})")


if __name__ == "__main__":
    main()
