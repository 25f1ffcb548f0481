"""Perplexity of a model on a text: how surprised it is by held-out tokens, exp(mean negative log-likelihood).

Two window rules, because a text is longer than one context:

- **llama.cpp's** (`llama-perplexity`, the default): the text is tokenized once (with BOS first when the
  model's tokenizer adds one) and cut into non-overlapping windows of `ctx` tokens; a tail shorter than a
  window is dropped. Where the tokenizer adds BOS, the first token of every window is replaced by BOS.
  Only the second half of each window is scored: the logits at positions ctx//2 .. ctx-2 predict the tokens
  at ctx//2+1 .. ctx-1, so ctx - 1 - ctx//2 tokens per window (255 of 512), each seen with at least ctx//2
  tokens of context. The standard error is llama.cpp's: with v the token NLLs over N tokens,
  sqrt((mean(v^2) - mean(v)^2) / (N-1)) * ppl (the delta method on exp).
- **the sliding window** of the Hugging Face perplexity guide (`stride=S`): windows of (at most) ctx tokens
  start every S tokens, the last one ends at the end of the text, and each window scores only the tokens
  no earlier window scored, so every token after the first is scored exactly once, with up to ctx-1 tokens
  of context (S=1 is the exact, slow maximum). No BOS replacement. The guide weights each window's mean
  loss by (its scored tokens - 1), which miscounts windows after the first by one; here every token counts once.

    >>> import scratchlm
    >>> r = scratchlm.perplexity(scratchlm.load(), open("wiki.test.raw").read())
    >>> r.ppl, r.ppl_stderr, r.tokens

`score` is the one scoring function: the trainer's validation loss is its mean over held-out windows.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import numpy as np

from . import ops
from .errors import PromptError, TokenizerError
from .model import Model, to_numpy

# rows of logits [rows, V] made at a time by the head: bounds the float memory of one scored window
HEAD_ROWS = 512


@dataclass
class Perplexity:
    ppl: float  # exp(mean NLL)
    ppl_stderr: float  # standard error of ppl (llama.cpp's formula); nan with fewer than 2 tokens
    tokens: int  # tokens scored
    nll: float  # mean negative log-likelihood, nats per token

    def as_dict(self) -> dict:
        return asdict(self)


def score(model: Model, inputs, targets, first: int = 0) -> np.ndarray:
    """Negative log-likelihoods [B, T-first] float64 of targets [B, T-first] under the model's next-token
    distributions at input positions first..T-1 of inputs [B, T] (a causal forward from position 0).

    The head runs on the scored positions only; the log-softmax is max-shifted with its sum of exps in
    float64 (as llama.cpp's perplexity does), so no token's probability underflows to log(0).
    """
    inputs = np.asarray(inputs, dtype=np.int64)
    targets = np.asarray(targets, dtype=np.int64)
    B, T = inputs.shape
    if targets.shape != (B, T - first):
        raise ValueError(f"targets of shape {targets.shape} do not match inputs {inputs.shape} scored from {first}")
    model._check_ids(inputs)
    model._check_ids(targets)
    h = model.forward(inputs, head=False)[:, first:]  # [B,T,D] -> [B,T-first,D], final normed states
    nll = np.empty((B, T - first), np.float64)
    for b in range(B):
        for a in range(0, T - first, HEAD_ROWS):
            rows = slice(a, a + HEAD_ROWS)
            logits = to_numpy(ops.linear(h[b, rows], model.output_weight))  # [R,D] @ [D,V] -> [R,V]
            top = logits.max(axis=-1, keepdims=True)  # [R,1]
            z = logits - top  # [R,V], <= 0
            lse = np.log(np.exp(z).sum(axis=-1, dtype=np.float64))  # [R]
            picked = np.take_along_axis(z, targets[b, rows, None], axis=-1)[:, 0]  # [R]: shifted logit of each target
            nll[b, rows] = lse - picked.astype(np.float64)
    return nll


def _windows(n: int, ctx: int, stride: int | None, bos: bool) -> list[tuple[int, int, int, bool]]:
    """(begin, length, first scored index, replace the first token by BOS) of each window over n tokens."""
    if stride is None:
        half = ctx // 2
        return [(i * ctx, ctx, half + 1, bos) for i in range(n // ctx)]
    out, prev_end, begin = [], 0, 0
    while True:
        end = min(begin + ctx, n)
        out.append((begin, end - begin, max(prev_end, begin + 1) - begin, False))
        prev_end = end
        if end == n:
            return out
        begin += stride


def perplexity(model: Model, text, ctx: int = 512, stride: int | None = None, batch: int = 4, *,
               add_bos: bool | None = None, progress: bool | None = None) -> Perplexity:
    """Perplexity of `model` on `text` (a str, or its token ids), by llama.cpp's rule or, with `stride`,
    the sliding window of the Hugging Face guide (see this module's docstring for both rules).

    `batch` windows of equal shape go through one forward. `add_bos` (default: what the model's tokenizer
    does) puts BOS before a text's tokens and, in llama.cpp's rule, at the start of every window; token ids
    given directly are used as they are, BOS only replacing window starts. `progress` shows a bar with the
    running perplexity on stderr (default: when stderr is a terminal).
    Returns Perplexity(ppl, ppl_stderr, tokens, nll).
    """
    from tqdm import tqdm

    cfg, tok = model.config, model.tokenizer
    if add_bos is None:
        add_bos = bool(getattr(tok, "add_bos", False))
    bos_id = getattr(tok, "bos_id", None)
    if add_bos and bos_id is None:
        raise TokenizerError("add_bos needs a tokenizer with a BOS token")
    min_ctx = 2 if stride is not None else 3  # llama.cpp's rule scores ctx - 1 - ctx//2 tokens per window
    if not isinstance(ctx, int) or ctx < min_ctx:
        raise ValueError(f"ctx must be an integer >= {min_ctx}, got {ctx!r}")
    if ctx > cfg.max_seq_len:
        raise ValueError(f"ctx {ctx} is larger than the model's context of {cfg.max_seq_len} tokens")
    if stride is not None and (not isinstance(stride, int) or not 1 <= stride <= ctx):
        raise ValueError(f"stride must be an integer in [1, ctx={ctx}], got {stride!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")

    if isinstance(text, str):
        if tok is None:
            raise TokenizerError(model.info.get("tokenizer_error", "the model has no tokenizer to encode the text"))
        ids = np.asarray(tok.encode(text, add_bos=add_bos), dtype=np.int64)
    else:
        ids = np.asarray(text, dtype=np.int64).reshape(-1)
    n = len(ids)
    if stride is None and n < ctx:
        raise PromptError(f"the text is {n} tokens, shorter than one window of ctx={ctx} tokens")
    if n < 2:
        raise PromptError(f"the text is {n} token(s): nothing to score")

    wins = _windows(n, ctx, stride, add_bos)
    total = sum(L - a for _, L, a, _ in wins)
    s1 = s2 = 0.0  # sums of NLL and NLL^2 over the tokens scored so far (float64)
    count = 0
    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=total, unit="tok", disable=not progress, file=sys.stderr, dynamic_ncols=True, desc="perplexity")
    try:
        i = 0
        while i < len(wins):
            _, L, a, rep = wins[i]
            j = i + 1  # a group: up to `batch` consecutive windows of one shape
            while j < len(wins) and j - i < batch and wins[j][1:] == (L, a, rep):
                j += 1
            group = np.stack([ids[b:b + L] for b, *_ in wins[i:j]])  # [B,L]
            inputs = group[:, :L - 1].copy()  # [B,L-1]: the last token predicts nothing inside the window
            if rep:
                inputs[:, 0] = bos_id
            nll = score(model, inputs, group[:, a:], first=a - 1)  # [B,L-a]
            s1 += float(nll.sum())
            s2 += float((nll * nll).sum())
            count += nll.size
            bar.update(nll.size)
            bar.set_postfix_str(f"ppl {math.exp(s1 / count):.4f}")
            i = j
    finally:
        bar.close()
    mean = s1 / count
    ppl = math.exp(mean)
    var = s2 / count - mean * mean
    stderr = math.sqrt(max(var, 0.0) / (count - 1)) * ppl if count > 1 else float("nan")
    return Perplexity(ppl=ppl, ppl_stderr=stderr, tokens=count, nll=mean)
