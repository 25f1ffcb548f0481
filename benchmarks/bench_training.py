"""Training throughput: our NumPy trainer step (own backward, the batch in chunks over --threads threads,
clipping, AdamW) against the same step in PyTorch autograd (transformers' LlamaForCausalLM /
GPT2LMHeadModel, fp32, torch.optim.AdamW), side by side.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_training.py [--arch llama] [--layers 4 --dim 128 ...]

Each side runs in its own child process (so peak memory is its own: resource.getrusage's ru_maxrss),
both with the same thread count, and the two take turns step by step (turns.py: this shared VM's speed
drifts within seconds; two steps a fraction of a second apart see the same machine). Reported: tokens/s
(B*T per step / the median step time), peak RSS, and the ratio ours/torch as the median of the pairs'
ratios, with its quartiles.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import turns

ROOT = Path(__file__).resolve().parents[1]


def _cfg(a):
    from scratchlm.training.trainer import TrainArgs
    return TrainArgs(arch=a.arch, layers=a.layers, dim=a.dim, heads=a.heads, kv_heads=a.kv_heads,
                     context=a.context, batch=a.batch).model_config(a.vocab)


def _batches(a, n):
    import numpy as np
    rng = np.random.default_rng(0)
    return [(rng.integers(0, a.vocab, (a.batch, a.context)), rng.integers(0, a.vocab, (a.batch, a.context)))
            for _ in range(n)]


def setup_ours(a):
    """Our model and optimizer; returns (step(x, y) -> (loss, phase seconds), params)."""
    from scratchlm.model import Model
    from scratchlm.training.optim import AdamW, clip_grad_norm
    from scratchlm.training.parallel import keep_freed_memory
    from scratchlm.training.trainer import accumulate_grads, init_weights

    keep_freed_memory()  # as the Trainer does
    cfg = _cfg(a)
    model = Model(cfg, init_weights(cfg, 0))
    opt = AdamW(model.weights, betas=(0.9, 0.95), weight_decay=0.1)

    def step(x, y):
        t0 = time.perf_counter()
        loss, grads = accumulate_grads(model, [(x, y)], threads=a.threads)  # the Trainer's step: chunks in threads
        t1 = time.perf_counter()
        clip_grad_norm(grads, 1.0)
        t2 = time.perf_counter()
        opt.step(grads, 1e-3)
        t3 = time.perf_counter()
        return loss, {"forward+backward": t1 - t0, "clip": t2 - t1, "adamw": t3 - t2}

    return step, cfg.n_params


def setup_torch(a):
    """The same model in transformers and torch.optim.AdamW; returns (step(x, y) -> (loss, {}), params)."""
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = _cfg(a)
    if a.arch == "llama":
        hf = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                      num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
                                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                                      tie_word_embeddings=cfg.tie_embeddings)
        model = transformers.LlamaForCausalLM(hf)
    else:
        hf = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.dim, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                                     n_positions=cfg.max_seq_len, n_inner=cfg.ffn_dim, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new")
        model = transformers.GPT2LMHeadModel(hf)
    model = model.float().train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))

    def step(x, y):
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        logits = model(input_ids=x).logits  # [B,T,V]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach()), {}

    return step, sum(p.numel() for p in model.parameters())


def serve(a) -> None:
    """A worker (turns.serve): our side or torch's, the same 8 batches cycled; each step answers its loss
    and the time of its phases."""
    step, n_params = setup_ours(a) if a.worker == "ours" else setup_torch(a)
    data = _batches(a, 8)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    taken = itertools.count()

    def one():
        loss, phases = step(*data[next(taken) % len(data)])
        return {"loss": float(loss), "phases": phases}

    turns.serve(one, None, lambda: {"params": n_params, "rss_before_mb": rss0 / 1024,
                                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama", choices=("llama", "gpt2"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=0)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=96, help="vocabulary size (96: a character model of code)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", choices=("ours", "torch"), help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print one JSON line (with every step's time)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.worker:
        serve(a)
        return 0
    n = str(a.threads)  # both sides get the same thread count (BLAS pools for NumPy, intra-op for torch)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, MKL_NUM_THREADS=n)
    argv = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--json"]
    cmds = {side: [sys.executable, __file__, "--worker", side] + argv for side in ("ours", "torch")}
    _, answers, results = turns.take_turns(cmds, env, a.steps, a.warmup)
    timed = {side: rs[a.warmup:] for side, rs in answers.items()}
    times = {side: [r["s"] for r in rs] for side, rs in timed.items()}

    tokens = a.batch * a.context
    summary = {}
    for side, r in results.items():
        step = statistics.median(times[side])
        summary[side] = {"tok_s": tokens / step, "step_ms": step * 1e3, "params": r["params"],
                         "loss": answers[side][-1]["loss"], "peak_rss_mb": r["peak_rss_mb"],
                         "rss_before_train_mb": r["rss_before_mb"]}
    ph = {k: sum(r["phases"][k] for r in timed["ours"]) for k in timed["ours"][0]["phases"]}
    tot = sum(ph.values())
    summary["ours"]["phases"] = {k: round(v / tot, 3) for k, v in ph.items()}
    pairs = turns.pair_ratios(answers, a.warmup)  # ours/torch in tokens/s, pair by pair
    q1, med, q3 = turns.quartiles(pairs)
    summary.update(ratio=med, ratio_q1=q1, ratio_q3=q3, pairs=len(pairs))
    summary["step_ms"] = {k: [round(t * 1e3, 1) for t in v] for k, v in times.items()}  # every timed step, in order
    summary["shape"] = dict(arch=a.arch, layers=a.layers, dim=a.dim, heads=a.heads, kv_heads=a.kv_heads or a.heads,
                            context=a.context, batch=a.batch, vocab=a.vocab, threads=a.threads)
    if a.json:
        print(json.dumps(summary))
        return 0
    s = summary["shape"]
    print(f"{s['arch']} L={s['layers']} D={s['dim']} H={s['heads']} K={s['kv_heads']} T={s['context']} B={s['batch']} "
          f"V={s['vocab']}, {a.threads} threads, {a.steps} steps each, taking turns")
    for side in ("ours", "torch"):
        r = summary[side]
        print(f"  {side:<6} {r['tok_s']:>9,.0f} tok/s  {r['step_ms']:7.1f} ms/step (median)  params {r['params']:,}  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (before training {r['rss_before_train_mb']:.0f} MB)")
    print(f"  ratio ours/torch: {med:.2f}x (median of {len(pairs)} step pairs; quartiles {q1:.2f}-{q3:.2f})")
    print("  our step: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["ours"]["phases"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
