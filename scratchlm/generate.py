"""The generation loop: prefill the prompt once, then decode one token at a time with the KV cache.

Text comes out through an incremental UTF-8 decoder, so a stream never emits half a character
(a Chinese character or an emoji is often split over two or three byte-level tokens).
Generation stops on any end token the model declares, on a user stop string, on max_tokens,
or when the context is full.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from .errors import PromptError
from .model import to_numpy
from .sampling import Sampler, SamplingParams

# Sensible defaults for an interactive tool (the same as llama.cpp's); temperature=0 is greedy.
DEFAULTS = dict(max_tokens=256, temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0)


class ContextLimitWarning(UserWarning):
    """Generation stopped because the model's context is full."""


class TextStream:
    """Iterator over the text pieces of a generation; after it ends, `finish_reason` says why:
    "eos" (an end token), "stop" (a stop string), "length" (max_tokens) or "context" (context full)."""

    def __init__(self, pieces: Iterator[str], state: dict):
        self._pieces = pieces
        self._state = state

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def finish_reason(self) -> str | None:
        return self._state.get("finish_reason")

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far (end token excluded)."""
        return self._state["ids"]

    @property
    def prompt_tokens(self) -> int:
        return self._state["prompt_tokens"]

    @property
    def speculative(self) -> dict | None:
        """With a draft model or lookup: {"rounds", "drafted", "accepted"} so far (accepted / drafted is the
        acceptance rate); None for plain decoding."""
        return self._state.get("speculative")

    @property
    def message(self) -> str | None:
        """A human-readable note when generation ended early (the context limit)."""
        return self._state.get("message")


def stop_token_ids(model) -> set[int]:
    """Every end token the model declares: the tokenizer's (eos, eot, <|im_end|>, ...) and the config's."""
    ids = set(getattr(model.tokenizer, "eos_ids", None) or [])
    extra = model.info.get("eos_token_id")
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, (list, tuple)):
        ids.update(int(i) for i in extra)
    return ids


def prompt_ids(model, prompt, add_bos: bool | None = None) -> list[int]:
    """Token ids of a prompt (text, or ids passed through), with BOS where the model wants one."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            why = model.info.get("tokenizer_error", "this model has no tokenizer")
            raise PromptError(f"{why}; pass the prompt as a list of token ids")
        if add_bos is None:
            add_bos = bool(tok.add_bos)
        ids = tok.encode(prompt)
        if (add_bos or not ids) and tok.bos_id is not None:
            ids = [tok.bos_id] + ids
    else:
        ids = [int(i) for i in prompt]
    if not ids:
        raise PromptError("empty prompt, and the model has no BOS token to start from; give some text")
    return ids


def _holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Detokenizer:
    """Generated token ids in, text pieces out: complete UTF-8 only, cut before the first stop string.

    `push(tok)` answers the text that can be shown now: a partial character waits for its next bytes, and
    a tail that could still grow into a stop string is held back until it cannot. After a push that
    completes a stop string, `stopped` is true and the text before it has been answered; nothing more
    comes. `finish()` answers what is left at the end (a dangling partial character becomes U+FFFD).
    generate's loop and the server's scheduler (serve/scheduler.py) both use it, so they stream the same text.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._bytes = tokenizer.token_bytes if tokenizer is not None else None
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = list(stop)
        self.text, self.emitted = "", 0  # generated text so far, and how much of it was answered
        self.stopped = False

    def push(self, tok: int) -> str:
        if self._bytes is None:
            return ""
        text = self.text = self.text + self._decoder.decode(self._bytes(tok))
        emitted, stop = self.emitted, self._stop
        if stop:
            hits = [i for i in (text.find(s, max(0, emitted - len(s) + 1)) for s in stop) if i >= 0]
            if hits:
                self.stopped = True
                cut = max(min(hits), emitted)
                self.emitted = cut
                return text[emitted:cut]
            keep = len(text) - _holdback(text, stop)
        else:
            keep = len(text)
        if keep <= emitted:
            return ""
        self.emitted = keep
        return text[emitted:keep]

    def finish(self) -> str:
        if self._bytes is None or self.stopped:
            return ""
        self.text += self._decoder.decode(b"", final=True)
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece


def _plain_tokens(model, ids: list[int], cache, sampler: Sampler) -> Iterator[int]:
    """Prefill, then one decode step per token; a token is fed only when the consumer asks for the next."""
    history, generated = list(ids), []
    logits = model.forward(np.asarray([ids]), cache, 0, last_only=True)  # prefill: [1,T] -> [1,1,V]
    pos = len(ids)
    while True:
        tok = sampler.sample(to_numpy(logits[0, -1]), history, generated)
        history.append(tok)
        generated.append(tok)
        yield tok
        logits = model.forward(np.asarray([[tok]]), cache, pos, last_only=True)  # decode: [1,1] -> [1,1,V]
        pos += 1


def _run(model, ids: list[int], *, max_tokens: int, sampler: Sampler, stop_ids: set[int],
         stop: Sequence[str], state: dict, draft=None, draft_tokens: int = 4,
         lookup: int | None = None) -> Iterator[str]:
    """Generate (plainly, or speculatively with a draft model or prompt lookup); yield text pieces that are
    complete UTF-8 and cannot begin a stop string."""
    ctx = model.config.max_seq_len
    cache = model.new_cache(min(len(ids) + max_tokens, ctx))
    detok = Detokenizer(model.tokenizer, stop)
    out_ids = state["ids"]
    if draft is None and lookup is None:
        tokens = _plain_tokens(model, ids, cache, sampler)
    else:
        from .speculative import LookupDrafter, ModelDrafter, speculative_tokens
        max_new = min(max_tokens, ctx - len(ids))  # what the loop below can take before it stops
        drafter = LookupDrafter(lookup) if lookup is not None else ModelDrafter(draft, len(ids) + max_new)
        state["speculative"] = {}
        tokens = speculative_tokens(model, ids, cache, sampler, drafter, draft_tokens, max_new, state["speculative"])

    state["finish_reason"] = "length"
    for tok in tokens:
        if tok in stop_ids:
            state["finish_reason"] = "eos"
            break
        out_ids.append(tok)
        piece = detok.push(tok)
        if piece:
            yield piece
        if detok.stopped:
            state["finish_reason"] = "stop"
            return
        if len(out_ids) >= max_tokens:
            break
        if len(ids) + len(out_ids) >= ctx:  # prompt + generated tokens fill the context: no position left to feed
            state["finish_reason"] = "context"
            state["message"] = f"stopped: the context of {ctx} tokens is full"
            break
    piece = detok.finish()
    if piece:
        yield piece


def _start(model, ids: list[int], *, max_tokens=DEFAULTS["max_tokens"], temperature=DEFAULTS["temperature"],
           top_k=DEFAULTS["top_k"], top_p=DEFAULTS["top_p"], min_p=DEFAULTS["min_p"],
           repetition_penalty=DEFAULTS["repetition_penalty"], presence_penalty=0.0, frequency_penalty=0.0,
           seed=None, stop=None, stream=False, ignore_eos=False, draft=None, draft_tokens=None, lookup=None):
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    ctx = model.config.max_seq_len
    if len(ids) >= ctx:
        raise PromptError(f"the prompt has {len(ids)} tokens but the model's context holds {ctx}; shorten it")
    ids_arr = np.asarray(ids)
    if ids_arr.min() < 0 or ids_arr.max() >= model.config.vocab_size:
        raise PromptError(f"prompt token ids must lie in [0, {model.config.vocab_size})")
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty)
    params.validate()
    if draft is not None or lookup is not None or draft_tokens is not None:
        from .speculative import DEFAULT_DRAFT_TOKENS, check_draft_options, check_same_vocabulary
        draft_tokens = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
        check_draft_options(draft, lookup, draft_tokens)
        if draft is not None:
            check_same_vocabulary(model, draft)
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    state: dict = {"ids": [], "prompt_tokens": len(ids)}
    pieces = _run(model, list(ids), max_tokens=max_tokens, sampler=Sampler(params, seed=seed),
                  stop_ids=set() if ignore_eos else stop_token_ids(model), stop=stop, state=state,
                  draft=draft, draft_tokens=draft_tokens, lookup=lookup)
    result = TextStream(pieces, state)
    if stream:
        return result
    text = "".join(result)
    if result.finish_reason == "context":
        warnings.warn(result.message, ContextLimitWarning, stacklevel=3)
    return text


def generate(model, prompt, *, add_bos: bool | None = None, **kwargs):
    """Continue `prompt` (text, or token ids).

    Keyword arguments: max_tokens, temperature (0 = greedy), top_k, top_p, min_p, repetition_penalty,
    presence_penalty, frequency_penalty (OpenAI's, over the generated tokens), seed, stop (a string or list of strings, not included in the output), stream (return a TextStream
    of text pieces instead of the whole string), ignore_eos.

    Speculative decoding (speculative.py): draft (a Model with the same vocabulary that proposes tokens) or
    lookup (N: propose what followed the context's last N tokens earlier in the context), and draft_tokens
    (K proposed per step, 1..7, default 4). Greedy output is identical to plain decoding; sampled output
    follows the same distribution (the seeded draws differ).
    """
    return _start(model, prompt_ids(model, prompt, add_bos), **kwargs)


def chat(model, messages, **kwargs):
    """Reply to a conversation with the model's own chat template (see chat.py)."""
    from .chat import encode_chat
    if model.tokenizer is None:
        raise PromptError(f"{model.info.get('tokenizer_error', 'this model has no tokenizer')}, so it cannot chat")
    return _start(model, encode_chat(model.tokenizer, messages, add_generation_prompt=True), **kwargs)
