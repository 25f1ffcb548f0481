"""Training the encoder-decoder (scratchlm.seq2seq) on a TSV of source/target pairs, with trainer.py's loop.

    scratchlm train --arch seq2seq --data pairs.tsv --out runs/dates

pairs.tsv: one pair a line, `source<TAB>target` (the first tab splits; blank lines are skipped). The run
directory is trainer.py's (config.json, tokenizer.json, log.jsonl, loss.png, checkpoints/, latest) with
pairs.tsv in place of tokens.bin: the pairs as read, so a resume trains on exactly the same data. The
last `val_fraction` of the pairs is the validation split.

Seq2SeqTrainer keeps Trainer's loop, checkpoints and exact resume, and replaces what depends on the data:
a sampler of random pairs (its RNG state is checkpointed), the loss and gradients of a batch of pairs,
evaluation (loss on fixed batches and greedy exact match on validation pairs) and the sample.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from ..errors import FormatError, ModelNotFoundError, UnsupportedError
from ..seq2seq import Seq2Seq, Seq2SeqConfig, exact_match, init_weights, make_batch
from . import checkpoint as ck
from .data import DataError, SeededSampler, bigram_loss, unigram_loss
from .optim import clip_grad_norm, global_norm
from .trainer import TrainArgs, Trainer

PAIRS_NAME = "pairs.tsv"
PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
EXACT_PAIRS = 64  # validation pairs decoded at each evaluation for the exact-match figure


def read_pairs(paths) -> list[tuple[str, str]]:
    """(source, target) pairs of TSV file(s); a non-blank line without a tab is a one-line error."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise DataError("no training data given (--data FILE.tsv)")
    pairs = []
    for p in map(Path, paths):
        if not p.is_file():
            raise DataError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise DataError(f"{p}: cannot read: {e.strerror or e}") from None
        for n, line in enumerate(text.split("\n"), 1):
            line = line.rstrip("\r")
            if not line.strip():
                continue
            if "\t" not in line:
                raise DataError(f"{p}:{n}: no tab between source and target (expected 'source<TAB>target')")
            src, tgt = line.split("\t", 1)
            if not src:
                raise DataError(f"{p}:{n}: empty source before the tab")
            pairs.append((src, tgt))
    if not pairs:
        raise DataError(f"no pairs in {', '.join(map(str, paths))}")
    return pairs


def write_pairs(path, pairs) -> None:
    ck.atomic_write(path, "".join(f"{s}\t{t}\n" for s, t in pairs).encode("utf-8"))


def build_tokenizer(pairs):
    """One character vocabulary for sources and targets (so embeddings can be shared), with padding,
    begin-of-target and end-of-target tokens."""
    from ..tokenizer.char import CharTokenizer

    chars = sorted({c for s, t in pairs for c in s + t})
    return CharTokenizer(chars, special_tokens=(PAD, BOS, EOS), eos_token=EOS)


class PairData:
    """Encoded pairs and their deterministic split: train = the first 1 - val_fraction, val = the rest."""

    def __init__(self, pairs, tokenizer, val_fraction: float, eos_id: int):
        self.pairs, self.eos_id = list(pairs), eos_id
        self.encoded = [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in self.pairs]
        n_val = int(round(len(self.pairs) * val_fraction))
        if n_val < 1 or n_val >= len(self.pairs):
            raise DataError(f"{len(self.pairs)} pairs cannot be split into train and validation with "
                            f"val_fraction {val_fraction}: give more pairs")
        cut = len(self.pairs) - n_val
        self.train, self.val = self.encoded[:cut], self.encoded[cut:]
        self.val_text = self.pairs[cut:]

    def check_context(self, T: int) -> None:
        """Every source, and every target with its BOS or EOS, must fit in T positions."""
        for i, (s, t) in enumerate(self.encoded):
            if len(s) > T or len(t) + 1 > T:
                raise DataError(f"pair {i + 1} ({self.pairs[i][0][:30]!r}) is {max(len(s), len(t) + 1)} tokens, "
                                f"longer than --context {T}")

    def target_stream(self, split) -> np.ndarray:
        """The targets of a split, each followed by EOS, as one id stream (for the count baselines)."""
        return np.asarray([i for _, t in split for i in list(t) + [self.eos_id]], np.int64)


class PairSampler(SeededSampler):
    """Random batches of B pairs (drawn with replacement), reproducible from the seed or a saved state."""

    what = "pair-sampler"

    def __init__(self, pairs, batch: int, cfg: Seq2SeqConfig, seed: int):
        super().__init__(seed)
        self.pairs, self.B, self.cfg = pairs, int(batch), cfg

    def next(self):
        idx = self.rng.integers(0, len(self.pairs), size=self.B)  # [B]
        return make_batch([self.pairs[i] for i in idx], self.cfg)  # src [B,S], tgt_in [B,T], tgt_out [B,T]


def model_config(args: TrainArgs, tok) -> Seq2SeqConfig:
    D = args.dim
    return Seq2SeqConfig(dim=D, n_heads=args.heads, n_enc_layers=args.layers, n_dec_layers=args.layers,
                         ffn_dim=args.ffn_dim or 4 * D, vocab_size=tok.vocab_size, max_seq_len=args.context,
                         norm_first=args.pre_ln, shared_embeddings=args.tie_embeddings,
                         tie_output=args.tie_embeddings, pad_id=tok.special_tokens[PAD],
                         bos_id=tok.special_tokens[BOS], eos_id=tok.special_tokens[EOS])


def is_seq2seq_run(path) -> bool:
    """A run directory whose config.json says arch "seq2seq" (read without the decoder's ModelConfig)."""
    path = Path(path)
    if not ck.is_run_dir(path):
        return False
    cfg = ck.read_json(path / "config.json", "run config")
    return isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and cfg["model"].get("arch") == "seq2seq"


def read_run_config(run_dir) -> tuple[Seq2SeqConfig, dict]:
    run_dir = Path(run_dir)
    marker = ck.read_json(run_dir / ck.RUN_MARKER, "run marker")
    if not isinstance(marker, dict) or marker.get("format") != "scratchlm-run" or marker.get("version") != ck.RUN_FORMAT_VERSION:
        raise FormatError(f"{run_dir / ck.RUN_MARKER}: not a version-{ck.RUN_FORMAT_VERSION} scratchlm run marker")
    cfg_json = ck.read_json(run_dir / "config.json", "run config")
    try:
        cfg = Seq2SeqConfig.from_dict(cfg_json["model"])
    except (TypeError, KeyError) as e:
        raise FormatError(f"{run_dir / 'config.json'}: bad seq2seq config ({e})") from None
    return cfg, dict(cfg_json.get("train") or {})


def load_checkpoint(ckpt: Path, cfg: Seq2SeqConfig, optimizer: bool = True):
    """(weights, optimizer tensors or None, state) of one checkpoint, every name, shape and dtype checked."""
    from ..seq2seq import check_weights

    weights = ck._load_tensors(ckpt / "model.safetensors")
    check_weights(cfg, weights, str(ckpt / "model.safetensors"))
    for n, a in weights.items():
        if a.dtype != np.float32:
            raise FormatError(f"{ckpt / 'model.safetensors'}: {n} is {a.dtype}, expected float32")
    state = ck.read_json(ckpt / "state.json", "checkpoint state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise FormatError(f"{ckpt / 'state.json'}: no step count")
    return weights, (ck._load_tensors(ckpt / "optimizer.safetensors") if optimizer else None), state


def load_run(run_dir) -> Seq2Seq:
    """The model of a seq2seq run's latest checkpoint (what `generate -m RUN` and `explain -m RUN` use)."""
    run_dir = Path(run_dir)
    cfg, train = read_run_config(run_dir)
    ckpt = ck.latest_checkpoint(run_dir)
    if ckpt is None:
        raise ModelNotFoundError(f"{run_dir}: the run has no checkpoint yet")
    weights, _, state = load_checkpoint(ckpt, cfg, optimizer=False)
    tok = ck.load_run_tokenizer(run_dir)
    return Seq2Seq(cfg, weights, tok, info={"source": str(run_dir), "format": "run", "step": state["step"],
                                            "name": f"{run_dir.name} (step {state['step']})", "train": train})


class Seq2SeqTrainer(Trainer):
    """Trainer's loop for the encoder-decoder; see the module doc."""

    @classmethod
    def new(cls, args: TrainArgs, **kw) -> "Seq2SeqTrainer":
        args.validate()
        if args.tokenizer != "char":
            raise UnsupportedError("--arch seq2seq trains a character vocabulary: leave --tokenizer out")
        if args.kv_heads not in (0, args.heads):
            raise UnsupportedError("the encoder-decoder has no grouped-query attention: leave --kv-heads out")
        out = ck.check_writable(args.out)
        if ck.is_run_dir(out) or (out / "latest").exists():
            raise FormatError(f"{out}: already holds a training run; use --resume {out} or another --out")
        pairs = read_pairs(args.data)
        tok = build_tokenizer(pairs)
        cfg = model_config(args, tok)
        data = cls._data(pairs, tok, cfg, args)
        write_pairs(out / PAIRS_NAME, pairs)
        train_args = dataclasses.asdict(args)
        train_args["data"] = [str(p) for p in args.data]
        train_args["out"] = str(args.out)
        ck.init_run(out, cfg, train_args, tok)
        model = Seq2Seq(cfg, init_weights(cfg, args.seed), tok, info={"source": str(out), "format": "run"})
        t = cls(out, args, model, data, **kw)
        (out / ck.LOG_NAME).write_bytes(b"")
        return t

    @staticmethod
    def _data(pairs, tok, cfg, args) -> PairData:
        data = PairData(pairs, tok, args.val_fraction, cfg.eos_id)
        data.check_context(args.context)
        return data

    @classmethod
    def resume(cls, run_dir, steps: int | None = None, threads: int | None = None, **kw) -> "Seq2SeqTrainer":
        run_dir = Path(run_dir)
        if not is_seq2seq_run(run_dir):
            raise FormatError(f"{run_dir}: not a seq2seq training run directory")
        ck.check_writable(run_dir)
        cfg, train = read_run_config(run_dir)
        args = TrainArgs.from_dict(train)
        if steps is not None:
            args.steps = steps
        if threads is not None:
            args.threads = threads
        args.validate()
        tok = ck.load_run_tokenizer(run_dir)
        data = cls._data(read_pairs([run_dir / PAIRS_NAME]), tok, cfg, args)
        ckpt = ck.latest_checkpoint(run_dir)
        if ckpt is None:
            model = Seq2Seq(cfg, init_weights(cfg, args.seed), tok, info={"source": str(run_dir), "format": "run"})
            t = cls(run_dir, args, model, data, **kw)
            (run_dir / ck.LOG_NAME).write_bytes(b"")
            return t
        weights, opt_tensors, state = load_checkpoint(ckpt, cfg)
        model = Seq2Seq(cfg, weights, tok, info={"source": str(run_dir), "format": "run"})
        t = cls(run_dir, args, model, data, **kw)
        t.opt.load_state(opt_tensors, state.get("optimizer") or {}, str(ckpt))
        t.sampler.set_state(state.get("sampler"))
        t.step = state["step"]
        t.restore_log(state)
        return t

    # --- what depends on the data -------------------------------------------------------------

    def make_sampler(self):
        return PairSampler(self.data.train, self.args.batch, self.cfg, self.args.seed)

    def describe_data(self) -> str:
        return f"{len(self.data.train):,} train / {len(self.data.val):,} val pairs"

    def train_step(self) -> dict:
        """One optimizer step: the mean loss and gradients of `accum` batches of pairs, clipped, AdamW."""
        a = self.args
        lr = self.lr(self.step)
        loss, grads = 0.0, None
        for _ in range(a.accum):
            l, g = self.model.loss_and_grads(*self.sampler.next())
            loss += l / a.accum
            if grads is None:
                grads = g
            else:
                for n, v in g.items():
                    grads[n] += v
        if a.accum > 1:
            for v in grads.values():
                v *= np.float32(1.0 / a.accum)
        norm = clip_grad_norm(grads, a.grad_clip) if a.grad_clip > 0 else global_norm(grads)
        self.opt.step(grads, lr)
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": norm}

    def evaluate(self) -> dict:
        """Mean loss on fixed batches of training and validation pairs, and the greedy exact-match rate on
        the first EXACT_PAIRS validation pairs."""
        a = self.args
        if self._eval_sets is None:  # fixed batches: the same pairs at every evaluation
            self._eval_sets = {k: [PairSampler(split, a.batch, self.cfg, a.seed + j).next() for _ in range(a.eval_batches)]
                               for j, (k, split) in enumerate((("train", self.data.train), ("val", self.data.val)), 1)}
        ev = {}
        from ..seq2seq import forward, masked_cross_entropy
        for k, batches in self._eval_sets.items():
            ev[f"{k}_loss"] = float(np.mean([masked_cross_entropy(forward(self.model.weights, self.cfg, s, ti), to,
                                                                  self.cfg.pad_id)[0] for s, ti, to in batches]))
        ev["val_exact"] = exact_match(self.model, self.data.val_text[:EXACT_PAIRS])
        return ev

    def sample(self) -> str:
        src, tgt = self.data.val_text[0]
        return f"{src} -> {self.model.translate(src)}   (target {tgt})"

    def baselines(self) -> dict:
        """Cross-entropy of the validation targets under count models that ignore the source."""
        V = self.cfg.vocab_size
        tr, va = self.data.target_stream(self.data.train), self.data.target_stream(self.data.val)
        return {"uniform_loss": math.log(V), "unigram_loss": unigram_loss(tr, va, V),
                "bigram_loss": bigram_loss(tr, va, V)}


__all__ = ["Seq2SeqTrainer", "read_pairs", "load_run", "is_seq2seq_run"]
