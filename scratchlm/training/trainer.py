"""The training loop: a small Llama or GPT-2 trained from scratch on a text file, on the CPU.

    >>> from scratchlm.training.trainer import TrainArgs, Trainer     # doctest: +SKIP
    >>> Trainer.new(TrainArgs(data=["corpus.txt"], out="runs/tiny", steps=500)).train()
    >>> Trainer.resume("runs/tiny", steps=1000).train()                # continue to 1000 steps in all

Each step: `accum` micro-batches through `model.loss_and_grads` (our own backward pass), gradient
clipping by global norm, one AdamW update with the scheduled learning rate. Around it: a count-based
bigram baseline printed at the start, periodic train/validation loss on fixed batches, text
samples, a JSONL log, a PNG of the loss curves and crash-safe checkpoints (checkpoint.py).

Determinism: the weights are a function of (seed, data, arguments) only. The data sampler's RNG
is checkpointed; evaluation and samples use their own generators, so they never shift the training
batches; a resumed run therefore reaches exactly the weights of an uninterrupted one.

Data-parallel (`torchrun --nproc-per-node N -m scratchlm train ...`, distributed.py): every rank draws the
same global batch, computes its shard of it, and one all-reduce a step sums the shards' gradients; rank 0
alone writes the run directory. A checkpoint holds nothing rank-specific: any rank count resumes it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig, expected_shapes
from ..errors import FormatError, TokenizerError, UnsupportedError
from .. import ops
from ..model import Model
from ..perplexity import score
from . import checkpoint as ck
from .data import BatchSampler, TokenData, bigram_loss, eval_batches, read_corpus, unigram_loss, write_tokens
from .distributed import Dist
from .optim import AdamW, clip_grad_norm, global_norm, lr_at
from .parallel import keep_freed_memory, parallel_loss_and_grads, resolve_threads, shard_rows


@dataclass
class TrainArgs:
    """Everything that defines a run (saved in config.json under "train")."""

    data: list = field(default_factory=list)  # corpus file(s)
    out: str = ""
    tokenizer: str = "char"  # "char", "bpe:N" or a tokenizer/model path
    arch: str = "llama"  # "llama", "gpt2" or "seq2seq" (the encoder-decoder: seq2seq_train.py)
    layers: int = 4
    dim: int = 128
    heads: int = 4
    kv_heads: int = 0  # 0: same as heads (no grouped-query attention)
    ffn_dim: int = 0  # 0: 8D/3 rounded up to a multiple of 32 (llama), 4D (gpt2)
    tie_embeddings: bool = True  # seq2seq: one table for source, target and output projection
    pre_ln: bool = False  # seq2seq only: pre-LN sublayers instead of the paper's post-LN
    context: int = 128
    batch: int = 16
    accum: int = 1  # micro-batches per optimizer step (gradient accumulation)
    steps: int = 1000  # total optimizer steps
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = -1  # -1: min(100, steps // 10)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    sample_every: int = 0  # 0: with every evaluation
    sample_tokens: int = 80
    seed: int = 0
    val_fraction: float = 0.1
    plot: bool = True
    threads: int = 0  # threads sharing out each batch (parallel.py); 0: every usable core, fixed at start
    device: str = "cpu"  # where forward and backward run (devices.py); the weights and AdamW stay on the host

    def validate(self) -> None:
        ints = ("layers", "dim", "heads", "context", "batch", "accum", "steps", "eval_every", "eval_batches",
                "save_every", "sample_tokens")
        for n in ints:
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1 or v > 1 << 24:
                raise ValueError(f"--{n.replace('_', '-')} must be a positive integer, got {v!r}")
        for n in ("kv_heads", "ffn_dim", "sample_every"):
            v = getattr(self, n)
            if not isinstance(v, int) or v < 0 or v > 1 << 24:
                raise ValueError(f"--{n.replace('_', '-')} must be a non-negative integer, got {v!r}")
        if self.arch not in ("llama", "gpt2", "seq2seq"):
            raise UnsupportedError(f"--arch must be llama, gpt2 or seq2seq, got {self.arch!r}")
        if self.dim % self.heads:
            raise ValueError(f"--dim ({self.dim}) must be a multiple of --heads ({self.heads})")
        if (self.dim // self.heads) % 2:
            raise ValueError(f"head dim {self.dim // self.heads} (--dim / --heads) must be even for RoPE")
        if self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")
        if self.arch == "gpt2" and self.kv_heads not in (0, self.heads):
            raise UnsupportedError("GPT-2 has no grouped-query attention: leave --kv-heads out")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("betas must be in [0, 1)")
        self.threads = resolve_threads(self.threads)  # fixed now and saved, so a resume cuts batches alike
        from ..devices import parse_device
        parse_device(self.device)  # an unknown name or a missing GPU fails before any work

    @property
    def warmup_steps(self) -> int:
        return self.warmup if self.warmup >= 0 else min(100, self.steps // 10)

    def model_config(self, vocab_size: int) -> ModelConfig:
        D = self.dim
        F = self.ffn_dim or ((8 * D // 3 + 31) // 32 * 32 if self.arch == "llama" else 4 * D)
        return ModelConfig(arch=self.arch, dim=D, n_layers=self.layers, n_heads=self.heads,
                           n_kv_heads=self.kv_heads or self.heads, vocab_size=int(vocab_size), ffn_dim=F,
                           max_seq_len=self.context, tie_embeddings=self.tie_embeddings,
                           norm_eps=1e-5, rope_theta=10000.0)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def model_on_device(model: Model, device: str) -> Model:
    """A float32 copy of `model` on a torch device (devices.py), the same tokenizer and info."""
    from .. import devices

    plan = devices.make_plan(model.config.n_layers, device, "f32")
    weights = devices.place_weights(dict(model.weights), plan)
    work = Model(model.config, weights, model.tokenizer, info=dict(model.info, placement=plan.describe()))
    devices.apply_plan(work, plan)
    return work


def copy_weights(src: Model, dst: Model) -> None:
    """Write src's weights into dst's, in place (dst's canonical entries are views of its fused matrices)."""
    for name, w in dst.weights.items():
        w[...] = ops.move(src.weights[name], w)


def init_weights(cfg: ModelConfig, seed: int) -> dict:
    """GPT-2-style initialisation: N(0, 0.02) matrices, the projections that write into the residual
    stream (wo, w2) scaled by 1/sqrt(2L) so the stream's variance does not grow with depth,
    norms at 1, biases at 0."""
    rng = np.random.Generator(np.random.PCG64(seed))
    std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.n_layers)
    w = {}
    for name, shape in expected_shapes(cfg).items():  # a fixed order: the same seed gives the same model
        if name.endswith(".bias"):
            w[name] = np.zeros(shape, np.float32)
        elif "norm" in name:
            w[name] = np.ones(shape, np.float32)
        else:
            s = out_std if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
            w[name] = (rng.standard_normal(shape, dtype=np.float32) * np.float32(s))
    return w


def build_tokenizer(spec: str, text: str):
    """"char", "bpe:N" (trained on the corpus), or a path to a tokenizer file / model."""
    from ..tokenizer.train import train_bpe, train_char_tokenizer

    if spec == "char":
        return train_char_tokenizer(text)
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or not 256 <= int(n) <= 1 << 20:
            raise TokenizerError(f"--tokenizer bpe:N needs a vocabulary size N >= 256, got {spec!r}")
        return train_bpe(text, int(n))
    if os.path.exists(spec):
        from ..tokenizer import load_tokenizer
        return load_tokenizer(spec)
    raise TokenizerError(f"unknown tokenizer {spec!r}: use char, bpe:N, or the path of a tokenizer or model")


def eval_loss(model: Model, batches) -> float:
    """Mean cross-entropy over a list of (inputs, targets) batches, forward only: every position of each
    held-out window scored by perplexity.score, the function `scratchlm perplexity` scores with."""
    total = 0.0
    for x, y in batches:
        total += float(score(model, x, y).mean())  # [B,T] NLLs
    return total / len(batches)


def accumulate_grads(model: Model, batches, threads: int = 1, dist: Dist | None = None) -> tuple[float, dict]:
    """Mean loss and mean gradients over micro-batches [(inputs [B,T], targets [B,T]), ...]: the same
    numbers as one batch of all of them together (every micro-batch has B*T targets). Each micro-batch
    runs in chunks shared out to `threads` threads (parallel.py). With several data-parallel ranks
    (distributed.py) each computes its shard of every micro-batch, and one all-reduce after the last
    sums the shards' parts: every rank gets the whole result."""
    world = 1 if dist is None else dist.world
    loss, grads, n = 0.0, None, 0
    for x, y in batches:
        rows = shard_rows(len(x), dist.rank, world) if world > 1 else None
        l, g = parallel_loss_and_grads(model, x, y, threads=threads, rows=rows)
        loss, n = loss + l, n + 1
        if grads is None:
            grads = g  # fresh arrays from the backward: ours to accumulate into
        else:
            for name, v in g.items():
                grads[name] += v
    if world > 1:
        loss = dist.all_reduce_sum([loss])[0]
        grads = dist.all_reduce_grads(grads)
    if n > 1:
        for v in grads.values():
            v *= np.float32(1.0 / n)
    return loss / n, grads


def _eval_line(ev: dict) -> str:
    """'train 1.2345  val 1.3456', then any other measure of the evaluation (seq2seq's val_exact)."""
    extra = "".join(f"  {k} {v:.4f}" for k, v in ev.items() if k not in ("train_loss", "val_loss"))
    return f"train {ev['train_loss']:.4f}  val {ev['val_loss']:.4f}{extra}"


class RunLog:
    """What every run directory's loop shares (training here, LoRA in finetune.py): messages, the
    JSONL log that a checkpoint records the length of, and the loss plot. In a data-parallel job only
    rank 0 says, logs and plots (the others' calls do nothing)."""

    dist = Dist()  # a single process unless the run's constructor is given a torch.distributed one

    def say(self, msg: str) -> None:
        if self.verbose and self.dist.is_main:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stdout)

    def log(self, rec: dict) -> None:
        if not self.dist.is_main:
            return
        self.history.append(rec)
        if self._log is None:
            self._log = open(self.run_dir / ck.LOG_NAME, "a", encoding="utf-8")
        self._log.write(json.dumps(rec) + "\n")
        self._log.flush()  # `tail -f log.jsonl` follows the run; durability comes with each checkpoint's fsync

    def sync_log(self) -> int:
        """Make the log durable before a checkpoint records its length; return that length in bytes."""
        if not self.dist.is_main:
            return 0
        if self._log is not None:
            self._log.flush()
            os.fsync(self._log.fileno())
        return (self.run_dir / ck.LOG_NAME).stat().st_size

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def restore_log(self, state: dict) -> None:
        """On resume, the log continues from what the checkpoint had seen: drop records of later steps."""
        if not self.dist.is_main:
            return
        log = self.run_dir / ck.LOG_NAME
        with open(log, "ab") as f:
            f.truncate(min(int(state.get("log_bytes", 0)), f.seek(0, os.SEEK_END)))
        self.history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]

    def plot(self) -> Path | None:
        """loss.png: the training loss of every step (and its moving average) and the evaluations."""
        if not self.dist.is_main:
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        steps = [r["step"] for r in self.history if "loss" in r]
        losses = [r["loss"] for r in self.history if "loss" in r]
        evals = [r for r in self.history if "val_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if losses:
            ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8, label="train (batch)")
            k = max(1, len(losses) // 50)
            if k > 1:
                smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
                ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=1.5, label=f"train (mean of {k})")
        if evals:
            ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:green", ms=3, label="train (eval)")
            ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", ms=3, label="validation")
        base = next((r for r in self.history if "bigram_loss" in r), None)
        if base:
            ax.axhline(base["bigram_loss"], color="gray", ls="--", lw=1, label="bigram baseline (val)")
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.set_title(f"{self.run_dir.name}: {self.cfg.arch}, {self.cfg.n_params / 1e6:.2f}M params")
        ax.grid(alpha=0.3)
        ax.legend()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        path = self.run_dir / "loss.png"
        ck.atomic_write(path, buf.getvalue())
        return path

    # --- the loop ------------------------------------------------------------------------------


class Trainer(RunLog):
    """One training run: model, optimizer, data sampler, step counter and the run directory."""

    def __init__(self, run_dir: Path, args: TrainArgs, model: Model, data: TokenData, *,
                 progress: bool | None = None, verbose: bool = True, dist: Dist | None = None):
        self.run_dir, self.args, self.model, self.data = Path(run_dir), args, model, data
        self.cfg = model.config
        self.dist = dist or Dist()
        self.dist.check_batch(args.batch)
        self.opt = AdamW(model.weights, betas=(args.beta1, args.beta2), eps=args.eps, weight_decay=args.weight_decay)
        # the model that runs forward and backward: the host model itself, or its float32 copy on a torch
        # device; the host weights stay the master copy (AdamW, checkpoints) and go back after each step
        self.work = model if args.device == "cpu" else model_on_device(model, args.device)
        self.sampler = self.make_sampler()
        self.step = 0
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.is_main
        self.verbose = verbose
        self._eval_sets = None
        self._log = None
        # one trainer per run directory (in a data-parallel job: rank 0, the one that writes it)
        self._lock = ck.lock_run(self.run_dir) if self.dist.is_main else None
        keep_freed_memory()
        self.history: list[dict] = []  # every log record of this run (read back on resume)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def new(cls, args: TrainArgs, **kw) -> "Trainer":
        """Start a run: encode the corpus, build the tokenizer and a freshly initialised model. In a
        data-parallel job (kw dist) rank 0 makes the run directory; the others then open it."""
        if args.arch == "seq2seq" and cls is Trainer:  # the encoder-decoder has its own data and model
            from .seq2seq_train import Seq2SeqTrainer
            return Seq2SeqTrainer.new(args, **kw)
        dist = kw.get("dist") or Dist()
        if not dist.is_main:
            dist.check_batch(args.batch)
            dist.barrier()  # rank 0 has written the run (or failed, and torchrun stops this rank)
            return cls.resume(args.out, steps=args.steps, threads=args.threads, **kw)
        args.validate()
        dist.check_batch(args.batch)  # before the run directory is written
        out = ck.check_writable(args.out)
        if ck.is_run_dir(out) or (out / "latest").exists():
            raise FormatError(f"{out}: already holds a training run; use --resume {out} or another --out")
        text, sources = read_corpus(args.data)
        tok = build_tokenizer(args.tokenizer, text)
        ids = tok.encode(text)
        data = write_tokens(ids, out, vocab_size=tok.vocab_size, tokenizer_name=args.tokenizer,
                            sources=sources, val_fraction=args.val_fraction)
        data.check_context(args.context)
        cfg = args.model_config(tok.vocab_size)
        train_args = dataclasses.asdict(args)
        train_args["data"] = [str(p) for p in args.data]
        train_args["out"] = str(args.out)
        ck.init_run(out, cfg, train_args, tok)
        model = Model(cfg, init_weights(cfg, args.seed), tok, info={"source": str(out), "format": "run"})
        t = cls(out, args, model, data, **kw)
        (out / ck.LOG_NAME).write_bytes(b"")
        dist.barrier()
        return t

    @classmethod
    def resume(cls, run_dir, steps: int | None = None, threads: int | None = None, device: str | None = None,
               **kw) -> "Trainer":
        """Continue a run from its latest checkpoint (from step 0 if it has none yet). `steps` is the new
        total; the cosine schedule is stretched to it (pass the original total for an exact continuation).
        `threads` replaces the run's thread count (one that cuts batches otherwise changes float rounding)."""
        run_dir = Path(run_dir)
        main = (kw.get("dist") or Dist()).is_main
        if not ck.is_run_dir(run_dir):
            raise FormatError(f"{run_dir}: not a training run directory (no {ck.RUN_MARKER})")
        from .seq2seq_train import Seq2SeqTrainer, is_seq2seq_run
        if cls is Trainer and is_seq2seq_run(run_dir):
            return Seq2SeqTrainer.resume(run_dir, steps, threads, **kw)
        if main:  # rank 0 writes the run; the other ranks of a data-parallel job only read it
            ck.check_writable(run_dir)
        cfg, train = ck.read_run_config(run_dir)
        args = TrainArgs.from_dict(train)
        if steps is not None:
            args.steps = steps
        if threads is not None:
            args.threads = threads
        if device is not None:
            args.device = device
        args.validate()
        tok = ck.load_run_tokenizer(run_dir)
        data = TokenData(run_dir)
        data.check_context(args.context)
        ckpt = ck.latest_checkpoint(run_dir)
        if ckpt is None:
            model = Model(cfg, init_weights(cfg, args.seed), tok, info={"source": str(run_dir), "format": "run"})
            t = cls(run_dir, args, model, data, **kw)
            if main:
                (run_dir / ck.LOG_NAME).write_bytes(b"")
            return t
        weights, opt_tensors, state = ck.load_checkpoint_files(ckpt, cfg)
        model = Model(cfg, weights, tok, info={"source": str(run_dir), "format": "run"})
        t = cls(run_dir, args, model, data, **kw)
        t.opt.load_state(opt_tensors, state.get("optimizer") or {}, str(ckpt))
        t.sampler.set_state(state.get("sampler"))
        t.step = state["step"]
        t.restore_log(state)
        return t

    # --- pieces of the loop (seq2seq_train.Seq2SeqTrainer replaces the data-shaped ones) ---------

    def make_sampler(self):
        return BatchSampler(self.data.train, self.args.batch, self.args.context, self.args.seed)

    def describe_data(self) -> str:
        return f"{len(self.data.train):,} train / {len(self.data.val):,} val tokens"

    def lr(self, step: int) -> float:
        a = self.args
        return lr_at(step, a.lr, a.warmup_steps, a.steps, a.lr * a.min_lr_ratio)

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns loss, lr and grad norm."""
        a = self.args
        lr = self.lr(self.step)
        # every rank draws the whole global batch (the same sampler): rank r computes its shard of it
        loss, grads = accumulate_grads(self.work, (self.sampler.next() for _ in range(a.accum)), a.threads, self.dist)
        if self.work is not self.model:  # computed on a torch device: the update is made on the host
            host = np.empty(0, np.float32)
            grads = {n: ops.move(g, host) for n, g in grads.items()}
        norm = clip_grad_norm(grads, a.grad_clip) if a.grad_clip > 0 else global_norm(grads)
        self.opt.step(grads, lr)
        if self.work is not self.model:
            copy_weights(self.model, self.work)
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": norm}

    def evaluate(self) -> dict:
        a = self.args
        if self._eval_sets is None:  # fixed batches: the same text at every evaluation
            n, B, T = a.eval_batches, a.batch, a.context
            self._eval_sets = {"train": eval_batches(self.data.train, n, B, T, a.seed + 1),
                               "val": eval_batches(self.data.val, n, B, T, a.seed + 2)}
        d = self.dist
        if d.world == 1:
            return {f"{k}_loss": eval_loss(self.work, v) for k, v in self._eval_sets.items()}
        # data-parallel: each rank scores every world-th batch; the sums of the batch means add up
        names = list(self._eval_sets)
        sums = [sum(float(score(self.work, x, y).mean()) for x, y in self._eval_sets[k][d.rank::d.world])  # [B,T] NLLs
                for k in names]
        sums = d.all_reduce_sum(sums, "the evaluation losses")
        return {f"{k}_loss": s / len(self._eval_sets[k]) for k, s in zip(names, sums)}

    def sample(self) -> str:
        """A short continuation of the start of the validation text (its own seeded sampler)."""
        a = self.args
        n = max(1, min(16, a.context // 4))
        prompt = [int(i) for i in self.data.val[:n]]
        max_tokens = max(1, min(a.sample_tokens, a.context - n - 1))
        tok = self.model.tokenizer
        text = self.work.generate(prompt, max_tokens=max_tokens, temperature=0.8, top_k=0, top_p=1.0,
                                   min_p=0.0, seed=a.seed + self.step)
        return tok.decode(prompt) + text

    def baselines(self) -> dict:
        V = self.cfg.vocab_size
        return {"uniform_loss": math.log(V), "unigram_loss": unigram_loss(self.data.train, self.data.val, V),
                "bigram_loss": bigram_loss(self.data.train, self.data.val, V)}

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes it; every rank waits until it is complete)."""
        path = None
        if self.dist.is_main:
            state = {"sampler": self.sampler.state(), "log_bytes": self.sync_log(),
                     "tokens_seen": self.step * self.args.batch * self.args.context * self.args.accum}
            path = ck.save_checkpoint(self.run_dir, self.step, self.model.weights, self.opt, state)
        self.dist.barrier()
        return path

    def train(self) -> dict:
        """Train up to args.steps; returns the last evaluation (train_loss, val_loss) and baselines."""
        from tqdm import tqdm

        a = self.args
        tokens_per_step = a.batch * a.context * a.accum
        result = {}
        self.dist.check_same("the step to start at and the model's size", self.step, self.cfg.n_params)
        if self.step == 0:
            if self.dist.is_main:  # printed and logged by rank 0 only: the others need not count bigrams
                base = self.baselines()
                result.update(base)
                self.log(dict(step=0, **base))
                self.say(f"{self.cfg.arch} {self.cfg.n_params / 1e6:.2f}M params, vocab {self.cfg.vocab_size}, "
                         f"{self.describe_data()}"
                         + (f", {self.dist.world} data-parallel ranks ({self.dist.backend})" if self.dist.world > 1 else ""))
                self.say(f"baselines (val loss): uniform {base['uniform_loss']:.3f}  unigram {base['unigram_loss']:.3f}  "
                         f"bigram {base['bigram_loss']:.3f}")
            ev = self.evaluate()
            self.log(dict(step=0, **ev))
            self.say(f"step 0: {_eval_line(ev)}")
        else:
            base = next((r for r in self.history if "bigram_loss" in r), None)
            if base:
                result.update({k: v for k, v in base.items() if k != "step"})
            last = next((r for r in reversed(self.history) if "val_loss" in r), None)
            if last:
                result.update(train_loss=last["train_loss"], val_loss=last["val_loss"])
            self.say(f"resuming {self.run_dir} at step {self.step} of {a.steps}")
        bar = tqdm(total=a.steps, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
        t_last, n_last = time.perf_counter(), 0
        try:
            while self.step < a.steps:
                r = self.train_step()
                now = time.perf_counter()
                n_last += 1
                tok_s = n_last * tokens_per_step / max(now - t_last, 1e-9)
                if n_last >= 10 or now - t_last > 2.0:  # a smoothed rate, not a per-step jitter
                    t_last, n_last = now, 0
                self.log({"step": self.step, "loss": round(r["loss"], 6), "lr": r["lr"],
                          "grad_norm": round(r["grad_norm"], 6), "tok_s": round(tok_s, 1)})
                bar.update(1)
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if not math.isfinite(r["loss"]):
                    raise ValueError(f"the loss became {r['loss']} at step {self.step}; lower --lr")
                if self.step % a.eval_every == 0 or self.step == a.steps:
                    ev = self.evaluate()
                    result.update(ev)
                    self.log(dict(step=self.step, **ev))
                    self.say(f"step {self.step}: {_eval_line(ev)}")
                if self.dist.is_main and (self.step % (a.sample_every or a.eval_every) == 0 or self.step == a.steps):
                    s = self.sample()
                    self.log({"step": self.step, "sample": s})
                    self.say(f"--- sample at step {self.step} ---\n{s}\n---")
                if self.step % a.save_every == 0 or self.step == a.steps:
                    self.save()
                if a.plot and self.step % a.eval_every == 0 and self.step < a.steps:
                    self.plot()  # the curves so far (rendering takes ~0.1 s: only with evaluations)
        finally:
            bar.close()
            self.close_log()
            if self._lock is not None:
                self._lock.close()  # releases the run for a later --resume (even one in this process)
        if a.plot:
            self.plot()
        result["step"] = self.step
        return result
