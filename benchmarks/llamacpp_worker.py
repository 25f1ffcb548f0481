"""llama.cpp's side of bench_vs_llamacpp.py and bench_fidelity.py, run under benchmarks/.venv-llamacpp/bin/python.

It drives llama-cpp-python's low-level ctypes binding (`llama_cpp.llama_*`, the C API one to one), not the
high-level `Llama` class: that class builds its own `llama_model_params` and has no argument for
`use_extra_bufts`, which has to be off here (the extra-buffer / weight-repacking path crashes on some of
these machines). `--extra-bufts` turns it back on, to see what it is worth where it does not crash (on the
AVX2 machine of 2026-12-03 it did not, and it repacked only Q4_K tensors: none of Q4_1 or Q8_0).
Everything else is llama.cpp's default (flash attention "auto", f16 KV cache). No scratchlm import here.

    llamacpp_worker.py bench FILE --decode-ids 1,2,3 --prefill-ids ... [--gen 64] [--threads 2]
        a turns.serve worker: each step = a prefill of the prefill ids into an empty KV cache, then the
        decode prompt and --gen greedy tokens in a cleared cache; answers both times (decode tokens only)
    llamacpp_worker.py first-token FILE --prompt TEXT [--threads 2]
        one JSON line: seconds from just before `import llama_cpp` to the first greedy token of TEXT
    llamacpp_worker.py logits FILE --ids IDS.npy --out LOGITS.npy [--threads 2]
        teacher-forced logits of every position, float32 [T, V]
    llamacpp_worker.py tokenize FILE --text TEXT.txt --out IDS.npy
        llama.cpp's own token ids of a text (no BOS, special-token text as plain text)
    llamacpp_worker.py quantize IN.gguf --out OUT.gguf --type q8_0|q4_k_m|...     (llama_model_quantize)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

# llama.cpp logs to fd 2 (model metadata, the CPU backend, buffer sizes): kept in a file, not on the terminal
LOG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "llamacpp.log")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _log_to_file() -> None:
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    fd = os.open(LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


class LlamaCpp:
    """One llama.cpp model and context on the CPU: n_threads = n_threads_batch = threads, one sequence."""

    def __init__(self, path: str, *, threads: int, n_ctx: int, n_batch: int = 512, extra_bufts: bool = False,
                 all_outputs: bool = False):
        import ctypes

        import llama_cpp as L
        import numpy as np

        self.L, self.np, self.ctypes = L, np, ctypes
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.use_extra_bufts = extra_bufts  # off: see the module docstring
        self.model = L.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            sys.exit(f"llama.cpp could not load {path} (see {LOG})")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = n_batch  # a prompt of up to n_batch tokens is one batch, as llama-bench does
        cp.n_threads = cp.n_threads_batch = threads
        if all_outputs:  # logits for every position of a batch (the default context keeps one per sequence)
            cp.n_outputs_max = cp.n_outputs_max_per_seq = n_batch
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            sys.exit(f"llama.cpp could not create a context for {path} (see {LOG})")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_batch
        self.one = (ctypes.c_int32 * 1)()
        self.batch = L.llama_batch_init(n_batch, 0, 1)  # for decodes that want every position's logits
        self.info = {"system_info": L.llama_print_system_info().decode(), "threads": threads, "n_ctx": n_ctx,
                     "n_batch": n_batch, "use_extra_bufts": extra_bufts,
                     "flash_attn_type": cp.flash_attn_type, "type_k": cp.type_k, "type_v": cp.type_v}

    def reset(self) -> None:
        """Empty the KV cache (the next token is position 0 again)."""
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)

    def _decode(self, batch) -> None:
        rc = self.L.llama_decode(self.ctx, batch)
        if rc != 0:
            sys.exit(f"llama_decode returned {rc}")

    def feed(self, ids) -> int:
        """Decode ids after what the cache holds (at most n_batch at once), logits for the last one only;
        returns its greedy token."""
        arr = (self.ctypes.c_int32 * len(ids))(*ids)
        self._decode(self.L.llama_batch_get_one(arr, len(ids)))  # positions follow the cache; last logits only
        return self.last_argmax()

    def step(self, tok: int) -> int:
        """One decode step: feed one token, return the next greedy one."""
        self.one[0] = tok
        self._decode(self.L.llama_batch_get_one(self.one, 1))
        return self.last_argmax()

    def last_argmax(self) -> int:
        row = self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(row.argmax())

    def all_logits(self, ids):
        """Teacher-forced logits of every position [T, V] float32, in batches of n_batch from an empty cache."""
        np, b = self.np, self.batch
        self.reset()
        out = np.empty((len(ids), self.n_vocab), np.float32)
        for s in range(0, len(ids), self.n_batch):
            chunk = ids[s:s + self.n_batch]
            for i, t in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = int(t), s + i, 1, 1
                b.seq_id[i][0] = 0
            b.n_tokens = len(chunk)
            self._decode(b)
            out[s:s + len(chunk)] = np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx),
                                                          shape=(len(chunk), self.n_vocab))
        return out

    def tokenize(self, text: str) -> list[int]:
        return _tokenize(self.vocab, text)


def _tokenize(vocab, text: str) -> list[int]:
    """llama.cpp's token ids of text: no BOS (add_special off), special-token text read as plain text."""
    import ctypes

    import llama_cpp as L

    raw = text.encode("utf-8")
    buf = (ctypes.c_int32 * (len(raw) + 8))()  # never more tokens than bytes
    n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
    if n < 0:
        sys.exit(f"llama_tokenize needs {-n} tokens")
    return list(buf[:n])


def _ids(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def bench(a) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import turns

    dec, pre = _ids(a.decode_ids), _ids(a.prefill_ids)
    n_ctx = max(len(pre), len(dec) + a.gen + 1, 512)
    llm = LlamaCpp(a.file, threads=a.threads, n_ctx=n_ctx, n_batch=max(512, len(pre)), extra_bufts=a.extra_bufts)

    def one():
        llm.reset()
        t = time.perf_counter()
        llm.feed(pre)
        prefill_s = time.perf_counter() - t
        llm.reset()
        tok = llm.feed(dec)
        toks = [tok]
        t = time.perf_counter()
        for _ in range(a.gen):
            tok = llm.step(tok)
            toks.append(tok)
        decode_s = time.perf_counter() - t
        return {"prefill_s": prefill_s, "decode_s": decode_s, "tokens": toks}

    turns.serve(one, llm.info, lambda: {"peak_rss_mb": _peak_rss_mb()})


def first_token(a) -> None:
    t0 = time.perf_counter()
    import llama_cpp  # noqa: F401  (the import alone, timed apart)
    import_s = time.perf_counter() - t0
    llm = LlamaCpp(a.file, threads=a.threads, n_ctx=512, extra_bufts=a.extra_bufts)
    ids = llm.tokenize(a.prompt)
    tok = llm.feed(ids)
    s = time.perf_counter() - t0
    print(json.dumps({"import_s": import_s, "first_token_s": s, "token": tok, "ids": ids,
                      "peak_rss_mb": _peak_rss_mb()}), flush=True)


def logits(a) -> None:
    import numpy as np

    ids = [int(t) for t in np.load(a.ids)]
    llm = LlamaCpp(a.file, threads=a.threads, n_ctx=max(512, len(ids)), extra_bufts=a.extra_bufts, all_outputs=True)
    t = time.perf_counter()
    out = llm.all_logits(ids)
    np.save(a.out, out)
    print(json.dumps({"s": time.perf_counter() - t, "shape": list(out.shape), **llm.info}), flush=True)


def tokenize(a) -> None:
    import numpy as np

    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.vocab_only = True  # the tokenizer needs the vocabulary only
    model = L.llama_model_load_from_file(a.file.encode(), mp)
    if not model:
        sys.exit(f"llama.cpp could not load {a.file}")
    with open(a.text, encoding="utf-8") as f:
        ids = _tokenize(L.llama_model_get_vocab(model), f.read())
    np.save(a.out, np.asarray(ids, np.int64))
    print(json.dumps({"n": len(ids)}), flush=True)


def quantize(a) -> None:
    import llama_cpp as L

    ftype = getattr(L, "LLAMA_FTYPE_MOSTLY_" + a.type.upper(), None)
    if ftype is None:
        sys.exit(f"unknown type {a.type}")
    p = L.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = a.threads
    rc = L.llama_model_quantize(a.file.encode(), a.out.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize returned {rc} (see {LOG})")
    print(json.dumps({"out": a.out, "type": a.type, "bytes": os.path.getsize(a.out)}), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("bench", "first-token", "logits", "tokenize", "quantize"))
    ap.add_argument("file", help="the GGUF file (quantize: the input)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--extra-bufts", action="store_true", help="use llama.cpp's extra buffer types (repacking)")
    ap.add_argument("--decode-ids", default="")
    ap.add_argument("--prefill-ids", default="")
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--prompt", default="")
    ap.add_argument("--ids")
    ap.add_argument("--text")
    ap.add_argument("--out", help="logits, tokenize, quantize: the output file")
    ap.add_argument("--type", help="quantize: q8_0, q4_k_m, ... (LLAMA_FTYPE_MOSTLY_<TYPE>)")
    a = ap.parse_args(argv)
    _log_to_file()
    {"bench": bench, "first-token": first_token, "logits": logits, "tokenize": tokenize, "quantize": quantize}[a.mode](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
