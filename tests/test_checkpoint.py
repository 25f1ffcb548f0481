"""Checkpoints: atomic writes, SIGKILL at any moment leaves a loadable run, and --resume reaches
bit for bit the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import scratchlm
from scratchlm import cli
from scratchlm.errors import FormatError
from scratchlm.training import checkpoint as ck
from scratchlm.training.trainer import TrainArgs, Trainer

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200
NET = ["--layers", "2", "--dim", "16", "--heads", "2", "--kv-heads", "1", "--context", "16", "--batch", "4",
       "--lr", "3e-3", "--eval-every", "100000", "--seed", "7"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "c.txt"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "lambda", "yield", "for", "in", "if"]
    p.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)))
    return p


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run of STEPS steps: its final weights and optimizer state."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(["train", "--data", str(corpus), "--out", str(out), "--steps", str(STEPS), "--save-every", "1000",
                     "--no-progress", "-q"] + NET) == 0
    ckpt = ck.latest_checkpoint(out)
    assert ckpt.name == f"step-{STEPS:07d}"
    return load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "optimizer.safetensors")), out


def _spawn(args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "scratchlm", "train", "--no-progress", "-q"] + args, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=str(ROOT))


def _kill_after_checkpoint(proc, run: Path, min_step: int, extra_delay: float) -> bool:
    """Wait for a checkpoint past min_step, then SIGKILL after extra_delay; False if the run finished first."""
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            c = ck.latest_checkpoint(run)
        except FormatError:
            c = None
        if c is not None and int(c.name[5:]) > min_step:
            break
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    time.sleep(extra_delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _final_equal(run: Path, reference):
    ref_w, ref_opt, _ = reference
    ckpt = ck.latest_checkpoint(run)
    assert ckpt.name == f"step-{STEPS:07d}"
    w, opt = load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "optimizer.safetensors"))
    assert set(w) == set(ref_w) and set(opt) == set(ref_opt)
    for n in ref_w:
        assert np.array_equal(w[n], ref_w[n]), n  # bit for bit, not approximately
    for n in ref_opt:
        assert np.array_equal(opt[n], ref_opt[n]), n


def test_kill_and_resume_equals_uninterrupted(corpus, reference, tmp_path):
    run = tmp_path / "run"
    proc = _spawn(["--data", str(corpus), "--out", str(run), "--steps", str(STEPS), "--save-every", "20"] + NET)
    assert _kill_after_checkpoint(proc, run, 20, 0.05), "the run ended before it could be killed"
    killed_at = int(ck.latest_checkpoint(run).name[5:])
    assert 20 < killed_at < STEPS
    m = scratchlm.load(run)  # the last checkpoint of a killed run loads like any model
    assert m.info["step"] == killed_at
    assert cli.main(["train", "--resume", str(run), "--no-progress", "-q"]) == 0
    _final_equal(run, reference)
    # the log holds each step once, as if the run had never stopped
    import json
    steps = [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, STEPS + 1))
    ref_log = [json.loads(x) for x in (reference[2] / "log.jsonl").read_text().splitlines()]
    ref_losses = [r["loss"] for r in ref_log if "loss" in r]
    got = [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert got == ref_losses


def test_kills_at_random_moments_while_saving_every_step(corpus, reference, tmp_path):
    """Checkpoint every step, so the kills land inside checkpoint writes too; each time the run must load."""
    run = tmp_path / "run"
    rng = np.random.default_rng(int(time.time()))
    args = ["--data", str(corpus), "--out", str(run), "--steps", str(STEPS), "--save-every", "1"] + NET
    last, kills = 0, 0
    for i in range(3):
        proc = _spawn(args if i == 0 else ["--resume", str(run)])
        if not _kill_after_checkpoint(proc, run, last, float(rng.uniform(0, 0.15))):
            break
        kills += 1
        ckpt = ck.latest_checkpoint(run)
        step = int(ckpt.name[5:])
        assert step >= last
        last = step
        assert scratchlm.load(run).info["step"] == step
    assert kills >= 1, "every run ended before it could be killed"
    assert cli.main(["train", "--resume", str(run), "--no-progress", "-q"]) == 0
    _final_equal(run, reference)
    # only the newest checkpoints are kept, and no temp debris is left behind
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == [f"step-{STEPS - 1:07d}", f"step-{STEPS:07d}"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_atomic_write(tmp_path, monkeypatch):
    p = tmp_path / "f.json"
    ck.atomic_write(p, b"one")
    ck.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]

    def failing_fsync(fd):  # a write that fails before the rename must leave the old file whole
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        ck.atomic_write(p, b"three")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.json"]


def test_resume_extends_and_bad_checkpoints(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    args = TrainArgs(data=[str(corpus)], out=str(run), layers=1, dim=16, heads=2, context=16, batch=4, steps=10,
                     eval_every=10, save_every=5, eval_batches=1, sample_tokens=5, plot=False)
    Trainer.new(args, progress=False, verbose=False).train()
    t = Trainer.resume(run, steps=15, progress=False, verbose=False)
    assert t.step == 10
    with pytest.raises(OSError, match="another process is training"):  # the run is locked while t lives
        Trainer.resume(run, steps=15, progress=False, verbose=False)
    assert t.train()["step"] == 15
    assert scratchlm.load(run).info["step"] == 15

    # a `latest` pointing outside the run, a truncated weights file: one-line errors
    (run / "latest").write_text("../../etc\n")
    with pytest.raises(FormatError, match="not a checkpoint directory"):
        scratchlm.load(run)
    (run / "latest").write_text("checkpoints/step-0000015\n")
    w = run / "checkpoints" / "step-0000015" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    assert cli.main(["info", "-m", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors" in err[0]
    assert cli.main(["train", "--resume", str(run), "--no-progress", "-q"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
