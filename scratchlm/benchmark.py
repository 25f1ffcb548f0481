"""What `scratchlm bench` measures: load seconds, prefill tokens/s and decode tokens/s (and with --draft or
--lookup, the same greedy decode done speculatively: tokens/s, speed-up, acceptance rate).

Prefill runs the whole prompt through the model in one forward (matrix-matrix work, GEMM-bound);
decode feeds one token at a time through the KV cache (matrix-vector work, bound by the
bandwidth of reading every weight once per token).
"""

from __future__ import annotations

import time

import numpy as np

from .model import to_numpy

# Real text to build the prompt from (repeated as needed), so the ids are ordinary ones.
_TEXT = ("The history of computing is a story of people building machines to think faster than they can. "
         "Charles Babbage designed the Analytical Engine, and Ada Lovelace wrote what many call the first program. ")


def run_bench(path=None, *, prompt_tokens: int = 512, gen_tokens: int = 128, dtype: str | None = None,
              kv_dtype: str | None = None, device: str = "cpu", gpu_layers: int | None = None,
              stream_layers: bool = False, devices: str | None = None, model=None, draft=None,
              lookup: int | None = None, draft_tokens: int | None = None) -> dict:
    """Load (unless `model` is given), prefill `prompt_tokens`, decode `gen_tokens` greedily. With blocks
    placed on devices, also the transfer time: the streamed blocks' copies (BlockStream) and the
    activations' moves between devices (Traffic), per decoded token; compute = the rest of the time
    (on CUDA the streamed copies overlap the compute, so there compute is the whole decode time).
    With `draft` (a model path) or `lookup` (an n-gram length) the same greedy decode runs again
    speculatively, after the plain one: its tok/s, the speed-up, the acceptance rate and whether its
    tokens equal the plain ones are added to the result."""
    import scratchlm
    from .devices import Traffic
    from .errors import PromptError

    t0 = time.perf_counter()
    if model is None:
        model = scratchlm.load(path, progress=False, dtype=dtype, device=device, gpu_layers=gpu_layers,
                               stream_layers=stream_layers, devices=devices)
    model.kv_dtype = kv_dtype
    load_s = time.perf_counter() - t0
    mixed = len({id(h) for h in model.homes + [model.head_home]}) > 1
    model.traffic = Traffic() if mixed else None

    ctx = model.config.max_seq_len
    if prompt_tokens + gen_tokens > ctx:
        raise PromptError(f"--prompt-tokens + --gen-tokens = {prompt_tokens + gen_tokens} exceeds the context of {ctx}")
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(_TEXT)
        ids = (ids * (prompt_tokens // max(len(ids), 1) + 1))[:prompt_tokens]
    else:
        ids = list(np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_tokens))

    cache = model.new_cache(prompt_tokens + gen_tokens)
    t0 = time.perf_counter()
    logits = model.forward(np.asarray([ids]), cache, 0, last_only=True)  # [1,1,V]
    tok = int(np.argmax(to_numpy(logits[0, -1])))
    prefill_s = time.perf_counter() - t0

    stream, traffic = model.stream, model.traffic
    for c in (stream, traffic):  # count the decode steps' transfers only
        if c is not None:
            c.reset_counters() if c is stream else c.__init__()
    plain = [tok]
    t0 = time.perf_counter()
    for pos in range(prompt_tokens, prompt_tokens + gen_tokens):
        logits = model.forward(np.asarray([[tok]]), cache, pos, last_only=True)  # greedy decode step
        tok = int(np.argmax(to_numpy(logits[0, -1])))
        plain.append(tok)
    decode_s = time.perf_counter() - t0
    model.traffic = None
    r = {"source": model.info.get("source"), "load_s": load_s, "prefill_s": prefill_s, "decode_s": decode_s,
         "prefill_tok_s": prompt_tokens / prefill_s, "decode_tok_s": gen_tokens / decode_s,
         "placement": model.plan.describe() if model.plan is not None else "all blocks on cpu"}
    if stream is not None or traffic is not None:
        overlapped = stream is not None and stream.cuda
        if stream is not None:
            stream.collect()
        transfer_s = (stream.transfer_s if stream is not None else 0.0) + (traffic.transfer_s if traffic else 0.0)
        moved = (stream.transfer_bytes if stream is not None else 0) + (traffic.transfer_bytes if traffic else 0)
        serial_s = transfer_s - (stream.transfer_s if overlapped else 0.0)  # what did not overlap the compute
        r.update(transfer_ms_per_token=1e3 * transfer_s / gen_tokens,
                 compute_ms_per_token=1e3 * (decode_s - serial_s) / gen_tokens,
                 transfer_mb_per_token=moved / gen_tokens / 1e6, transfer_overlapped=overlapped)
    if draft is not None or lookup is not None:
        r.update(_bench_speculative(model, ids, gen_tokens, plain, draft, lookup, draft_tokens, dtype))
    return r


def _bench_speculative(model, ids, gen_tokens, plain, draft, lookup, draft_tokens, dtype) -> dict:
    """The plain run's greedy decode again, speculatively: the first token comes from the prefill (and the
    draft's prefill), the next gen_tokens are timed as decode."""
    import scratchlm
    from .sampling import Sampler, SamplingParams
    from .speculative import (DEFAULT_DRAFT_TOKENS, LookupDrafter, ModelDrafter, check_draft_options,
                              check_same_vocabulary, speculative_tokens)

    K = DEFAULT_DRAFT_TOKENS if draft_tokens is None else draft_tokens
    check_draft_options(draft, lookup, K)
    if draft is not None:
        draft = scratchlm.load(draft, progress=False, dtype=dtype)
        check_same_vocabulary(model, draft)
    n = len(ids)
    drafter = LookupDrafter(lookup) if lookup is not None else ModelDrafter(draft, n + gen_tokens + 1)
    stats: dict = {}
    tokens = speculative_tokens(model, ids, model.new_cache(n + gen_tokens), Sampler(SamplingParams(temperature=0)),
                                drafter, K, gen_tokens + 1, stats)
    out = [next(tokens)]  # prefill
    t0 = time.perf_counter()
    out += [next(tokens) for _ in range(gen_tokens)]
    spec_s = time.perf_counter() - t0
    return {"spec_decode_s": spec_s, "spec_decode_tok_s": gen_tokens / spec_s, "draft_tokens": K,
            "drafted": stats["drafted"], "accepted": stats["accepted"], "rounds": stats["rounds"],
            "acceptance": stats["accepted"] / max(1, stats["drafted"]), "identical": out == plain}
