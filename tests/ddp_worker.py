"""One rank of the data-parallel tests (test_distributed.py starts two with torchrun): several runs through
`scratchlm train` / `finetune` in one launch, since starting torch in each process costs seconds.

    python -m torch.distributed.run --nproc-per-node 2 tests/ddp_worker.py WORK_DIR

WORK_DIR holds corpus.txt and qa.jsonl; the runs go beside them:
  full2   6 steps, uninterrupted
  half2   the same run stopped during step 4 (after the checkpoint of step 3), then resumed on 2 ranks
  half3   a copy of half2 at step 3 (made by rank 0 before the resume), for the test to resume on 1 rank
  ft2     LoRA fine-tuning of full2 (dropout on, shards with unequal target counts)
  small   --batch 1 on 2 ranks: refused on both before anything is written
  tensor_sum.json  Dist.all_reduce_grads of torch tensors and of a strided NumPy view
  fail    rank 1 fails at step 2: the job must end with its message, not hang
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from scratchlm import cli
from scratchlm.training.distributed import Dist
from scratchlm.training.trainer import Trainer

TRAIN = ["--tokenizer", "bpe:300", "--layers", "2", "--dim", "32", "--heads", "4", "--kv-heads", "2", "--context", "32",
         "--batch", "5", "--accum", "2", "--steps", "6", "--lr", "3e-3", "--warmup", "2", "--eval-every", "3",
         "--save-every", "3", "--seed", "3", "--threads", "1", "--no-progress", "-q"]
FINETUNE = ["--rank", "2", "--alpha", "4", "--dropout", "0.1", "--targets", "q,v,down", "--steps", "4", "--lr", "1e-2",
            "--batch", "3", "--context", "32", "--seed", "5", "--save-every", "2", "--threads", "1", "--no-progress", "-q"]


def run(*argv) -> int:
    return cli.main(list(argv))


def stop_at(step: int, exc):
    """Make Trainer.train_step raise `exc` when it would start step `step` (0-based count of steps done)."""
    original = Trainer.train_step

    def train_step(self):
        if self.step == step and exc is not None:
            raise exc
        return original(self)

    Trainer.train_step = train_step
    return original


def main(work: Path) -> int:
    rank = int(os.environ["RANK"])
    corpus, qa = str(work / "corpus.txt"), str(work / "qa.jsonl")
    if run("train", "--data", corpus, "--out", str(work / "full2"), *TRAIN):
        return 1
    original = stop_at(3, KeyboardInterrupt())
    if run("train", "--data", corpus, "--out", str(work / "half2"), *TRAIN) != 130:
        return 1
    Trainer.train_step = original
    if rank == 0:
        shutil.copytree(work / "half2", work / "half3")
    if run("train", "--resume", str(work / "half2"), "--threads", "1", "--no-progress", "-q"):
        return 1
    if run("finetune", "-m", str(work / "full2"), "--data", qa, "--out", str(work / "ft2"), *FINETUNE):
        return 1
    if run("train", "--data", corpus, "--out", str(work / "small"), *TRAIN, "--batch", "1") != 1:
        return 1  # fewer rows than ranks: a one-line error on both ranks, before anything is written
    import torch
    dist = Dist.from_env()  # the group the runs above joined
    t = dist.all_reduce_grads({"w": torch.full((2, 3), rank + 1.0)})
    big = np.zeros((2, 4), np.float32)
    big[:, ::2] = np.array([[0, 1], [2, 3]], np.float32) + rank
    v = dist.all_reduce_grads({"w": big[:, ::2]})  # a strided view: copied into the flat buffer
    if rank == 0:
        (work / "tensor_sum.json").write_text(json.dumps({"torch": t["w"].tolist(), "numpy_view": v["w"].tolist()}))
    stop_at(2, ValueError("a rank failing on purpose") if rank == 1 else None)
    return run("train", "--data", corpus, "--out", str(work / "fail"), *TRAIN)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
