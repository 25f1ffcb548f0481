"""Continuous batching: one thread runs the model for every request at once.

Each request (each of its `n` choices) is a `Sequence` with its own KV cache, sampler and detokenizer.
The scheduler thread loops:

1. admit waiting sequences while fewer than `parallel` are active (the rest wait in a bounded queue:
   `submit` refuses past it, and the server answers 503);
2. drop the sequences whose client went away (their caches are freed at once);
3. run one chunk (`prefill_chunk` tokens) of the oldest prompt still being read, so a long prompt
   delays the others by one chunk at a time instead of freezing them;
4. advance every sequence that has a token to feed by one decode step, all of them in one
   `Model.decode_batch` (up to kernels.MATVEC_MAX_ROWS per call: each weight is read once for the group).

After each forward the sequence samples its next token exactly as generate.py's loop does (same
Sampler, same Detokenizer, same stop rules), so a request's output is what `scratchlm generate` / `chat`
gives alone with the same seed: bit for bit on packed weights (see Model.decode_batch), for prompts of
up to `prefill_chunk` tokens. A longer prompt is read in chunks of `prefill_chunk` where generate reads
up to model.PREFILL_CHUNK (512) at once; attention over the cache then sums in another order than the
first chunk's blocked causal attention (logits agree to ~1e-5), and a greedy tie can rarely go the
other way.

What a sequence produces goes to its `sink(event)`, called on this thread once per step at most:
    {"text": str, "tokens": [{"id", "logprob", "top"}], "finish_reason": None | "stop" | "length" | "abort",
     "error": None | str, "prompt_tokens": int, "completion_tokens": int}
("abort": the server is shutting down; "tokens" has logprobs only when the sequence asked for them.)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..generate import Detokenizer, stop_token_ids
from ..kernels import MATVEC_MAX_ROWS
from ..model import to_numpy
from ..sampling import Sampler, SamplingParams, log_softmax

log = logging.getLogger("scratchlm.serve")

# Prompt tokens per prefill chunk: ~0.7 s of the default model on 2 cores, the longest pause a new
# prompt puts into the others' streams.
PREFILL_CHUNK = 256


class QueueFull(Exception):
    """Every slot is busy and the waiting queue is full."""


class ShuttingDown(Exception):
    """The scheduler is stopping and takes no new work."""


@dataclass
class SequenceParams:
    """What one sequence generates: the prompt ids and the sampling options (validated by the caller)."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's logprob and the k most likely


class Sequence:
    """One generation inside the scheduler. `cancel()` may be called from any thread."""

    def __init__(self, params: SequenceParams, sink: Callable[[dict], None]):
        self.params = params
        self.sink = sink
        self.cancelled = False
        self.finished = False
        self.cache = None
        self.prefilled = 0  # prompt tokens already through the model
        self.next_token: int | None = None  # sampled, to be fed at position `pos`
        self.pos = 0
        self.history = list(params.ids)
        self.generated: list[int] = []
        self.sampler = Sampler(params.sampling, seed=params.seed)
        self.detok = None  # made when admitted (needs the tokenizer)
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True


def _chunks(items: list, size: int):
    for a in range(0, len(items), size):
        yield items[a:a + size]


class Scheduler:
    """Runs `model` for many sequences at once on one thread (see the module docstring)."""

    def __init__(self, model, *, parallel: int = 8, queue_size: int = 64, prefill_chunk: int = PREFILL_CHUNK):
        if parallel < 1 or queue_size < 0 or prefill_chunk < 1:
            raise ValueError(f"bad scheduler sizes: parallel={parallel}, queue={queue_size}, chunk={prefill_chunk}")
        self.model = model
        self.parallel = parallel
        self.queue_size = queue_size
        self.prefill_chunk = prefill_chunk
        self.stop_ids = stop_token_ids(model)
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._active: list[Sequence] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.stats = {"decode_steps": 0, "tokens_decoded": 0, "max_batch": 0, "requests_cancelled": 0,
                      "errors": 0}

    # --- the other threads' side -----------------------------------------------------------------

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="scratchlm-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the sequences of one request, all or none: QueueFull past parallel + queue_size."""
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            busy = len(self._active) + len(self._waiting)
            if busy + len(seqs) > self.parallel + self.queue_size:
                raise QueueFull(f"the server is busy ({len(self._active)} sequences running, {len(self._waiting)} "
                                f"waiting, queue of {self.queue_size}); retry later")
            self._waiting.extend(seqs)
            self._cv.notify()

    def shutdown(self) -> None:
        """Stop taking work; every sequence still running or waiting ends with finish_reason "abort"."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def counts(self) -> dict:
        with self._cv:
            return {"slots_idle": max(0, self.parallel - len(self._active)), "slots_processing": len(self._active),
                    "requests_waiting": len(self._waiting), **self.stats}

    # --- the scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stopping:
                    left = self._active + list(self._waiting)
                    self._active, self._waiting = [], deque()
                    break
                while self._waiting and len(self._active) < self.parallel:
                    s = self._waiting.popleft()
                    if not s.cancelled:
                        self._active.append(s)
                    else:
                        self.stats["requests_cancelled"] += 1
            self._step()
        for s in left:
            if not s.finished and not s.cancelled:
                self._finish(s, "abort", s.detok.finish() if s.detok else "", [])

    def _step(self) -> None:
        for s in [s for s in self._active if s.cancelled]:  # clients gone: free their slots first
            self.stats["requests_cancelled"] += 1
            self._retire(s)
        reading = [s for s in self._active if s.prefilled < len(s.params.ids)]
        if reading:
            self._guard([reading[0]], self._prefill, reading[0])
        ready = [s for s in self._active if s.next_token is not None and not s.finished]
        for group in _chunks(ready, MATVEC_MAX_ROWS):
            self._guard(group, self._decode, group)

    def _guard(self, seqs: list[Sequence], fn, arg) -> None:
        """Run fn(arg); if it raises, those sequences end with an error (the server keeps serving)."""
        try:
            fn(arg)
        except Exception as e:  # noqa: BLE001 - any failure inside the model must not stop the loop
            log.exception("generation failed")
            self.stats["errors"] += 1
            for s in seqs:
                if not s.finished:
                    self._emit(s, {"text": "", "tokens": [], "finish_reason": None,
                                   "error": f"{type(e).__name__}: {e}".splitlines()[0]})
                    self._retire(s)

    def _prefill(self, s: Sequence) -> None:
        ids = s.params.ids
        if s.cache is None:
            s.cache = self.model.new_cache(len(ids) + s.params.max_tokens)
            s.detok = Detokenizer(self.model.tokenizer, s.params.stop)
        a = s.prefilled
        b = min(a + self.prefill_chunk, len(ids))
        last = b == len(ids)
        out = self.model.forward(np.asarray([ids[a:b]]), s.cache, a, last_only=True, head=last)  # [1,1,V] at the end
        s.prefilled = b
        if last:
            s.pos = len(ids)
            self._advance(s, to_numpy(out[0, -1]))

    def _decode(self, group: list[Sequence]) -> None:
        logits = self.model.decode_batch([s.next_token for s in group], [s.cache for s in group],
                                         [s.pos for s in group])  # [B,V]
        logits = to_numpy(logits)
        self.stats["decode_steps"] += 1
        self.stats["tokens_decoded"] += len(group)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(group))
        for b, s in enumerate(group):
            s.pos += 1
            self._advance(s, logits[b])

    def _advance(self, s: Sequence, logits: np.ndarray) -> None:
        """Sample the next token from logits [V] and tell the client, as generate.py's loop does."""
        p = s.params
        s.next_token = None
        tok = s.sampler.sample(logits, s.history, s.generated)
        tokens = []
        if p.logprobs is not None:
            lp = log_softmax(logits)  # [V]
            top = []
            if p.logprobs > 0:
                best = np.argpartition(-lp, p.logprobs - 1)[:p.logprobs]
                top = [(int(i), float(lp[i])) for i in best[np.argsort(-lp[best], kind="stable")]]
            tokens.append({"id": tok, "logprob": float(lp[tok]), "top": top})
        if tok in self.stop_ids and not p.ignore_eos:
            # the end token itself is neither text nor a counted completion token, as in generate
            self._finish(s, "stop", s.detok.finish(), [])
            return
        s.generated.append(tok)
        s.history.append(tok)
        piece = s.detok.push(tok)
        if s.detok.stopped:
            self._finish(s, "stop", piece, tokens)
        elif len(s.generated) >= p.max_tokens:
            self._finish(s, "length", piece + s.detok.finish(), tokens)
        else:
            s.next_token = tok
            if piece or tokens:
                self._emit(s, {"text": piece, "tokens": tokens, "finish_reason": None, "error": None})

    def _finish(self, s: Sequence, reason: str, piece: str, tokens: list) -> None:
        self._emit(s, {"text": piece, "tokens": tokens, "finish_reason": reason, "error": None})
        self._retire(s)

    def _emit(self, s: Sequence, event: dict) -> None:
        event["prompt_tokens"] = len(s.params.ids)
        event["completion_tokens"] = len(s.generated)
        try:
            s.sink(event)
        except Exception:  # noqa: BLE001 - the receiving side is gone (its event loop closed)
            s.cancelled = True

    def _retire(self, s: Sequence) -> None:
        s.finished = True
        s.next_token = None
        s.cache = None  # the KV cache goes back to the allocator now, not when the request object dies
        with self._cv:
            if s in self._active:
                self._active.remove(s)
