"""The seq2seq example task: dates written many ways -> ISO 8601 (YYYY-MM-DD).

    python examples/make_dates.py --out data/dates                # writes train.tsv and heldout.tsv
    scratchlm train --arch seq2seq --data data/dates/train.tsv --out runs/dates ...
    python examples/make_dates.py --eval runs/dates --heldout data/dates/heldout.tsv

Sources mix nine formats ("March 5, 2019", "5 Mar 2019", "03/05/2019" month first, "5.3.2019" day first,
"the 5th of March, 2019", weekday prefixes, upper and lower case ...); the target is always "2019-03-05".
Held-out pairs are dates (calendar days) that no training pair uses, so exact match on them measures
whether the model learned the rule rather than the list. Deterministic from --seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def render(d: dt.date, fmt: int) -> str:
    m, mon, day = MONTHS[d.month - 1], MONTHS[d.month - 1][:3], DAYS[d.weekday()]
    return [
        f"{m} {d.day}, {d.year}",
        f"{mon} {d.day} {d.year}",
        f"{d.day} {m} {d.year}",
        f"{d.day} {mon}, {d.year}",
        f"{d.month:02d}/{d.day:02d}/{d.year}",
        f"{d.day}.{d.month}.{d.year}",
        f"the {ordinal(d.day)} of {m}, {d.year}",
        f"{day[:3]}, {d.day} {mon} {d.year}",
        f"{d.year}/{d.month}/{d.day}",
    ][fmt]


def source(d: dt.date, rng: random.Random) -> str:
    s = render(d, rng.randrange(9))
    r = rng.random()
    return s.upper() if r < 0.1 else s.lower() if r < 0.2 else s


def make(n_train: int, n_heldout: int, seed: int):
    rng = random.Random(seed)
    start, days = dt.date(1950, 1, 1), (dt.date(2049, 12, 31) - dt.date(1950, 1, 1)).days + 1
    held = set(rng.sample(range(days), n_heldout))  # calendar days kept out of training
    heldout = [(source(start + dt.timedelta(k), rng), (start + dt.timedelta(k)).isoformat()) for k in sorted(held)]
    rng.shuffle(heldout)
    train_days = [k for k in range(days) if k not in held]
    train = []
    for _ in range(n_train):
        d = start + dt.timedelta(rng.choice(train_days))
        train.append((source(d, rng), d.isoformat()))
    return train, heldout


def write_tsv(path: Path, pairs) -> None:
    path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory to write train.tsv and heldout.tsv in")
    ap.add_argument("--train", type=int, default=20000, help="training pairs (default 20000)")
    ap.add_argument("--heldout", type=int, default=1000, help="held-out pairs, of dates training never sees (default 1000)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--eval", default=None, metavar="RUN", help="instead: exact match of a trained run on --heldout-file")
    ap.add_argument("--heldout-file", default=None, metavar="TSV", help="the held-out pairs to score with --eval")
    ap.add_argument("--beam", type=int, default=1, help="beam width for --eval (default 1: greedy)")
    a = ap.parse_args(argv)
    if a.eval:
        import time

        from scratchlm.seq2seq import exact_match
        from scratchlm.training.seq2seq_train import load_run, read_pairs

        if not a.heldout_file:
            ap.error("--eval needs --heldout-file")
        model = load_run(a.eval)
        pairs = read_pairs([a.heldout_file])
        t0 = time.perf_counter()
        acc = exact_match(model, pairs, beam=a.beam)
        print(f"exact match {acc:.4f} on {len(pairs)} held-out pairs ({model.info['name']}, beam {a.beam}, "
              f"{time.perf_counter() - t0:.1f} s)")
        return 0
    if not a.out:
        ap.error("give --out DIR (or --eval RUN)")
    train, heldout = make(a.train, a.heldout, a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_tsv(out / "train.tsv", train)
    write_tsv(out / "heldout.tsv", heldout)
    print(f"wrote {len(train)} pairs to {out / 'train.tsv'} and {len(heldout)} to {out / 'heldout.tsv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
