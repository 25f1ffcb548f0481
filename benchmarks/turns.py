"""Two sides of a benchmark (ours and a reference), each in its own process, taking turns step by step.

A shared 2-core VM's speed drifts by 20-40% within seconds. Two steps run a fraction of a second apart
see the same machine, so each pair's ratio is measured on equal terms; the median of the pairs is the
figure (bench_training.py, bench_lora.py). Each process keeps its own peak memory.

Protocol, one JSON object per line: the worker says {"ready": ...} once set up; to each "step" line on
its stdin it runs one step and answers {"s": seconds, ...}; to "done" it answers a final summary.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

PAUSE_S = 0.1  # between steps: idle threads of the side that just ran (OpenMP, BLAS) go to sleep


def serve(step, ready, summary) -> None:
    """The worker's side: `step()` runs one timed step and returns a dict of extras (JSON-able);
    `ready` is said once set up, `summary()` at the end."""
    print(json.dumps({"ready": ready}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        t = time.perf_counter()
        extras = step()
        print(json.dumps({"s": time.perf_counter() - t, **extras}), flush=True)
    print(json.dumps(summary()), flush=True)


def take_turns(cmds: dict, env: dict, steps: int, warmup: int):
    """Start each worker (one after the other: neither's start-up disturbs the other), then run warmup +
    steps turns, the two sides in alternating order. Returns (ready, answers, summaries), each keyed by
    side; answers[side] holds every step's answer, the warm-up ones first."""
    procs, ready = {}, {}
    for side, cmd in cmds.items():
        p = subprocess.Popen(cmd, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        first = p.stdout.readline()
        if not first:
            sys.exit(f"the {side} worker failed to start")
        ready[side] = json.loads(first)["ready"]
        procs[side] = p
    answers = {side: [] for side in cmds}
    for k in range(warmup + steps):
        for side in list(cmds) if k % 2 == 0 else list(cmds)[::-1]:
            time.sleep(PAUSE_S)
            p = procs[side]
            p.stdin.write("step\n")
            p.stdin.flush()
            answers[side].append(json.loads(p.stdout.readline()))
    summaries = {side: json.loads(p.communicate("done\n")[0].strip().splitlines()[-1]) for side, p in procs.items()}
    return ready, answers, summaries


def pair_ratios(answers: dict, warmup: int, ours: str = "ours", ref: str = "torch") -> list[float]:
    """ours/ref in steps per second, pair by pair after the warm-up (the ref's time over ours)."""
    return [b["s"] / a["s"] for a, b in zip(answers[ours][warmup:], answers[ref][warmup:])]


def quartiles(xs) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[1], q[2]
