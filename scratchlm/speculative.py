"""Speculative decoding: a cheap drafter guesses the next K tokens, the target model scores all of them in
one forward, and the longest prefix the target agrees with is kept, plus one token of the target's own.

Decoding one token reads every weight once; scoring K+1 tokens in one forward reads them once too (the C
kernels decode each weight chunk once for up to 8 rows of activations), so an accepted draft token costs
less than a decode step: measured here, each extra row costs ~0.6 of one (the per-row dot products and
attention are not shared; benchmarks/NOTES.md), so speculation pays when most drafts are accepted. Two drafters:

- `ModelDrafter`: a smaller or more coarsely quantized model with the same vocabulary (`--draft MODEL`);
- `LookupDrafter`: prompt-lookup decoding (`--lookup N`): find the last N tokens earlier in the context
  and propose what followed them there. Free, and good when the output copies the input (summaries,
  code edits, quoting).

The accept/reject rule (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM decoding with speculative sampling"). Let p be the
distribution the target samples position i from (its logits through every sampling filter: temperature,
top-k/p, min-p, penalties, exactly what plain generation draws from) and q the drafter's distribution
that draft token d was drawn from. Accept d with probability min(1, p(d)/q(d)); on rejection draw from
the residual r = max(0, p - q) / sum(max(0, p - q)) and stop. Why it keeps p exactly:

    P(token = x) = q(x) min(1, p(x)/q(x)) + P(reject) r(x) = min(q(x), p(x)) + max(0, p(x) - q(x)) = p(x)

because P(reject) = 1 - sum_y min(q(y), p(y)) = sum_y max(0, p(y) - q(y)), the normaliser of r. When every
draft is accepted, one more token is drawn from the target's distribution after the last draft (the
"bonus" row of the same forward). A lookup draft is deterministic: q is one-hot at d, so d is accepted
with probability p(d) and the residual is p without d. Greedy decoding (temperature 0) is the special case
where p is one-hot at the argmax: a draft is kept exactly when it is the target's argmax.

Greedy output is identical token for token to plain decoding: the target scores the drafts with
`Model.decode_batch` (one sequence's cache given once per row, rows at consecutive positions), which
computes each row exactly as a lone decode step does (bit for bit with packed weights, up to 8 rows), and
the greedy choice is the same `Sampler.sample` call on the same logits and history.

Rollback: the target's cache keeps the positions of the accepted tokens; the rejected rows' keys and
values stay behind its length and are overwritten by the next forward (every write names its position).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import DraftModelError
from .kernels import MATVEC_MAX_ROWS
from .model import to_numpy
from .sampling import Sampler

# The target verifies K drafts plus the last accepted token as K+1 rows of one decode_batch call; up to
# MATVEC_MAX_ROWS rows the kernels compute each row exactly as a lone decode step (greedy identity).
MAX_DRAFT_TOKENS = MATVEC_MAX_ROWS - 1
DEFAULT_DRAFT_TOKENS = 4


def check_draft_options(draft, lookup, draft_tokens) -> None:
    """One-line ValueErrors for impossible speculative options."""
    if draft is not None and lookup is not None:
        raise ValueError("give a draft model or lookup, not both")
    if draft is None and lookup is None:
        raise ValueError("draft_tokens needs a draft model or lookup to propose the tokens")
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(f"draft_tokens must be an integer in 1..{MAX_DRAFT_TOKENS} (the target scores K+1 rows at "
                         f"once, and its exact multi-row kernels take up to {MATVEC_MAX_ROWS}), got {draft_tokens!r}")
    if lookup is not None and (isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 1):
        raise ValueError(f"lookup (the n-gram length to match) must be a positive integer, got {lookup!r}")


def check_same_vocabulary(target, draft) -> None:
    """A draft model must speak the target's token ids: the same vocabulary size and the same bytes for
    every token (when both have tokenizers). Raises DraftModelError otherwise."""
    Vt, Vd = target.config.vocab_size, draft.config.vocab_size
    if Vt != Vd:
        raise DraftModelError(f"the draft model has a vocabulary of {Vd} tokens, the target {Vt}: "
                              "a draft must use the target's tokenizer")
    tt, td = target.tokenizer, draft.tokenizer
    if tt is None or td is None:
        return  # ids only: nothing more to compare
    if tt.vocab_size != td.vocab_size:
        raise DraftModelError(f"the draft model's tokenizer has {td.vocab_size} tokens, the target's "
                              f"{tt.vocab_size}: a draft must use the target's tokenizer")
    if tt is td or _vocabulary_digest(tt) == _vocabulary_digest(td):
        return
    for i in range(tt.vocab_size):  # they differ: name the first token that does
        if tt.token_bytes(i) != td.token_bytes(i):
            raise DraftModelError(f"the draft model's token {i} is {td.token_bytes(i)!r}, the target's "
                                  f"{tt.token_bytes(i)!r}: a draft must use the target's tokenizer")


_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _vocabulary_digest(tok) -> bytes:
    """A hash of every token's bytes, once per tokenizer: chat checks its draft again at every turn, and
    comparing ~50k tokens one by one each time cost tens of milliseconds."""
    digest = _DIGESTS.get(tok)
    if digest is None:
        h = hashlib.sha256()
        for i in range(tok.vocab_size):
            b = tok.token_bytes(i)
            h.update(len(b).to_bytes(4, "little") + b)
        digest = _DIGESTS[tok] = h.digest()
    return digest


class LookupDrafter:
    """Prompt-lookup decoding: the draft is what followed the latest earlier occurrence of the context's
    last `ngram` tokens. Proposes nothing when they never occurred before (then a round is a plain decode
    step). Matching a single token (ngram=1) proposes often and wrongly; 2 or 3 waste few verify rows."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def prefill(self, ids: Sequence[int]) -> None:
        pass

    def propose(self, history: list[int], generated: list[int], k: int, sampler: Sampler):
        """Up to k draft tokens after `history`, and their distributions: None (deterministic drafts)."""
        n, L = self.ngram, len(history)
        if L <= n:
            return [], None
        arr = np.asarray(history, dtype=np.int64)
        pattern = arr[L - n:]  # [n]: the context's last n tokens
        # every earlier window of n tokens that a continuation follows: starts 0..L-1-n
        windows = np.lib.stride_tricks.sliding_window_view(arr[:L - 1], n)  # [L-n, n]
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if not hits.size:
            return [], None
        j = int(hits[-1]) + n  # the latest match: its continuation starts here
        return arr[j:j + k].tolist(), None

    def accepted(self, n_valid: int) -> None:
        pass


class ModelDrafter:
    """A draft model with its own KV cache, decoding greedily or sampling with the target's settings."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.cache = model.new_cache(max_len)
        self.fed = 0  # tokens of the history whose keys/values the draft cache holds

    def prefill(self, ids: Sequence[int]) -> None:
        """Run the prompt but its last token (propose feeds that one), so the first round costs no prefill."""
        if len(ids) > 1:
            self.model.forward(np.asarray([ids[:-1]]), self.cache, 0, last_only=True)  # [1,T-1] -> [1,1,V]
            self.fed = len(ids) - 1

    def propose(self, history: list[int], generated: list[int], k: int, sampler: Sampler):
        """Up to k draft tokens after `history`, each drawn from the draft's own filtered distribution, and
        those distributions ([V] each; None when greedy, where a draft is just the draft's argmax)."""
        m = self.model
        k = min(k, self.cache.max_len - len(history) + 1)  # the draft feeds positions up to len(history)+k-2
        if k <= 0:
            return [], None
        new = history[self.fed:]  # the tokens accepted since the last round (at least the newest one)
        logits = m.forward(np.asarray([new]), self.cache, self.fed, last_only=True)[0, -1]  # [1,n] -> [V]
        self.fed = len(history)
        greedy = sampler.params.temperature == 0
        h, g = list(history), list(generated)
        drafts, qs = [], []
        for j in range(k):
            x = to_numpy(logits)
            if greedy:
                d = sampler.sample(x, h, g)
            else:
                q = sampler.probs(x, h, g)  # [V]
                d = sampler.draw(q)
                qs.append(q)
            drafts.append(d)
            h.append(d)
            g.append(d)
            if j < k - 1:
                logits = m.forward(np.asarray([[d]]), self.cache, self.fed, last_only=True)[0, -1]  # [1,1] -> [V]
                self.fed += 1
        return drafts, (None if greedy else qs)

    def accepted(self, n_valid: int) -> None:
        """Roll back to the first n_valid tokens of the history (the draft fed at most that many rightly)."""
        self.fed = min(self.fed, n_valid)
        self.cache.length = self.fed


def judge(p: np.ndarray, q: np.ndarray | None, d: int, sampler: Sampler) -> int | None:
    """The accept/reject rule for draft token d: None when accepted, else the replacement token.
    p: the target's distribution [V]; q: the draft's [V], or None for a deterministic draft (one-hot at d)."""
    qd = 1.0 if q is None else float(q[d])
    if sampler.rng.random() * qd < p[d]:  # u < p(d)/q(d): accepted with probability min(1, p(d)/q(d))
        return None
    if q is None:
        residual = p.copy()
        residual[d] = 0.0  # max(0, p - onehot(d))
    else:
        residual = np.maximum(p - q, 0.0)  # [V]
    if not residual.sum() > 0:  # p <= q everywhere means p == q, where rejection has probability 0
        residual = p
    return sampler.draw(residual)


def speculative_tokens(model, ids: list[int], cache, sampler: Sampler, drafter, draft_tokens: int,
                       max_new: int, stats: dict) -> Iterator[int]:
    """The generated token ids, one at a time, produced in rounds of draft, verify, accept.

    Never proposes beyond `max_new` tokens in all (the consumer's max_tokens and context room), so the
    target never writes past its cache. `stats` counts rounds, drafted and accepted tokens as it goes.
    """
    stats.update(rounds=0, drafted=0, accepted=0)
    greedy = sampler.params.temperature == 0
    history, generated = list(ids), []
    logits = model.forward(np.asarray([ids]), cache, 0, last_only=True)  # prefill: [1,T] -> [1,1,V]
    drafter.prefill(ids)
    burst = [sampler.sample(to_numpy(logits[0, -1]), history, generated)]
    while True:
        for t in burst:
            history.append(t)
            generated.append(t)
            yield t
        room = max_new - len(generated)  # tokens the consumer may still take
        if room <= 0:
            return
        pos = len(history) - 1  # where the newest token goes: it has not been fed yet
        k = min(draft_tokens, room - 1)  # k drafts verified give up to k+1 tokens
        drafts, qs = drafter.propose(history, generated, k, sampler) if k > 0 else ([], None)
        feed = [history[-1]] + drafts
        # every row at once, each computed as a lone decode step would: [1+k] -> [1+k, V]
        rows = to_numpy(model.decode_batch(feed, [cache] * len(feed), list(range(pos, pos + len(feed)))))
        burst = []
        for i, d in enumerate(drafts):
            h, g = history + drafts[:i], generated + drafts[:i]  # what plain decoding would have seen here
            if greedy:
                t = sampler.sample(rows[i], h, g)
                replacement = None if t == d else t
            else:
                replacement = judge(sampler.probs(rows[i], h, g), None if qs is None else qs[i], d, sampler)
            if replacement is not None:
                burst.append(replacement)
                break
            burst.append(d)
        else:  # every draft kept: the last row gives one more token of the target's own
            burst.append(sampler.sample(rows[len(drafts)], history + drafts, generated + drafts))
        n_acc = len(burst) - 1
        cache.length = pos + 1 + n_acc  # the newest token and the accepted drafts; the rest is stale
        drafter.accepted(len(history) + n_acc)
        stats["rounds"] += 1
        stats["drafted"] += len(drafts)
        stats["accepted"] += n_acc

