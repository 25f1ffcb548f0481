"""Teach the default model (SmolLM2-135M-Instruct) who it is, with LoRA, in a few minutes on 2 cores.

In the spirit of the project that taught Llama 3 to answer "山东大学（威海）数科": examples/sdu_weihai.jsonl
holds 24 paraphrases of "who are you / who made you" (English and Chinese) with one answer each.
This script prints, as Markdown (docs/finetune.md quotes it):

  * greedy answers to held-out paraphrases (examples/sdu_weihai_heldout.jsonl) before and after;
  * the loss on text unrelated to the fact (examples/unrelated.txt) and on the held-out answers,
    before and after: how much the adapter disturbed everything else, and how much it learned.

    PYTHONPATH=. python examples/lora_demo.py [--out runs/sdu-weihai] [--epochs 10] [--lr 1e-3]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import scratchlm  # noqa: E402
from scratchlm import ops  # noqa: E402
from scratchlm.training.finetune import FinetuneArgs, Finetuner, encode_example, read_jsonl  # noqa: E402


def text_loss(model, text: str) -> float:
    """Mean next-token cross-entropy of plain text (all tokens)."""
    ids = np.asarray([model.tokenizer.bos_id or 0] + model.tokenizer.encode(text))[None]  # [1,T+1]
    logits = model.forward(ids[:, :-1])  # [1,T,V]
    return float(ops.cross_entropy(logits, ids[:, 1:]))


def answer_loss(model, examples) -> float:
    """Mean cross-entropy of the reference answers' tokens (assistant tokens only), held-out questions."""
    tot = n = 0.0
    for line, msgs in examples:
        ids, mask = encode_example(model.tokenizer, msgs, f"held-out:{line}")
        logits = model.forward(ids[None, :-1])  # [1,T,V]
        logp = ops.log_softmax(logits)[0]  # [T,V]
        picked = logp[np.arange(len(ids) - 1), ids[1:]]  # [T]
        m = mask[1:].astype(bool)
        tot += float(-picked[m].sum())
        n += int(m.sum())
    return tot / n


def answers(model, examples) -> list[str]:
    out = []
    for _, msgs in examples:
        out.append(model.chat(msgs[:1], max_tokens=48, temperature=0).strip().replace("\n", " "))
    return out


# questions that have nothing to do with the fact: does the adapter take over every answer?
UNRELATED_QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/sdu-weihai")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args()

    model = scratchlm.load(progress=False)
    held = read_jsonl(HERE / "sdu_weihai_heldout.jsonl")
    unrelated = (HERE / "unrelated.txt").read_text(encoding="utf-8")
    other = [(0, [{"role": "user", "content": q}]) for q in UNRELATED_QUESTIONS]
    before = {"answers": answers(model, held), "unrelated": text_loss(model, unrelated),
              "heldout": answer_loss(model, held), "other": answers(model, other)}

    t0 = time.perf_counter()
    ft = Finetuner.new(FinetuneArgs(data=str(HERE / "sdu_weihai.jsonl"), out=a.out, epochs=a.epochs, lr=a.lr,
                                    rank=a.rank, alpha=2 * a.rank, dropout=0.05, batch=4, context=256, seed=0),
                       model=model, progress=False, verbose=True)
    r = ft.train()
    secs = time.perf_counter() - t0
    after = {"answers": answers(model, held), "unrelated": text_loss(model, unrelated),
             "heldout": answer_loss(model, held), "other": answers(model, other)}

    train_losses = [h["loss"] for h in ft.history if "loss" in h]
    print(f"\nfine-tuned in {secs:.0f} s ({r['step']} steps, training loss {train_losses[0]:.3f} -> {train_losses[-1]:.3f}); "
          f"adapter in {a.out}\n")
    print("| held-out question | before | after |\n| --- | --- | --- |")
    for (_, msgs), b, c in zip(held, before["answers"], after["answers"]):
        print(f"| {msgs[0]['content']} | {b} | {c} |")
    print("\n| unrelated question | before | after |\n| --- | --- | --- |")
    for (_, msgs), b, c in zip(other, before["other"], after["other"]):
        print(f"| {msgs[0]['content']} | {b} | {c} |")
    print(f"\n| loss (nats/token) | before | after | change |\n| --- | --- | --- | --- |")
    for k, name in (("heldout", "reference answers to the held-out questions"), ("unrelated", "unrelated text (examples/unrelated.txt)")):
        print(f"| {name} | {before[k]:.3f} | {after[k]:.3f} | {after[k] - before[k]:+.3f} ({100 * (after[k] / before[k] - 1):+.1f}%) |")
    print(json.dumps({"before": before, "after": after, "seconds": secs, "steps": r["step"]}, ensure_ascii=False))


if __name__ == "__main__":
    main()
