"""Choosing the next token from a vector of logits: greedy, temperature, top-k, top-p, min-p, repetition penalty,
and OpenAI's presence and frequency penalties.

Sampling runs on the host in NumPy, one small function per step. Each filter takes logits [V] and returns
new logits [V] where the removed entries are ``-inf``, so the steps compose and the final softmax gives
removed tokens exactly zero probability. The steps run in the order Hugging Face ``transformers`` uses
for the same options (repetition penalty, temperature, top-k, top-p, min-p), and each one matches the
corresponding ``transformers`` logits processor (tests/test_sampling.py checks that). The presence and
frequency penalties (the OpenAI API's; transformers has none) come right after the repetition penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` means greedy (argmax); the defaults filter nothing."""

    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0  # 0 = off
    frequency_penalty: float = 0.0  # 0 = off

    def validate(self) -> "SamplingParams":
        """Raise a one-line ValueError for an out-of-range option; return self so calls can chain."""
        t, k, p, m, r = self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty
        # `not (x >= 0)` is also true for NaN, which must not slip through
        if not _is_real(t) or not (t >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {t!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k!r}")
        if not _is_real(p) or not (0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {p!r}")
        if not _is_real(m) or not (0 <= m < 1):
            raise ValueError(f"min_p must be in [0, 1) (0 = off), got {m!r}")
        if not _is_real(r) or not (r > 0) or math.isinf(r):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            x = getattr(self, name)
            if not _is_real(x) or not (-2 <= x <= 2):
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {x!r}")
        return self


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities [V] from logits [V]; ``-inf`` entries get probability exactly 0."""
    top = np.max(logits)
    if not np.isfinite(top):
        # all -inf (everything filtered) or +inf/NaN: there is no distribution to draw from
        raise ValueError(f"cannot take softmax of logits whose maximum is {top}")
    e = np.exp(logits - top)  # [V], max entry is exp(0) = 1 so the sum is >= 1: no division by zero
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log-probabilities [V] float64 from logits [V] (what an API's `logprobs` report: the model's own
    distribution, before any sampling filter)."""
    x = np.asarray(logits, dtype=np.float64)
    top = np.max(x)
    if not np.isfinite(top):
        raise ValueError(f"cannot take log_softmax of logits whose maximum is {top}")
    shifted = x - top
    return shifted - np.log(np.sum(np.exp(shifted)))


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """Make tokens already seen less likely (CTRL paper, as in transformers).

    For each distinct id in ``history``, a positive logit is divided by ``penalty`` and a negative one
    multiplied by it, so penalty > 1 always lowers the logit. Ids outside [0, V) are ignored, as
    transformers ignores ids beyond the logits' vocabulary.
    """
    if penalty == 1.0 or len(history) == 0:
        return logits
    V = logits.shape[-1]
    ids = np.unique(np.asarray(history, dtype=np.int64))  # each id is penalized once however often it occurs
    ids = ids[(ids >= 0) & (ids < V)]
    out = logits.copy()
    seen = out[ids]
    out[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return out


def apply_presence_frequency_penalty(logits: np.ndarray, generated: Sequence[int], presence: float,
                                     frequency: float) -> np.ndarray:
    """OpenAI's penalties over the tokens generated so far (the prompt does not count, as in vLLM):
    logit[j] -= frequency * count[j] + presence * (count[j] > 0). Ids outside [0, V) are ignored."""
    if (presence == 0.0 and frequency == 0.0) or len(generated) == 0:
        return logits
    V = logits.shape[-1]
    ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)  # distinct ids, how often
    inside = (ids >= 0) & (ids < V)
    ids, counts = ids[inside], counts[inside]
    out = logits.copy()
    out[ids] -= (frequency * counts + presence).astype(out.dtype)
    return out


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Divide logits by the temperature: < 1 sharpens the distribution, > 1 flattens it. 0 is greedy: see Sampler."""
    if temperature == 1.0:
        return logits
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 to scale logits, got {temperature!r} (0 means greedy)")
    return logits / temperature


def apply_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits (and any tied with the k-th), set the rest to -inf. k = 0 or k >= V: keep all."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    # np.partition puts the k-th largest value at index V-k in O(V), without a full sort
    kth = np.partition(logits, V - k)[V - k]
    return np.where(logits < kth, -np.inf, logits).astype(logits.dtype, copy=False)


# top-p sorts only the most likely tokens when they hold enough mass (almost always): a full stable sort of
# a 128k vocabulary costs ~12 ms, more than a decode step of a small model
_TOP_P_HEADS = (1024, 16384)


def apply_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the most likely tokens whose probabilities add up to at least p, the rest -> -inf.

    As in transformers: sort ascending, drop the low tail whose cumulative probability is <= 1 - p, always
    keep the most likely token. Ties cut by the threshold are broken by token id (stable sort; torch's
    default sort is unstable, so transformers' choice among exactly tied tokens is arbitrary). p >= 1 keeps all.
    """
    if p >= 1.0:
        return logits
    probs = softmax(logits)  # [V], in the logits' dtype like transformers
    cand = np.flatnonzero(probs)  # zero-probability tokens have cumulative mass 0 <= 1 - p: always dropped
    tail = 0.0  # mass of tokens we drop without sorting them
    for head in _TOP_P_HEADS:
        if len(cand) <= head:
            break
        part = np.argpartition(probs[cand], len(cand) - head)  # the `head` most likely come last, unordered
        rest = float(np.sum(probs[cand[part[:-head]]], dtype=np.float64))
        # all tokens outside the head come first in ascending order, so if together they hold <= 1 - p
        # (with a margin for float32 rounding) every one of them is dropped: no need to order them
        if rest <= (1.0 - p) - 1e-5:
            cand, tail = np.sort(cand[part[-head:]]), rest  # sorted ids, so the stable sort breaks ties by id
            break
    order = cand[np.argsort(logits[cand], kind="stable")]  # ascending logits (ties: lower id first)
    cum = np.cumsum(probs[order])  # [n] cumulative probability, low tail first
    if tail:
        cum += np.asarray(tail, dtype=cum.dtype)
    keep = order[cum > np.asarray(1.0 - p, dtype=cum.dtype)]
    keep = np.append(keep, order[-1])  # the most likely token always stays
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def apply_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``min_p`` times the top token's probability. 0 keeps all."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)  # [V]
    threshold = np.asarray(min_p, dtype=probs.dtype) * probs.max()
    # the top token always has probs == max >= threshold since min_p < 1, so at least one token stays
    return np.where(probs < threshold, -np.inf, logits).astype(logits.dtype, copy=False)


def process_logits(logits: np.ndarray, history: Sequence[int], params: SamplingParams,
                   generated: Sequence[int] = ()) -> np.ndarray:
    """All filters of ``params`` in transformers' order; returns logits [V] ready for softmax.
    ``history``: every id so far (prompt included); ``generated``: the generated ones only."""
    x = apply_repetition_penalty(logits, history, params.repetition_penalty)
    x = apply_presence_frequency_penalty(x, generated, params.presence_penalty, params.frequency_penalty)
    if params.temperature == 0:
        return x  # greedy: the filters below never remove the argmax, so they cannot change the choice
    x = apply_temperature(x, params.temperature)
    x = apply_top_k(x, params.top_k)
    x = apply_top_p(x, params.top_p)
    return apply_min_p(x, params.min_p)


class Sampler:
    """Picks next tokens with ``params``; owns its random generator, so a seed makes a run reproducible."""

    def __init__(self, params: SamplingParams | None = None, seed: int | None = None):
        self.params = (params if params is not None else SamplingParams()).validate()
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray, history: Sequence[int] = (), generated: Sequence[int] = ()) -> int:
        """One token id from logits [V]; ``history`` holds the ids so far (prompt included), for the repetition
        penalty, ``generated`` the generated ones only, for the presence and frequency penalties."""
        x = self._filtered(logits, history, generated)
        if self.params.temperature == 0:
            return int(np.argmax(x))  # first index among ties, as torch.argmax
        # draw among the tokens the filters kept: after top-k/top-p that is a few, not the whole vocabulary
        kept = np.flatnonzero(x > -np.inf)
        return int(kept[self._draw(softmax(x[kept].astype(np.float64)))])

    def probs(self, logits: np.ndarray, history: Sequence[int] = (), generated: Sequence[int] = ()) -> np.ndarray:
        """The distribution `sample` draws from, as probabilities [V] float64 (filtered tokens exactly 0;
        greedy: all the mass on the argmax). Speculative decoding compares the target's and the draft's."""
        x = self._filtered(logits, history, generated)
        if self.params.temperature == 0:
            p = np.zeros(x.shape[0], np.float64)
            p[int(np.argmax(x))] = 1.0
            return p
        return softmax(x.astype(np.float64))

    def draw(self, probs: np.ndarray) -> int:
        """One token id from probabilities [V] (need not sum to 1: they are scaled by their sum)."""
        return self._draw(np.asarray(probs, dtype=np.float64))

    def _filtered(self, logits, history, generated) -> np.ndarray:
        """logits [V] checked, widened to float32 and passed through every filter of the params."""
        x = np.asarray(logits)
        if x.ndim != 1 or x.shape[0] == 0:
            raise ValueError(f"expected logits of shape [V], got shape {x.shape}")
        # filters work in float32 (as the model's logits are); bf16/fp16 logits from other backends are widened
        x = x.astype(np.float32, copy=False) if x.dtype != np.float64 else x
        if np.isnan(x).any():
            raise ValueError("logits contain NaN: the model's output is broken")
        return process_logits(x, history, self.params, generated)

    def _draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw: one uniform number per token instead of one per vocabulary entry."""
        cdf = np.cumsum(probs)  # [n], non-decreasing, last entry ~1
        u = self.rng.random() * cdf[-1]
        i = int(np.searchsorted(cdf, u, side="right"))  # first index with cdf > u: never a zero-probability token
        if i >= len(cdf) or probs[i] == 0.0:
            # u landed on the (rounded) top end: take the last token that has probability
            i = int(np.flatnonzero(probs)[-1])
        return i
