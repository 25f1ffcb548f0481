"""The `scratchlm` command: generate, chat, serve, info, tokenize, bench, train, ...

Bad input (a missing or corrupt file, a bad argument, an impossible prompt) prints one line
`scratchlm: error: ...` on stderr and exits with status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__

DEFAULT_MODEL_HELP = "model: a .gguf file, a Hugging Face or Meta directory (default: SmolLM2-135M-Instruct Q4_1)"


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help=DEFAULT_MODEL_HELP)


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=("stored", "f32", "bf16", "f16"), default="stored",
                   help="weights as the file stores them (quantized blocks, fp16, bf16: less memory, faster "
                        "decoding) or widened to f32 at load (default stored); on a torch device the dtype the "
                        "weights are dequantized to and computed in: f32, bf16 or f16 (stored = bf16 on cuda, "
                        "f32 on torch-cpu)")
    p.add_argument("--kv-dtype", choices=("f32", "f16"), default="f32",
                   help="what the KV cache stores keys and values in: f16 halves its memory (default f32: the "
                        "compute dtype, bf16/f16 on a torch device in those)")


def _add_device(p: argparse.ArgumentParser, placement: bool = True) -> None:
    from .devices import DEVICES_HELP

    if not placement:  # train / finetune: forward and backward there; weights and optimizer stay on the host
        p.add_argument("--device", default=None, metavar="DEVICE",
                       help=f"where forward and backward run: {DEVICES_HELP} (default cpu; with --resume: the run's)")
        return
    p.add_argument("--device", default="cpu", metavar="DEVICE", help=f"where the model runs: {DEVICES_HELP}")
    p.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                   help="keep the first N blocks on --device and run the rest on the host in NumPy (llama.cpp's -ngl)")
    p.add_argument("--stream-layers", action="store_true",
                   help="keep every block in host memory and copy each to --device for its turn (on CUDA from "
                        "pinned memory, the next copy overlapping the current block): a model larger than the "
                        "GPU's memory runs")
    p.add_argument("--devices", default=None, metavar="LIST",
                   help="split the blocks across devices as a pipeline, e.g. cuda:0,cuda:1 (instead of --device)")


def _add_sampling(p: argparse.ArgumentParser, max_tokens: int) -> None:
    from .generate import DEFAULTS

    p.add_argument("-n", "--max-tokens", type=_positive_int, default=max_tokens,
                   help=f"most tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"],
                   help=f"sampling temperature, 0 = greedy (default {DEFAULTS['temperature']})")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"],
                   help=f"keep the K most likely tokens, 0 = all (default {DEFAULTS['top_k']})")
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"],
                   help=f"nucleus sampling: keep the smallest set with this much probability (default {DEFAULTS['top_p']})")
    p.add_argument("--min-p", type=float, default=DEFAULTS["min_p"],
                   help=f"drop tokens below this fraction of the top probability (default {DEFAULTS['min_p']})")
    p.add_argument("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"],
                   help="penalise tokens already present, 1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable; not printed)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the model's end tokens")


def _sampling_kwargs(a) -> dict:
    return dict(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                min_p=a.min_p, repetition_penalty=a.repetition_penalty, seed=a.seed, stop=a.stop,
                ignore_eos=a.ignore_eos)


def _add_speculative(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--draft", default=None, metavar="MODEL",
                   help="speculative decoding: a smaller model with the same vocabulary proposes tokens, the model "
                        "checks them in one forward (greedy output is unchanged, sampling keeps its distribution)")
    g.add_argument("--lookup", type=_positive_int, default=None, metavar="N",
                   help="speculative decoding by prompt lookup: propose what followed the last N tokens earlier in "
                        "the context (good when the output copies the input; try 3)")
    p.add_argument("--draft-tokens", type=_positive_int, default=None, metavar="K",
                   help="tokens proposed per step with --draft or --lookup, 1..7 (default 4)")


def _speculative_kwargs(a) -> dict:
    """--draft (loaded here, after the target, with the same --dtype), --lookup and --draft-tokens."""
    if a.draft_tokens is not None and a.draft is None and a.lookup is None:
        raise ValueError("--draft-tokens needs --draft or --lookup")
    if a.draft is None and a.lookup is None:
        return {}
    from .speculative import DEFAULT_DRAFT_TOKENS, check_draft_options
    check_draft_options(a.draft, a.lookup, a.draft_tokens or DEFAULT_DRAFT_TOKENS)  # before loading anything
    kw = {"draft_tokens": a.draft_tokens, "lookup": a.lookup}
    if a.draft is not None:
        import scratchlm
        kw["draft"] = scratchlm.load(a.draft, dtype=None if a.dtype == "stored" else a.dtype)
    return kw


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and status 1 like every other error (not usage + status 2);
    the subcommand parsers inherit it. `--help` still prints the usage."""

    def error(self, message: str):
        sys.stderr.write(f"scratchlm: error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(1)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="scratchlm", description="A language-model engine written from scratch in NumPy.")
    ap.add_argument("--version", action="version", version=f"scratchlm {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="continue a prompt (raw text completion)")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)
    _add_adapter(p)
    p.add_argument("prompt", help="the text to continue ('' starts from BOS); for a seq2seq run, the source text")
    _add_sampling(p, 128)
    p.add_argument("--beam", type=_positive_int, default=1,
                   help="seq2seq runs only: beam-search width (default 1: greedy); the sampling options do not apply there")
    _add_speculative(p)

    p = sub.add_parser("chat", help="talk to the model with its chat template (interactive; or one turn per stdin line)")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)
    _add_adapter(p)
    p.add_argument("--system", default=None, help="a system prompt")
    _add_sampling(p, 512)
    _add_speculative(p)

    p = sub.add_parser("info", help="show the model's configuration, size, tokenizer and template")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)

    p = sub.add_parser("tokenize", help="show the token ids and pieces of a text")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-m", "--model", default=None, help=DEFAULT_MODEL_HELP)
    g.add_argument("--tokenizer", default=None, help="a tokenizer file: tokenizer.model, tokenizer.json or .gguf")
    p.add_argument("text")

    p = sub.add_parser("bench", help="time loading, prefill and decoding (with --draft/--lookup: greedy decoding "
                                     "again, speculatively, on the same prompt; the prompt is a repeated paragraph)")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)
    p.add_argument("--prompt-tokens", type=_positive_int, default=512, help="prefill length (default 512)")
    p.add_argument("--gen-tokens", type=_positive_int, default=128, help="tokens to decode (default 128)")
    p.add_argument("--json", action="store_true", help="print one JSON line: load_s, prefill_tok_s, decode_tok_s "
                   "(and with a placement: compute and transfer ms and transfer MB per token; with --draft/--lookup "
                   "spec_decode_tok_s, speedup, acceptance, identical)")
    _add_speculative(p)

    p = sub.add_parser("perplexity", help="perplexity of a text file, computed the way llama.cpp's llama-perplexity does")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)
    _add_adapter(p)
    p.add_argument("file", metavar="FILE", help="a UTF-8 text file")
    p.add_argument("--ctx", type=_positive_int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=_positive_int, default=None,
                   help="sliding windows every S tokens, each scoring what earlier ones did not (the Hugging Face "
                        "guide's rule); default: llama.cpp's non-overlapping windows scored on their second half")
    p.add_argument("--batch", type=_positive_int, default=4, help="windows per forward pass (default 4)")
    p.add_argument("--json", action="store_true", help='print one JSON line: {"ppl", "ppl_stderr", "tokens"}')

    p = sub.add_parser("train", help="train a small Llama, GPT-2 or encoder-decoder from scratch (or --resume a run)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="the training text file(s); with --arch seq2seq, TSV file(s) of source<TAB>target lines")
    p.add_argument("--out", default=None, metavar="DIR", help="the run directory to create")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--tokenizer", default="char", help="char, bpe:N (trained on the corpus) or a tokenizer/model path (default char)")
    p.add_argument("--arch", choices=("llama", "gpt2", "seq2seq"), default="llama",
                   help="architecture: a decoder (llama, gpt2) or the 2017 encoder-decoder (seq2seq: --layers each side, "
                        "--context the longest source or target) (default llama)")
    p.add_argument("--pre-ln", action="store_true", help="seq2seq only: pre-LN sublayers (default: post-LN, as in the paper)")
    p.add_argument("--separate-embeddings", action="store_true",
                   help="seq2seq only: separate source, target and output tables (default: one shared table)")
    p.add_argument("--layers", type=_positive_int, default=4, help="transformer blocks (default 4)")
    p.add_argument("--dim", type=_positive_int, default=128, help="model dimension D (default 128)")
    p.add_argument("--heads", type=_positive_int, default=4, help="attention heads H (default 4)")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="key/value heads K (default: H)")
    p.add_argument("--context", type=_positive_int, default=128, help="context length T in tokens (default 128)")
    p.add_argument("--batch", type=_positive_int, default=16, help="sequences per micro-batch B, shared out among the ranks under torchrun (default 16)")
    p.add_argument("--accum", type=_positive_int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--steps", type=_positive_int, default=None, help="total optimizer steps (default 1000; with --resume: the new total)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--warmup", type=int, default=-1, help="warm-up steps (default min(100, steps/10))")
    p.add_argument("--eval-every", type=_positive_int, default=100, help="evaluate every N steps (default 100)")
    _add_device(p, placement=False)
    _add_run_options(p, save_every=100, quiet="print only the final losses")

    p = sub.add_parser("export", help="write a model or training run as GGUF (llama.cpp) or a Hugging Face directory")
    p.add_argument("model", metavar="RUN_DIR|MODEL", help="a training run directory, or any model scratchlm loads")
    p.add_argument("--format", choices=("gguf", "hf"), required=True, help="gguf: one .gguf file; hf: a directory")
    p.add_argument("-o", "--out", required=True, help="the .gguf file or the directory to write")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="weight precision (default f32)")

    p = sub.add_parser("explain", help="walk through one forward pass step by step, with real shapes and values "
                                        "(a seq2seq run: encoder, decoder and cross-attention)")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)
    p.add_argument("prompt", help="the text to run through the model")
    p.add_argument("--layer", type=int, default=0, help="the layer shown in detail (default 0)")
    p.add_argument("--head", type=int, default=0, help="the query head shown in detail (default 0)")
    p.add_argument("--top", type=_positive_int, default=10, help="how many next tokens to list (default 10)")
    p.add_argument("--lang", choices=["en", "zh"], default="en", help="language of the explanation (default en)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/report.html: attention heatmaps, RoPE angles, logit lens, KV-cache timing "
                        "(for a seq2seq run: DIR/cross_attention.png, the cross-attention maps)")
    p.add_argument("--max-tokens", type=_positive_int, default=64,
                   help="refuse longer prompts (attention maps grow with its square; default 64)")

    p = sub.add_parser("finetune", help="fine-tune a model with LoRA on chat data (JSONL); writes a PEFT adapter")
    _add_model(p)
    _add_dtype(p)
    _add_device(p, placement=False)
    p.add_argument("--data", default=None, metavar="FILE.jsonl",
                   help='one conversation per line: {"messages": [...]} or {"prompt": ..., "response": ...}')
    p.add_argument("--out", default=None, metavar="DIR", help="the run directory (holds the adapter)")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue the run in DIR from its latest checkpoint")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; the update is scaled by alpha/r (default 16)")
    p.add_argument("--dropout", type=float, default=0.05, help="dropout on the adapters' input (default 0.05)")
    p.add_argument("--targets", default="all",
                   help="projections to adapt: q,k,v,o,gate,up,down (Llama) or qkv,o,up,down (GPT-2); default all")
    p.add_argument("--epochs", type=_positive_int, default=3, help="passes over the data (default 3)")
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (overrides --epochs; with --resume: the new total)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    p.add_argument("--batch", type=_positive_int, default=4, help="rows per step, shared out among the ranks under torchrun (default 4)")
    p.add_argument("--context", type=_positive_int, default=256, help="tokens per row (default 256)")
    _add_run_options(p, save_every=50, quiet="print only the final line")

    p = sub.add_parser("merge", help="add a LoRA adapter into its base model's weights and write the merged model")
    _add_model(p)
    p.add_argument("--adapter", required=True, metavar="DIR", help="a LoRA adapter directory (PEFT format)")
    p.add_argument("--format", choices=("gguf", "hf"), required=True, help="gguf: one .gguf file; hf: a directory")
    p.add_argument("-o", "--out", required=True, help="the .gguf file or the directory to write")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="weight precision (default f32)")

    # the names of quantize.QUANT_TYPES, spelled out here so building the parser does not import numba
    p = sub.add_parser("quantize", help="write a model as a quantized GGUF, with llama.cpp's block types and _M mixes")
    p.add_argument("model", metavar="MODEL", help="a .gguf file, a Hugging Face or Meta directory, or a training run")
    p.add_argument("out", metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--type", required=True, type=str.upper,
                   choices=("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K_M", "Q5_K_M", "Q6_K"),
                   help="the block type, or llama.cpp's Q4_K_M / Q5_K_M mix of Q4_K, Q5_K and Q6_K")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter directory (PEFT format) to merge in first")
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching) with a web chat page")
    _add_model(p)
    _add_dtype(p)
    _add_device(p)
    _add_adapter(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")
    p.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--parallel", type=_positive_int, default=8,
                   help="sequences decoded together, one batched step for all (default 8)")
    p.add_argument("--queue", type=int, default=64, help="requests waiting for a slot before 503 (default 64)")
    p.add_argument("--ctx", type=_positive_int, default=None,
                   help="context per request: prompt + max_tokens (default: the model's)")
    p.add_argument("--model-id", default=None, help="the name clients use in 'model' (default: the file's stem)")
    return ap


def _add_run_options(p: argparse.ArgumentParser, save_every: int, quiet: str) -> None:
    """The options of a run directory's loop that `train` and `finetune` share."""
    p.add_argument("--save-every", type=_positive_int, default=save_every,
                   help=f"checkpoint every N steps (default {save_every})")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads that share out each batch, one core each (default: every core, divided among the ranks "
                        "torchrun starts on the machine; with --resume: the run's; --arch seq2seq trains on one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help=quiet)


def _add_adapter(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR", help="a LoRA adapter directory (PEFT format) to apply")


def _placement(a) -> dict:
    """The load() keywords of --device, --gpu-layers, --stream-layers and --devices."""
    return dict(device=getattr(a, "device", "cpu"), gpu_layers=getattr(a, "gpu_layers", None),
                stream_layers=getattr(a, "stream_layers", False), devices=getattr(a, "devices", None))


def _load(a, dtype: str | None = None):
    import scratchlm
    dtype = dtype or getattr(a, "dtype", "stored")
    model = scratchlm.load(a.model, adapter=getattr(a, "adapter", None), dtype=None if dtype == "stored" else dtype,
                           **_placement(a))
    if model.plan is not None:
        print(f"[{model.plan.describe()}]", file=sys.stderr)
    model.kv_dtype = getattr(a, "kv_dtype", None)
    return model


def _stream(stream) -> None:
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stream.message:
        print(f"[{stream.message}]", file=sys.stderr)


def _seq2seq_run(path) -> bool:
    if path is None:
        return False
    from .training.seq2seq_train import is_seq2seq_run
    return is_seq2seq_run(path)


def cmd_generate(a) -> int:
    if _seq2seq_run(a.model):
        from .training.seq2seq_train import load_run
        if a.draft is not None or a.lookup is not None or a.draft_tokens is not None:
            raise ValueError("--draft, --lookup and --draft-tokens apply to decoder models, not seq2seq runs")
        print(load_run(a.model).translate(a.prompt, beam=a.beam, max_len=a.max_tokens))
        return 0
    if a.beam != 1:
        raise ValueError("--beam applies to seq2seq runs only (decoder models sample: see --temperature)")
    spec = _speculative_kwargs(a)
    model = _load(a)
    _stream(model.generate(a.prompt, stream=True, **_sampling_kwargs(a), **spec))
    return 0


def cmd_chat(a) -> int:
    from .errors import PromptError

    spec = _speculative_kwargs(a)
    model = _load(a)
    kwargs = dict(_sampling_kwargs(a), **spec)
    system = [{"role": "system", "content": a.system}] if a.system else []
    messages = list(system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {model.info.get('name') or model.info.get('source')}. "
              "Ctrl-D to quit, /reset to start over.", file=sys.stderr)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not interactive and line == "":
            break  # end of stdin
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages = list(system)
            continue
        messages.append({"role": "user", "content": line})
        try:
            stream = model.chat(messages, stream=True, **kwargs)
            reply = []
            for piece in stream:
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            if stream.message:
                print(f"[{stream.message}]", file=sys.stderr)
        except PromptError as e:
            if not interactive:
                raise
            print(f"scratchlm: {e} (type /reset to start over)", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(reply)})
    return 0


def cmd_info(a) -> int:
    model = _load(a)
    c, info, tok = model.config, model.info, model.tokenizer
    rows = [
        ("source", info.get("source")), ("format", info.get("format")), ("name", info.get("name")),
        ("architecture", c.arch), ("parameters", f"{c.n_params:,}"),
        ("layers", c.n_layers), ("dim (D)", c.dim), ("heads (H)", c.n_heads), ("kv heads (K)", c.n_kv_heads),
        ("head dim (Hd)", c.head_dim), ("ffn dim (F)", c.ffn_dim), ("vocab (V)", c.vocab_size),
        ("context", c.max_seq_len), ("norm eps", c.norm_eps),
    ]
    if c.arch == "llama":
        rows += [("rope theta", c.rope_theta), ("rope scaling", (c.rope_scaling or {}).get("rope_type"))]
    rows.append(("tied embeddings", c.tie_embeddings))
    if tok is not None:
        rows += [("tokenizer", f"{tok.name}, {tok.vocab_size} tokens"),
                 ("bos", tok.bos_token if tok.bos_id is not None else None),
                 ("end tokens", ", ".join(repr(tok.id_to_piece(i)) for i in sorted(tok.eos_ids))),
                 ("chat template", "yes" if tok.chat_template else "no")]
    else:
        rows.append(("tokenizer", info.get("tokenizer_error", "none")))
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    return 0


def cmd_tokenize(a) -> int:
    if a.tokenizer:
        import scratchlm
        tok = scratchlm.load_tokenizer(a.tokenizer)
    else:
        from .errors import TokenizerError
        model = _load(a)
        tok = model.tokenizer
        if tok is None:
            raise TokenizerError(model.info.get("tokenizer_error", "the model has no tokenizer"))
    ids = tok.encode(a.text)
    print(json.dumps(ids))
    for i in ids:
        print(f"{i:>8}  {tok.id_to_piece(i)!r}")
    print(f"{len(ids)} tokens, {len(a.text.encode('utf-8'))} bytes", file=sys.stderr)
    return 0


def cmd_bench(a) -> int:
    from .benchmark import run_bench

    if a.draft_tokens is not None and a.draft is None and a.lookup is None:
        raise ValueError("--draft-tokens needs --draft or --lookup")
    r = run_bench(a.model, prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens,
                  dtype=None if a.dtype == "stored" else a.dtype, kv_dtype=a.kv_dtype, draft=a.draft,
                  lookup=a.lookup, draft_tokens=a.draft_tokens, **_placement(a))
    spec = "spec_decode_tok_s" in r
    if a.json:
        out = {"load_s": round(r["load_s"], 3), "prefill_tok_s": round(r["prefill_tok_s"], 2),
               "decode_tok_s": round(r["decode_tok_s"], 2)}
        if spec:
            out.update(spec_decode_tok_s=round(r["spec_decode_tok_s"], 2),
                       speedup=round(r["spec_decode_tok_s"] / r["decode_tok_s"], 3),
                       acceptance=round(r["acceptance"], 4), identical=r["identical"])
        if "transfer_ms_per_token" in r:
            out.update(placement=r["placement"], compute_ms_per_token=round(r["compute_ms_per_token"], 3),
                       transfer_ms_per_token=round(r["transfer_ms_per_token"], 3),
                       transfer_mb_per_token=round(r["transfer_mb_per_token"], 3),
                       transfer_overlapped=r["transfer_overlapped"])
        print(json.dumps(out))
    else:
        print(f"model    {r['source']}")
        print(f"placed   {r['placement']}")
        print(f"load     {r['load_s']:.2f} s")
        print(f"prefill  {r['prefill_tok_s']:.1f} tok/s ({a.prompt_tokens} tokens in {r['prefill_s']:.2f} s)")
        print(f"decode   {r['decode_tok_s']:.1f} tok/s ({a.gen_tokens} tokens in {r['decode_s']:.2f} s)")
        if "transfer_ms_per_token" in r:
            note = ", overlapped with the compute" if r["transfer_overlapped"] else ""
            print(f"per token: compute {r['compute_ms_per_token']:.2f} ms, transfer {r['transfer_ms_per_token']:.2f} ms "
                  f"({r['transfer_mb_per_token']:.1f} MB{note})")
        if spec:
            how = f"--lookup {a.lookup}" if a.lookup is not None else f"--draft {a.draft}"
            print(f"spec     {r['spec_decode_tok_s']:.1f} tok/s ({how}, K={r['draft_tokens']}): "
                  f"{r['spec_decode_tok_s'] / r['decode_tok_s']:.2f}x decode, acceptance "
                  f"{r['accepted']}/{r['drafted']} = {r['acceptance']:.0%} in {r['rounds']} steps, "
                  f"tokens {'identical to' if r['identical'] else 'DIFFERENT from'} plain greedy")
    return 0


def cmd_perplexity(a) -> int:
    import math
    from pathlib import Path

    from .perplexity import perplexity

    from .errors import FormatError

    path = Path(a.file)  # read before loading the model: a bad path fails at once
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): perplexity reads a text file") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read: {e.strerror or e}") from None
    r = perplexity(_load(a), text, ctx=a.ctx, stride=a.stride, batch=a.batch)
    if a.json:
        err = r.ppl_stderr if math.isfinite(r.ppl_stderr) else None
        print(json.dumps({"ppl": r.ppl, "ppl_stderr": err, "tokens": r.tokens}))
    else:
        print(f"perplexity: {r.ppl:.4f} ± {r.ppl_stderr:.4f} over {r.tokens} tokens")
    return 0


def _start_or_resume(a, run_cls, make_args, needs: str, dist=None):
    """A new run of run_cls (Trainer, Finetuner) made from make_args(), or the run --resume DIR names:
    what `train` and `finetune` share. dist: this process's rank in a torchrun job (training/distributed.py)."""
    kw = dict(progress=False if a.no_progress else None, verbose=not a.quiet, dist=dist)
    if a.resume:
        if a.data or a.out:
            raise ValueError("--resume DIR continues a run with its own data and output; drop --data/--out")
        return run_cls.resume(a.resume, a.steps, threads=a.threads, device=a.device, **kw)
    if not a.data or not a.out:
        raise ValueError(f"{a.command} needs {needs} (or --resume DIR)")
    return run_cls.new(make_args(), **kw)


def cmd_train(a) -> int:
    from .training.distributed import Dist
    from .training.trainer import TrainArgs, Trainer  # Trainer hands a seq2seq run to seq2seq_train.Seq2SeqTrainer

    seq2seq = _seq2seq_run(a.resume) if a.resume else a.arch == "seq2seq"
    if not seq2seq and (a.pre_ln or a.separate_embeddings):
        raise ValueError("--pre-ln and --separate-embeddings apply to --arch seq2seq only")
    if seq2seq and (a.device or "cpu") != "cpu":
        raise ValueError("--arch seq2seq trains with NumPy on the CPU only: leave out --device")
    if seq2seq and int(os.environ.get("WORLD_SIZE") or 1) > 1:
        raise ValueError("--arch seq2seq trains in one process: run it without torchrun")
    dist = Dist.from_env(a.device or "cpu")  # one process, or a rank of a torchrun job (data-parallel)
    t = _start_or_resume(a, Trainer, lambda: TrainArgs(
        data=a.data, out=a.out, tokenizer=a.tokenizer, arch=a.arch, layers=a.layers, dim=a.dim, heads=a.heads,
        kv_heads=a.kv_heads or 0, context=a.context, batch=a.batch, accum=a.accum, steps=a.steps or 1000, lr=a.lr,
        warmup=a.warmup, eval_every=a.eval_every, save_every=a.save_every, seed=a.seed, threads=a.threads or 0,
        pre_ln=a.pre_ln, tie_embeddings=not a.separate_embeddings, device=a.device or "cpu"),
        "--data FILE and --out DIR", dist=dist)
    r = t.train()
    if not dist.is_main:
        return 0
    print(f"step {r['step']}: train loss {r.get('train_loss', float('nan')):.4f}, "
          f"val loss {r.get('val_loss', float('nan')):.4f} (bigram baseline {r.get('bigram_loss', float('nan')):.4f}); "
          f"run in {t.run_dir}")
    return 0


def cmd_explain(a) -> int:
    from .errors import PromptError
    from .explain import explain
    from .explain.report import check_writable

    if a.prompt == "":
        raise PromptError("empty prompt: give some text to explain")
    if a.out is not None:
        check_writable(a.out)  # fail before loading the model
    if _seq2seq_run(a.model):
        from .explain.seq2seq import explain_seq2seq
        from .training.seq2seq_train import load_run
        explain_seq2seq(load_run(a.model), a.prompt, layer=a.layer, head=a.head, top=a.top, lang=a.lang, out=a.out)
        return 0
    explain(_load(a), a.prompt, layer=a.layer, head=a.head, top=a.top, lang=a.lang, out=a.out,
            max_tokens=a.max_tokens)
    return 0


def cmd_export(a) -> int:
    from .formats.export import export

    out = export(a.model, a.format, a.out, a.dtype)
    print(f"wrote {out}")
    return 0


def cmd_finetune(a) -> int:
    from .training.distributed import Dist
    from .training.finetune import FinetuneArgs, Finetuner

    dist = Dist.from_env(a.device or "cpu")  # one process, or a rank of a torchrun job (data-parallel)
    t = _start_or_resume(a, Finetuner, lambda: FinetuneArgs(
        data=a.data, out=a.out, base=a.model, rank=a.rank, alpha=a.alpha, dropout=a.dropout, targets=a.targets,
        epochs=a.epochs, steps=a.steps or 0, lr=a.lr, batch=a.batch, context=a.context, seed=a.seed,
        save_every=a.save_every, threads=a.threads or 0, dtype=a.dtype, device=a.device or "cpu"),
        "--data FILE.jsonl and --out DIR", dist=dist)
    r = t.train()
    if not dist.is_main:
        return 0
    print(f"step {r['step']}: loss {r['loss'] if r['loss'] is not None else float('nan'):.4f}; adapter in {r['out']}")
    return 0


def cmd_merge(a) -> int:
    from .formats.export import export_gguf, export_hf

    model = _load(a, dtype="f32")  # the adapter is added into float32 weights
    model.adapter.merge_into(model)
    out = export_gguf(model, a.out, a.dtype) if a.format == "gguf" else export_hf(model, a.out, a.dtype)
    print(f"wrote {out}")
    return 0


def cmd_quantize(a) -> int:
    import time
    from collections import Counter

    from .formats.export import quantize_model
    from .quant import GGML_TYPES

    start = time.perf_counter()
    out, types = quantize_model(a.model, a.out, a.type, adapter=a.adapter)
    mix = ", ".join(f"{n} {t}" for t, n in Counter(GGML_TYPES[t].name for t in types.values()).most_common())
    print(f"wrote {out} ({a.type}, {out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s; tensors: {mix})")
    return 0


def cmd_serve(a) -> int:
    if a.queue < 0:
        raise ValueError(f"--queue must be >= 0, got {a.queue}")
    from .serve.cli import serve

    return serve(_load(a), host=a.host, port=a.port, api_key=a.api_key, parallel=a.parallel, queue_size=a.queue,
                 ctx=a.ctx, model_id=a.model_id)


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "chat": cmd_chat, "info": cmd_info, "tokenize": cmd_tokenize, "bench": cmd_bench,
            "perplexity": cmd_perplexity, "train": cmd_train,
            "explain": cmd_explain, "export": cmd_export, "finetune": cmd_finetune, "merge": cmd_merge,
            "quantize": cmd_quantize}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        rank = os.environ.get("RANK") if os.environ.get("WORLD_SIZE", "1") != "1" else None  # a torchrun job's rank
        print(f"scratchlm: error: {f'[rank {rank}] ' if rank else ''}{msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
