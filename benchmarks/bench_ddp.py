"""Data-parallel training throughput: one process against N gloo ranks under torchrun, the same global batch.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ddp.py [--ranks 2] [--steps 40] [--reps 3] [--layers 4 --dim 128 ...]

Each layout is a real `scratchlm train` run (torchrun for the ranks) on the standard-library demo corpus,
with the default model shape unless told otherwise. The layouts take turns, run after run, `--reps` times
(this shared VM's speed drifts). From each run's log.jsonl: the median of the logged tokens/s (a rate over
the last <= 10 steps or 2 s) over the steps after the first 10, and the step time it implies (global batch
tokens / rate). Start-up (importing torch, the rendezvous) is not in these figures: it is printed apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(layout: tuple[int, int], corpus: Path, out: Path, a) -> dict:
    """One `scratchlm train` run with `ranks` processes of `threads` threads each: its median rate."""
    ranks, threads = layout
    train = ["train", "--data", str(corpus), "--out", str(out), "--layers", str(a.layers), "--dim", str(a.dim),
             "--heads", str(a.heads), "--context", str(a.context), "--batch", str(a.batch), "--steps", str(a.steps),
             "--eval-every", str(a.steps), "--save-every", str(a.steps), "--threads", str(threads), "--no-progress", "-q"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "scratchlm", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(_free_port()), "-m", "scratchlm", *train]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    rates = [rec["tok_s"] for rec in map(json.loads, (out / "log.jsonl").read_text().splitlines())
             if "tok_s" in rec and rec["step"] > 10]
    shutil.rmtree(out)
    tok_s = statistics.median(rates)
    return {"tok_s": tok_s, "step_ms": 1000 * a.batch * a.context / tok_s, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from scratchlm.training.data import stdlib_corpus
    from scratchlm.training.parallel import usable_cores

    cores = usable_cores()
    layouts = [(1, cores), (a.ranks, max(1, cores // a.ranks)), (1, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = stdlib_corpus(Path(tmp) / "stdlib.txt")
        got = {lay: [] for lay in layouts}
        for rep in range(a.reps):
            for lay in layouts:  # the layouts take turns, so each rep sees the same machine
                got[lay].append(run_once(lay, corpus, Path(tmp) / f"run-{lay[0]}x{lay[1]}", a))
                print(f"rep {rep + 1}: {lay[0]} process(es) x {lay[1]} thread(s): {got[lay][-1]['tok_s']:,.0f} tok/s",
                      file=sys.stderr)
    print(f"{cores} cores; {a.layers} layers, D={a.dim}, T={a.context}, global batch {a.batch}; {a.steps} steps a run, "
          f"{a.reps} runs a layout (median of each run's rates after step 10; medians over runs)")
    print("| layout | tokens/s | step (ms) | runs' tokens/s | wall time of a run (s) |")
    print("| --- | --- | --- | --- | --- |")
    for (ranks, threads), rs in got.items():
        name = f"{ranks} gloo ranks x {threads} thread" if ranks > 1 else f"1 process x {threads} thread"
        name += "s" if threads > 1 else ""
        each = ", ".join(f"{r['tok_s']:,.0f}" for r in rs)
        print(f"| {name} | {statistics.median(r['tok_s'] for r in rs):,.0f} | "
              f"{statistics.median(r['step_ms'] for r in rs):.0f} | {each} | {statistics.median(r['wall_s'] for r in rs):.1f} |")

if __name__ == "__main__":
    main()
