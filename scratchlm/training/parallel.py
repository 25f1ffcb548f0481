"""A training step on every CPU core: the batch cut into chunks whose forward and backward run in threads.

NumPy runs each element-wise op (softmax, SiLU, RoPE, the norms and their backwards: about half of a
small model's step) on one core, and BLAS only spreads the matmuls. Data parallelism spreads both:

    chunk j = a few rows of the batch  ->  (loss_j, grads_j) = model.loss_and_grads(chunk j)
    loss  = sum_j n_j * loss_j / N        grads = sum_j (n_j / N) * grads_j

n_j is the number of targets chunk j's loss averages over (B_j*T, or its loss-mask count) and N their
sum, so the result is the loss and gradient of the whole batch (equal to one call up to float
rounding). Each of n threads takes the next chunk not yet taken, so a core that runs slower (a shared
machine's often does) takes fewer; the results are added up in chunk order whoever finishes first, so
a step is deterministic, and two thread counts that cut a batch into the same chunks give the same
numbers bit for bit (chunk sizes depend on the thread count only for a batch of fewer than
threads x CHUNK_TOKENS tokens, which is cut into at most ceil(B / threads) rows a chunk). It works because the backward keeps no state between calls,
and NumPy releases the GIL inside ufuncs, reductions and BLAS calls: with one BLAS thread each, n
threads keep n cores busy.

`keep_freed_memory` is the other half of a fast CPU step: see its docstring.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import ops

# Tokens per forward/backward call, at most. A step over B rows runs as chunks of whole rows of about this
# many tokens (fewer for a batch too small to share out otherwise): large enough that Python's cost per op
# (~2 ms a chunk) stays small, small enough to share a batch out. Measured on the default Llama shape with
# 2 threads (B=16, T=128, 2048 tokens a step), 512 against 1024: 0.96x the time at 1024 (B=32, T=64:
# 0.96x; B=8, T=256: 0.91x); 256 tokens took 1.14x the time of 512, and 2048 (B=64) 1.02x that of 1024.
CHUNK_TOKENS = 1024

_POOLS: dict[int, ThreadPoolExecutor] = {}
_BLAS = None  # threadpoolctl's controller, made once (finding the loaded BLAS libraries scans them all)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads) -> int:
    """The --threads of a run: a positive count as given, or 0 for every usable core, shared out among the
    data-parallel ranks of this node (distributed.py) when there are several (one-line error otherwise)."""
    from .distributed import local_world_size

    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 0:
        raise ValueError(f"--threads must be a non-negative integer, got {threads!r}")
    return threads or max(1, usable_cores() // local_world_size())


def _pool(n: int) -> ThreadPoolExecutor:
    if n not in _POOLS:
        _POOLS[n] = ThreadPoolExecutor(n, thread_name_prefix="scratchlm-step")
    return _POOLS[n]


def _one_blas_thread():
    """A context in which BLAS runs on the calling thread only (each step thread brings its own core)."""
    global _BLAS
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def shard_rows(batch: int, rank: int, world: int) -> slice:
    """The rows of a global batch of `batch` rows that rank `rank` of `world` computes: contiguous, as even
    as the count allows, the first ranks taking one more where it does not divide. Two ranks thus take the
    chunks one process cuts with 2 threads (ceil(B / 2) rows, then the rest) when a shard is one chunk:
    the same numbers bit for bit."""
    q, r = divmod(batch, world)
    lo = rank * q + min(rank, r)
    return slice(lo, lo + q + (rank < r))


def parallel_loss_and_grads(model, input_ids, target_ids, loss_mask=None, wrt: str = "all", threads: int = 1,
                           chunk_tokens: int = CHUNK_TOKENS, rows: slice | None = None):
    """model.loss_and_grads over the batch cut into chunks of whole rows, at most about `chunk_tokens` tokens
    and at most ceil(B / threads) rows (so a small batch is still shared out), which `threads` threads take
    one by one and run side by side (see the module doc).

    Same arguments and result as Model.loss_and_grads. With one chunk (a small batch) or a model on another
    array backend (which threads its own ops) it is exactly that call. LoRA dropout (model.adapter) draws
    each row's masks from its own generator, spawned from the adapter's one per row of the batch, so the
    masks do not depend on how the batch is cut (threads, chunks or data-parallel ranks).

    rows: compute only these rows of the batch (a data-parallel rank's shard, distributed.py), still weighted
    by the target count N of the whole batch: the results are then this shard's part of the batch's loss
    and gradients, n_shard / N times its own mean, and the parts of all shards add up to the whole batch's.
    """
    def whole_batch():  # one call: a batch of one chunk, another backend, or input that call rejects in one line
        return model.loss_and_grads(input_ids, target_ids, loss_mask=loss_mask, wrt=wrt)

    ids = np.asarray(input_ids)
    ad = getattr(model, "adapter", None)
    numpy = model.xp is ops.array_namespace(np.empty(0))
    if ids.ndim != 2 or not ids.shape[0] or (rows is None and not numpy):
        return whole_batch()
    B, T = ids.shape
    row_rngs = ad.rng.spawn(B) if ad is not None else None  # one dropout generator per row of the whole batch
    lo, hi, _ = (rows or slice(0, B)).indices(B)
    tgt = np.asarray(target_ids)
    mask = None if loss_mask is None else np.asarray(loss_mask)
    if tgt.shape != ids.shape or (mask is not None and mask.shape != ids.shape):
        return whole_batch()  # raises the plain call's one-line error
    total = int(np.count_nonzero(mask)) if mask is not None else ids.size  # N: targets of the whole batch
    per = max(1, min(int(chunk_tokens) // T, -(-(hi - lo) // max(1, int(threads)))))  # a small batch still shared out
    if not numpy:  # another backend threads its own ops: the shard in one call
        per = max(1, hi - lo)
    chunks = [slice(a, min(a + per, hi)) for a in range(lo, hi, per)]
    if rows is None and len(chunks) == 1:
        return _with_rngs(ad, row_rngs, whole_batch)
    counts = [int(np.count_nonzero(mask[c])) if mask is not None else ids[c].size for c in chunks]
    jobs = [(c, n) for c, n in zip(chunks, counts) if n]  # a chunk whose mask selects nothing adds nothing
    if not total:
        return whole_batch()  # raises "the loss mask selects no target"
    if not jobs:  # a shard with no target of the batch's: nothing to add (zeros, shaped like the gradients)
        _, g = _with_rngs(ad, row_rngs and row_rngs[lo:lo + 1],
                          lambda: model.loss_and_grads(ids[lo:lo + 1], tgt[lo:lo + 1], wrt=wrt, grad_scale=0.0))
        return 0.0, g

    n_threads = max(1, min(int(threads), len(jobs))) if numpy else 1
    sums = _InOrderSum(len(jobs), ahead=n_threads)

    def run(_):
        """Take chunks until none is left; each gives n_j * loss_j and (n_j / N) * grads_j (n_j: the chunk's
        target count), the weight applied inside the backward (grad_scale), so that adding up is all that is left."""
        while (j := sums.take()) is not None:
            c, n = jobs[j]
            try:
                l, g = _with_rngs(ad, row_rngs and row_rngs[c], lambda: model.loss_and_grads(
                    ids[c], tgt[c], loss_mask=None if mask is None else mask[c], wrt=wrt, grad_scale=n / total))
            except BaseException:
                sums.stop()  # the other threads take nothing more (nor wait for this chunk's turn)
                raise
            sums.add(j, n * float(l), g)

    with _one_blas_thread():
        if n_threads == 1:
            run(0)
        else:
            list(_pool(n_threads).map(run, range(n_threads)))
    return sums.loss / total, sums.grads


def _with_rngs(ad, rngs, call):
    """call() with the adapter's dropout masks drawn from `rngs`, one generator per row (none: no adapter)."""
    if ad is None:
        return call()
    ad.set_thread_rng(rngs)
    try:
        return call()
    finally:
        ad.set_thread_rng(None)


class _InOrderSum:
    """The sum of the chunks' losses and gradients, taken in chunk order whichever thread finishes first,
    so that a step's numbers do not depend on which thread ran which chunk. A result that arrives before
    its turn waits for it; a thread takes no chunk more than `ahead` past the next one to add, so at most
    ahead - 1 results (each a full set of gradients) ever wait."""

    def __init__(self, n_chunks: int, ahead: int):
        self.loss, self.grads = 0.0, None
        self._n, self._ahead, self._taken = n_chunks, max(1, ahead), 0
        self._next, self._waiting, self._stopped = 0, {}, False
        self._turn = threading.Condition()

    def take(self) -> int | None:
        """The index of the next chunk nobody has taken yet (waiting while it is too far ahead of the sum),
        or None when all are taken or a thread has failed."""
        with self._turn:
            self._turn.wait_for(lambda: self._stopped or self._taken < self._next + self._ahead)
            if self._stopped or self._taken == self._n:
                return None
            self._taken += 1
            return self._taken - 1

    def add(self, j: int, loss: float, grads: dict) -> None:
        with self._turn:
            self._waiting[j] = (loss, grads)
            while self._next in self._waiting:
                loss, grads = self._waiting.pop(self._next)
                self._next += 1
                self.loss += loss
                if self.grads is None:
                    self.grads = grads  # the chunk's own fresh arrays (some are disjoint views of one fused gradient)
                else:
                    for k, v in grads.items():
                        self.grads[k] += v
            self._turn.notify_all()

    def stop(self) -> None:
        """A chunk failed: let every thread stop taking chunks."""
        with self._turn:
            self._stopped = True
            self._turn.notify_all()


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    A step allocates and frees the same large activations every time; by default glibc hands big
    blocks back (munmap / trim) and the next step page-faults them in again (zeroed by the kernel).
    Measured on a small Llama step: 172-198 ms with the defaults, 117-120 ms with the heap kept.
    mallopt(M_TRIM_THRESHOLD, M_MMAP_THRESHOLD) keeps them. One arena for all threads (M_ARENA_MAX): the
    step threads would otherwise get arenas of their own, whose 64 MiB heaps glibc unmaps as soon as they
    empty (whatever the trim threshold), and a 2-thread step faulted ~2,000 pages in again each time; with
    one arena ~20, and the step took 0.96-0.98x the time (steps taking turns, Llama and GPT-2 defaults).
    Call it before the step threads first allocate. A no-op where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks up to 32 MiB come from the reusable heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30)  # keep up to 1 GiB of freed heap instead of trimming it
    mallopt(M_ARENA_MAX, 1)  # every thread allocates from that one heap
