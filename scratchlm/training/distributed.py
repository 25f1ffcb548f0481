"""Data-parallel training on torch.distributed: N processes (ranks) train one model together.

    torchrun --nproc-per-node 2 -m scratchlm train --data corpus.txt --out runs/ddp

Every rank holds the whole model and optimizer, and draws the same global batch from the same seeded
sampler; it then computes our own backward (backward.py) on its shard of that batch only, a contiguous
block of rows (parallel.shard_rows):

    rank r:  loss_r = sum_{chunks j of shard r} n_j * loss_j / N     grads_r = sum_j (n_j / N) * grads_j
    all-reduce (sum over ranks):  loss = sum_r loss_r    grads = sum_r grads_r

n_j is the number of targets chunk j's loss averages over (B_j*T, or its loss-mask count) and N that of
the whole global batch, which every rank counts itself from the batch it drew: the sum over ranks is
the global batch's mean loss and gradient, whatever the shards' target counts (parallel.py's rule,
one level up). Every rank then clips and takes the same AdamW step on the same numbers, so the weights
stay identical on every rank without ever being sent. Rank 0 alone writes the run directory (logs,
plots, checkpoints); the others only read it.

The gradients travel as one flat float32 buffer per step: one collective instead of one per tensor
(dozens a step), through a torch.from_numpy view of a NumPy buffer (no copy between NumPy and torch);
what comes back are views of that buffer. Backend: gloo for NumPy gradients on the CPU, NCCL when the
gradients are CUDA torch tensors (a model on the torch backend on a GPU: flattened on the device).

A rank that fails prints its one-line error and exits 1; torchrun then stops the other ranks (and a
collective whose peer has died fails at once with gloo: DistributedError below), so a job never hangs.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re

import numpy as np

from ..errors import ScratchLMError

TIMEOUT = datetime.timedelta(minutes=30)  # a collective waiting longer than this fails (torch's own default)
_JOINED = None  # the Dist of the process group this process joined: one per process, kept until it exits


class DistributedError(ScratchLMError, OSError):
    """The process group could not start, or a collective failed (another rank died or disagrees)."""


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise DistributedError(f"environment variable {name}={v!r} is not an integer") from None


def local_world_size() -> int:
    """Ranks on this node (torchrun's LOCAL_WORLD_SIZE; 1 outside a distributed launch)."""
    n = _env_int("LOCAL_WORLD_SIZE")
    return n if n and n > 0 else 1


class Dist:
    """This process's place in a data-parallel job: rank, world size, the backend and its device.

    Dist() is a single process (world size 1): every collective is then the identity, so the training
    loops run the same code with or without torch.distributed."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None,
                 device: str = "cpu"):
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)
        self.backend, self.device = backend, device
        self._buf = None  # the flat gradient buffer, reused from step to step

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes logs, plots and checkpoints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world}, backend={self.backend})"

    # --- start and stop -------------------------------------------------------------------------

    @classmethod
    def from_env(cls, device: str = "cpu") -> "Dist":
        """Join the job torchrun (or any launcher setting RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
        MASTER_PORT) started; a single process when WORLD_SIZE is unset or 1. `device` "cuda..." picks
        NCCL (one GPU per local rank), anything else gloo.

        The group is joined once per process and left when it exits: later calls return the same Dist
        (a group destroyed and made again on torchrun's store can read the old group's addresses)."""
        global _JOINED
        if _JOINED is not None:
            return _JOINED
        world = _env_int("WORLD_SIZE")
        if world is None or world == 1:
            return cls()
        rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
        if world < 1 or rank is None or not 0 <= rank < world:
            raise DistributedError(f"RANK={os.environ.get('RANK')!r} with WORLD_SIZE={world}: launch with torchrun")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise DistributedError(f"WORLD_SIZE={world} but {name} is not set: launch with torchrun")
        try:
            import torch
            import torch.distributed as tdist
        except ImportError:
            raise DistributedError("WORLD_SIZE > 1 asks for data-parallel training, which needs torch: "
                                   "pip install 'scratchlm[distributed]'") from None

        local = rank if local is None else local
        if str(device).startswith("cuda"):
            if not torch.cuda.is_available() or local >= torch.cuda.device_count():
                raise DistributedError(f"rank {rank}: no CUDA device {local} for NCCL "
                                       f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} here)")
            torch.cuda.set_device(local)
            backend, dev = "nccl", f"cuda:{local}"
        else:
            backend, dev = "gloo", "cpu"
        try:
            tdist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise DistributedError(f"rank {rank}: cannot join the process group at "
                                   f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({_first_line(e)})") from None
        d = cls(rank, world, local, backend, dev)
        d._share_blas()
        atexit.register(d.close)
        _JOINED = d
        return d

    def _share_blas(self) -> None:
        """BLAS outside the training step (evaluation, samples) gets this rank's share of the node's cores,
        so that N ranks on one machine do not run N times as many threads as it has cores."""
        from threadpoolctl import threadpool_limits

        from .parallel import usable_cores
        threadpool_limits(limits=max(1, usable_cores() // local_world_size()), user_api="blas")

    def close(self) -> None:
        """Leave the process group (at exit: atexit)."""
        if self.world > 1:
            import torch.distributed as tdist
            if tdist.is_initialized():
                tdist.destroy_process_group()

    def check_batch(self, batch: int) -> None:
        """Every rank needs at least one row of each batch (one-line error otherwise)."""
        if self.world > 1 and batch < self.world:
            raise ValueError(f"--batch {batch} is smaller than the {self.world} ranks: each needs a row")

    # --- collectives ------------------------------------------------------------------------------

    def _all_reduce(self, t, what: str, op=None) -> None:
        import torch.distributed as tdist

        try:
            tdist.all_reduce(t, op=op or tdist.ReduceOp.SUM)
        except RuntimeError as e:  # DistBackendError included: a peer that died closes its connections
            raise DistributedError(f"the all-reduce of {what} failed: another rank "
                                   f"stopped or cannot be reached ({_first_line(e)})") from None

    def all_reduce_grads(self, grads: dict) -> dict:
        """The sum over all ranks of `grads` (name -> array, the same names and shapes on every rank):
        one all-reduce of one flat buffer; returns views of it, shaped like the inputs."""
        if self.world == 1:
            return grads
        first = next(iter(grads.values()))
        if isinstance(first, np.ndarray):
            import torch

            n = sum(int(g.size) for g in grads.values())
            if self._buf is None or self._buf.size != n:
                self._buf = np.empty(n, np.float32)  # [sum of sizes]
            buf, out, o = self._buf, {}, 0
            for name, g in grads.items():
                view = buf[o:o + g.size].reshape(g.shape)  # [n_g] -> the gradient's shape, a view
                np.copyto(view, g, casting="same_kind")
                out[name], o = view, o + g.size
            self._all_reduce(torch.from_numpy(buf), "the gradients")  # a view of buf: reduced in place
            return out
        # torch tensors (a model on the torch backend, NCCL on CUDA): one flat tensor on their device
        import torch

        flat = torch.cat([g.reshape(-1) for g in grads.values()])  # [sum of sizes]
        self._all_reduce(flat, "the gradients")
        out, o = {}, 0
        for name, g in grads.items():
            out[name], o = flat[o:o + g.numel()].view(g.shape), o + g.numel()
        return out

    def all_reduce_sum(self, values, what: str = "the losses") -> list[float]:
        """Element-wise sums over the ranks of a few float64 numbers (losses)."""
        if self.world == 1:
            return [float(v) for v in values]
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        self._all_reduce(t, what)
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every rank (an all-reduce of one number: the same call on gloo and NCCL)."""
        if self.world > 1:
            self.all_reduce_sum([0.0], "a barrier")

    def check_same(self, what: str, *values: int) -> None:
        """Raise on every rank unless all ranks hold the same integers (the step a run resumes at, the
        number of parameters...): a mismatch would otherwise sum gradients that do not belong together."""
        if self.world == 1:
            return
        import torch
        import torch.distributed as tdist

        t = torch.tensor([float(v) for v in values] + [-float(v) for v in values], dtype=torch.float64,
                         device=self.device)
        self._all_reduce(t, what, op=tdist.ReduceOp.MAX)
        hi, lo = t[:len(values)].tolist(), [-v for v in t[len(values):].tolist()]
        if hi != lo:
            raise DistributedError(f"the ranks disagree on {what} "
                                   f"(this rank {list(values)}, others between {lo} and {hi})")


def _first_line(e: BaseException) -> str:
    """The gist of a torch.distributed error: its first line, without gloo's source location and advice."""
    s = str(e).strip()
    s = s.splitlines()[0] if s else type(e).__name__
    s = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", s)  # "[.../gloo/transport/tcp/pair.cc:553] "
    return s.split(" This is typically caused")[0].rstrip(". ")
