"""Can the default small model learn 2-digit addition? Train it on "12+34=46." lines and measure the
accuracy of greedy completions on sums it never saw.

    PYTHONPATH=. .venv/bin/python benchmarks/addition.py [--out runs/addition] [--steps 6000]

All 8100 pairs a+b with a, b in 10..99 are split once (seeded) into 90% for the corpus and 10%
held out. The corpus lists each training pair several times in random order, one per line. After
training, each held-out prompt "\\na+b=" is completed greedily up to "." and compared with a+b.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_split(seed: int = 0):
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pairs))
    n_test = len(pairs) // 10
    test = [pairs[i] for i in order[:n_test]]
    train = [pairs[i] for i in order[n_test:]]
    return train, test


def write_corpus(path: Path, train, repeats: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed + 1)
    lines = []
    for _ in range(repeats):
        for i in rng.permutation(len(train)):
            a, b = train[i]
            lines.append(f"{a}+{b}={a + b}.")
    path.write_text("\n".join(lines) + "\n")


def accuracy(model, test, limit: int | None = None) -> tuple[float, list]:
    """Fraction of held-out sums the model completes exactly (greedy), and a few examples."""
    tok = model.tokenizer
    right, examples = 0, []
    items = test[:limit] if limit else test
    for a, b in items:
        prompt = tok.encode(f"\n{a}+{b}=")
        out = model.generate(prompt, max_tokens=5, temperature=0, stop=".")
        ok = out.strip() == str(a + b)
        right += ok
        if len(examples) < 8:
            examples.append(f"{a}+{b}={out.strip()} ({'ok' if ok else 'want ' + str(a + b)})")
    return right / len(items), examples


def main(argv=None) -> int:
    import scratchlm
    from scratchlm.training.trainer import TrainArgs, Trainer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/addition")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--repeats", type=int, default=4, help="copies of the training pairs in the corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-only", action="store_true", help="measure an existing run")
    a = ap.parse_args(argv)

    out = Path(a.out)
    train, test = make_split(a.seed)
    if not a.eval_only:
        out.mkdir(parents=True, exist_ok=True)
        corpus = out.parent / f"{out.name}-corpus.txt"
        write_corpus(corpus, train, a.repeats, a.seed)
        args = TrainArgs(data=[str(corpus)], out=str(out), layers=a.layers, dim=a.dim, heads=a.heads,
                         context=a.context, batch=a.batch, steps=a.steps, lr=a.lr, eval_every=max(1, a.steps // 10),
                         save_every=max(1, a.steps // 10), seed=a.seed, sample_tokens=40)
        t0 = time.time()
        Trainer.new(args, progress=sys.stderr.isatty()).train()
        print(f"trained {a.steps} steps in {time.time() - t0:.0f} s")
    model = scratchlm.load(out)
    acc, examples = accuracy(model, test)
    train_acc, _ = accuracy(model, train, limit=len(test))
    print(json.dumps({"held_out_accuracy": acc, "train_accuracy": train_acc, "held_out": len(test),
                      "examples": examples}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
