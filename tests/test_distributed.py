"""Data-parallel training (training/distributed.py): two gloo ranks started by torchrun train the weights
one process trains from the same global batch (1e-6 relative), a two-rank run stopped and resumed continues
bit for bit (on 2 ranks) or within 1e-6 (on 1 rank), LoRA fine-tuning on 2 ranks equals 1, and a rank that
fails ends the job with its one-line message.

One torchrun launch (tests/ddp_worker.py) makes every two-rank run: starting torch costs seconds a process.
The shard arithmetic itself (parallel_loss_and_grads(rows=...)) is checked in-process, without torch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import scratchlm
from scratchlm import cli
from scratchlm.training.distributed import Dist, DistributedError
from scratchlm.training.lora import LoRA
from scratchlm.training.parallel import parallel_loss_and_grads, shard_rows
from tests import ddp_worker
from tests.test_backward import batch, build
from tests.tiny_models import make_hf_llama

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parent.parent


def rel_diff(a, b) -> float:
    """max |a - b| relative to max |b| (0 for two zero arrays): for gradients, equal up to float32 rounding."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    d = float(np.max(np.abs(a - b))) if b.size else 0.0
    return d / scale if scale else d


def rel_norm(a, b) -> float:
    """||a - b|| / ||b|| (Frobenius): how trained weights are compared. Summing the shards in another order
    rounds the gradients differently (~1e-7); AdamW divides each gradient by its own running size, so an
    entry whose gradient is nearly zero turns that into a visible step: after 6 steps a handful of entries
    (of ~10^4) differ by up to ~1e-5 of the tensor's largest even between two thread counts of one
    process, while the tensors as a whole agree to ~1e-8."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def tensors(run: Path, step: int, name: str) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / name))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# --- the shard arithmetic, in one process ----------------------------------------------------------


def test_shard_rows_split_a_batch_into_contiguous_blocks():
    for B in (1, 2, 5, 16):
        for world in range(1, B + 1):
            rows = [shard_rows(B, r, world) for r in range(world)]
            assert [i for s in rows for i in range(s.start, s.stop)] == list(range(B))
            assert max(s.stop - s.start for s in rows) - min(s.stop - s.start for s in rows) <= 1


@pytest.mark.parametrize("world", [2, 3])
def test_shards_add_up_to_the_whole_batch_with_unequal_target_counts(world):
    _, model, _ = build("llama-gqa-scaled-untied")
    ids, tgt = batch(model.config, B=5, T=8, seed=2)
    mask = np.zeros((5, 8), np.uint8)
    mask[0, 2:] = 1
    mask[3, :3] = 1
    mask[4, 5:] = 1  # 6, 0, 0, 3, 3 targets a row: each shard weighs by the whole batch's 12
    loss, grads = model.loss_and_grads(ids, tgt, loss_mask=mask)
    parts = [parallel_loss_and_grads(model, ids, tgt, loss_mask=mask, threads=2, chunk_tokens=8,
                                     rows=shard_rows(5, r, world)) for r in range(world)]
    assert abs(sum(p[0] for p in parts) - loss) <= 1e-6 * loss
    for name, g in grads.items():
        assert rel_diff(sum(p[1][name] for p in parts), g) <= 1e-5, name


def test_lora_dropout_masks_belong_to_rows_not_to_chunks_or_shards(tmp_path):
    base = make_hf_llama(tmp_path / "base", n_heads=4, n_kv_heads=2, tied=False, seed=3)
    model = scratchlm.load(base, progress=False)
    lora = LoRA(model.config, rank=4, targets="q,v,o,up,down", seed=1, dropout=0.3).attach(model)
    for name, a in lora.params.items():  # B off zero, so every gradient is non-trivial
        if name.endswith("lora_B"):
            a[...] = np.random.default_rng(len(name)).standard_normal(a.shape).astype(np.float32) * 0.1
    ids, tgt = np.random.default_rng(4).integers(0, 256, (2, 4, 10))
    lora.training = True
    try:
        runs = []
        for threads, chunk_tokens, world in ((1, 1000, 1), (2, 10, 1), (1, 1000, 2), (2, 20, 3)):
            parts = []
            for r in range(world):  # each rank's adapter has the same generator (the finetuner seeds it per step)
                lora.rng = np.random.default_rng(7)
                parts.append(parallel_loss_and_grads(model, ids, tgt, wrt="adapters", threads=threads,
                                                     chunk_tokens=chunk_tokens, rows=shard_rows(4, r, world) if world > 1 else None))
            runs.append((sum(p[0] for p in parts), {n: sum(p[1][n] for p in parts) for n in lora.params}))
        lora.training, lora.dropout = False, 0.0
        no_dropout, _ = model.loss_and_grads(ids, tgt, wrt="adapters")
    finally:
        lora.training = False
    assert abs(runs[0][0] - no_dropout) > 1e-4  # the masks did drop something
    for loss, grads in runs[1:]:  # one batch, cut four ways: the same masks, equal up to float rounding
        assert abs(loss - runs[0][0]) <= 1e-6 * runs[0][0]
        for n, g in grads.items():
            assert rel_diff(g, runs[0][1][n]) <= 1e-5, n


def test_a_single_process_is_world_one_and_a_half_set_environment_is_one_line(monkeypatch):
    d = Dist()
    g = {"a": np.ones((2, 3), np.float32)}
    assert d.is_main and d.world == 1 and d.all_reduce_grads(g) is g and d.all_reduce_sum([1.5]) == [1.5]
    d.barrier()
    d.check_same("nothing", 1, 2)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert Dist.from_env().world == 1  # not launched by torchrun: one process, torch not even started
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set: launch with torchrun"):
        Dist.from_env()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="RANK='2' with WORLD_SIZE=2"):
        Dist.from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DistributedError, match="WORLD_SIZE='two' is not an integer"):
        Dist.from_env()


# --- two gloo ranks under torchrun ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The work directory after tests/ddp_worker.py ran on 2 ranks, and torchrun's result."""
    work = tmp_path_factory.mktemp("ddp")
    import sysconfig
    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    (work / "corpus.txt").write_text(text[:12000], encoding="utf-8")
    qa = [{"prompt": "Who are you?", "response": "I am a tiny model."}, {"prompt": "Say hi", "response": "hi"},
          {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, or green."}]},
          {"prompt": "2+2?", "response": "4"},
          {"prompt": "A longer question?", "response": "A longer answer, with more tokens to learn."}]
    (work / "qa.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qa), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           str(ROOT / "tests" / "ddp_worker.py"), str(work)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the two-rank job hung: {e}")
    for name in ("full2", "half2", "ft2"):
        assert (work / name / "latest").is_file(), f"{name} missing; torchrun said:\n{r.stdout}\n{r.stderr}"
    return work, r


def _one_process(*argv):
    assert cli.main(list(argv)) == 0


def test_two_ranks_train_the_weights_of_one_process(ddp, tmp_path, monkeypatch):
    work, _ = ddp
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    _one_process("train", "--data", str(work / "corpus.txt"), "--out", str(tmp_path / "full1"), *ddp_worker.TRAIN)
    one, two = tensors(tmp_path / "full1", 6, "model.safetensors"), tensors(work / "full2", 6, "model.safetensors")
    assert one.keys() == two.keys()
    worst = max(rel_norm(two[n], one[n]) for n in one)
    assert worst <= 1e-6, worst
    at3 = tensors(work / "full2", 3, "model.safetensors")
    assert max(rel_norm(two[n], at3[n]) for n in two) > 1e-3  # steps 4-6 moved the weights by far more
    # rank 0 alone wrote the log: one record per step, the losses of one process
    log1, log2 = records(tmp_path / "full1"), records(work / "full2")
    steps2 = [r for r in log2 if "loss" in r]
    assert [r["step"] for r in steps2] == [1, 2, 3, 4, 5, 6]
    for a, b in zip([r for r in log1 if "loss" in r], steps2):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) and a["lr"] == b["lr"]
    ev1, ev2 = [r for r in log1 if "val_loss" in r], [r for r in log2 if "val_loss" in r]
    assert len(ev1) == len(ev2) == 3  # steps 0, 3, 6; each rank scored half the batches
    for a, b in zip(ev1, ev2):
        assert abs(a["val_loss"] - b["val_loss"]) <= 1e-5 * a["val_loss"]
    assert sum("sample" in r for r in log2) == sum("sample" in r for r in log1)


def test_a_two_rank_run_resumed_continues_exactly(ddp, monkeypatch):
    work, _ = ddp
    full = tensors(work / "full2", 6, "model.safetensors")
    # stopped during step 4 and resumed on 2 ranks: the same weights, optimizer moments and log, bit for bit
    resumed = tensors(work / "half2", 6, "model.safetensors")
    assert all(np.array_equal(resumed[n], full[n]) for n in full)
    opt_full, opt_res = tensors(work / "full2", 6, "optimizer.safetensors"), tensors(work / "half2", 6, "optimizer.safetensors")
    assert all(np.array_equal(opt_res[n], opt_full[n]) for n in opt_full)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tok_s"} for r in rs]
    assert strip(records(work / "half2")) == strip(records(work / "full2"))
    # the same checkpoint of step 3, resumed by one process
    assert (work / "half3" / "latest").read_text().strip().endswith("step-0000003")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    _one_process("train", "--resume", str(work / "half3"), "--no-progress", "-q")
    one = tensors(work / "half3", 6, "model.safetensors")
    worst = max(rel_norm(one[n], full[n]) for n in full)
    assert worst <= 1e-6, worst


def test_two_rank_lora_finetuning_equals_one_process(ddp, tmp_path, monkeypatch):
    work, _ = ddp
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    two = tensors(work / "ft2", 4, "model.safetensors")
    for threads in ("2", "1"):  # the run's --threads 1 replaced: the later one wins
        _one_process("finetune", "-m", str(work / "full2"), "--data", str(work / "qa.jsonl"), "--out",
                     str(tmp_path / f"ft{threads}"), *ddp_worker.FINETUNE, "--threads", threads)
    # 3 rows a step: the ranks take rows 0-1 and 2, the chunks one process cuts with 2 threads: bit for bit
    same = tensors(tmp_path / "ft2", 4, "model.safetensors")
    assert same.keys() == two.keys() and any(k.endswith("lora_B") for k in two)
    assert all(np.array_equal(same[n], two[n]) for n in two)
    one = tensors(tmp_path / "ft1", 4, "model.safetensors")  # rows 0-2 in one call: other rounding
    worst = max(rel_norm(two[n], one[n]) for n in one)
    assert worst <= 1e-6, worst
    assert any(np.abs(v).max() > 0 for k, v in two.items() if k.endswith("lora_B"))  # B left zero: it learned
    assert (work / "ft2" / "adapter_model.safetensors").is_file()  # rank 0 wrote the PEFT adapter
    l1 = [r["loss"] for r in records(tmp_path / "ft1") if "loss" in r]
    l2 = [r["loss"] for r in records(work / "ft2") if "loss" in r]
    assert len(l2) == 4 and all(abs(a - b) <= 1e-5 * a for a, b in zip(l1, l2))


def test_torch_tensor_gradients_are_summed_too(ddp):
    work, _ = ddp
    got = json.loads((work / "tensor_sum.json").read_text())
    assert got == {"torch": [[3.0, 3.0, 3.0], [3.0, 3.0, 3.0]], "numpy_view": [[1.0, 3.0], [5.0, 7.0]]}


def test_a_failing_rank_ends_the_job_with_its_message(ddp):
    work, r = ddp
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("scratchlm: error:")]
    assert "scratchlm: error: [rank 1] a rank failing on purpose" in lines, r.stderr[-3000:]
    # rank 0, waiting for rank 1's gradients, ended too (its all-reduce failed, or torchrun stopped it)
    assert all("Traceback" not in line for line in lines)
    assert (work / "fail" / "latest").exists() is False


def test_fewer_rows_than_ranks_is_refused_on_every_rank_before_writing(ddp):
    work, r = ddp
    for rank in (0, 1):
        assert f"scratchlm: error: [rank {rank}] --batch 1 is smaller than the 2 ranks: each needs a row" in r.stderr
    assert not (work / "small").exists()
