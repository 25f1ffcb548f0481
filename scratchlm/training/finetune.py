"""Fine-tuning with LoRA: chat data in, a PEFT adapter out, with the training loop's log, plot and checkpoints.

    >>> from scratchlm.training.finetune import FinetuneArgs, Finetuner          # doctest: +SKIP
    >>> Finetuner.new(FinetuneArgs(data="examples/sdu_weihai.jsonl", out="runs/ft")).train()
    >>> model = scratchlm.load(adapter="runs/ft")                                 # base + adapter

Data: JSON Lines, one conversation per line, either {"messages": [{"role", "content"}, ...]} or
{"prompt": ..., "response": ...}. Each conversation goes through the base model's own chat template
(chat.py) and only the assistant's tokens are learned (a loss mask): the span of an assistant turn is
what the template adds between "the conversation so far, with the assistant header" and "the
conversation including this reply", so it covers the reply and the template's end-of-turn token.

Rows: conversations are packed one after another into rows of context+1 tokens (inputs are the
first T, targets the last T); a conversation longer than a row is truncated at its end, one left
without any assistant token is dropped, and the report says which lines were cut and by how much.

Run directory (like a training run, checkpoint.py): scratchlm-finetune.json (arguments, base model),
log.jsonl, loss.png, checkpoints/step-N/{model.safetensors (adapter params), optimizer.safetensors,
state.json}, `latest`, and the adapter itself in PEFT format (adapter_config.json,
adapter_model.safetensors), rewritten at every checkpoint, so `--adapter RUN_DIR` works at once.
Determinism: the row order of epoch e and the dropout masks of step s come from generators seeded
by (seed, e) and (seed, s): a resumed run reaches exactly the adapters of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FormatError, PromptError
from . import checkpoint as ck
from .lora import LoRA, adapter_summary
from .distributed import Dist
from .optim import AdamW, clip_grad_norm, global_norm, lr_at
from .parallel import keep_freed_memory, parallel_loss_and_grads, resolve_threads, shard_rows
from .trainer import RunLog

MARKER = "scratchlm-finetune.json"
MAX_DATA_BYTES = 1 << 30  # refuse absurd data files before reading
BASE_ROLES = ("system", "user", "assistant")


class DataError(FormatError):
    """Bad fine-tuning data (the message names the file and line)."""


# --- data --------------------------------------------------------------------------------------


def read_jsonl(path) -> list[tuple[int, list[dict]]]:
    """[(line number, messages), ...] of a JSONL file of {"messages": [...]} or {"prompt", "response"}."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_DATA_BYTES:
            raise DataError(f"{path}: larger than {MAX_DATA_BYTES >> 30} GiB")
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .jsonl file") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({str(e).split(':')[0]})") from None
        out.append((n, _messages_of(obj, f"{path}:{n}")))
    if not out:
        raise DataError(f"{path}: holds no examples")
    return out


def _messages_of(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with \"messages\" or \"prompt\"/\"response\"")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: message {j} must be {{\"role\": str, \"content\": str}}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if "prompt" in obj or "response" in obj:
        p, r = obj.get("prompt"), obj.get("response")
        if not isinstance(p, str) or not isinstance(r, str):
            raise DataError(f"{where}: \"prompt\" and \"response\" must both be strings")
        return [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
    raise DataError(f"{where}: expected a JSON object with \"messages\" or \"prompt\"/\"response\"")


def template_roles(template: str) -> set[str]:
    """Roles a chat template knows: system/user/assistant, and tool-like roles it names itself."""
    return set(BASE_ROLES) | {r for r in ("tool", "ipython", "function", "developer") if f"'{r}'" in template
                              or f'"{r}"' in template}


def training_template(tokenizer) -> str:
    """The chat format to fine-tune in: the model's own template; Llama 3's for a Meta directory; for a
    model with none (GPT-2), chat.PLAIN_TEMPLATE, which the run then saves beside the adapter."""
    from ..chat import PLAIN_TEMPLATE, _fallback_template

    try:
        return getattr(tokenizer, "chat_template", None) or _fallback_template(tokenizer)
    except PromptError:  # "this model has no chat template"
        return PLAIN_TEMPLATE


def encode_example(tokenizer, messages: list[dict], where: str, template: str | None = None):
    """(ids, mask) of one conversation: mask[t] = 1 where token t belongs to an assistant turn."""
    from ..chat import encode_chat

    if template is None:
        template = training_template(tokenizer)
    roles = template_roles(template)
    for m in messages:
        if m["role"] not in roles:
            raise DataError(f"{where}: role {m['role']!r} is not one the chat template knows ({', '.join(sorted(roles))})")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn, nothing to learn")
    try:
        ids = encode_chat(tokenizer, messages, add_generation_prompt=False, template=template)
        mask = np.zeros(len(ids), np.uint8)
        for j, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = encode_chat(tokenizer, messages[:j], add_generation_prompt=True, template=template) if j else []
            through = encode_chat(tokenizer, messages[:j + 1], add_generation_prompt=False, template=template)
            lo = _common_prefix(before, through)  # where this reply starts (after the assistant header)
            hi = _common_prefix(through, ids)  # where the full conversation stops agreeing with "so far"
            mask[lo:hi] = 1
    except PromptError as e:
        raise DataError(f"{where}: {e}") from None
    if not mask.any():
        raise DataError(f"{where}: the chat template left no assistant tokens")
    return np.asarray(ids, np.int64), mask


def _common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def pack_rows(examples, context: int, pad_id: int):
    """Pack (line, ids, mask) examples into rows of context+1 tokens. Returns (rows [N,T+1] int64,
    masks [N,T+1] uint8, report dict)."""
    L = context + 1
    rows, masks, cur_ids, cur_mask = [], [], [], []
    cut, dropped = [], []

    def flush():
        if cur_ids:
            pad = L - sum(len(a) for a in cur_ids)
            rows.append(np.concatenate(cur_ids + [np.full(pad, pad_id, np.int64)]))
            masks.append(np.concatenate(cur_mask + [np.zeros(pad, np.uint8)]))
            cur_ids.clear()
            cur_mask.clear()

    n_tokens = n_learn = 0
    for line, ids, mask in examples:
        if len(ids) > L:
            cut.append((line, len(ids) - L))
            ids, mask = ids[:L], mask[:L]
            if not mask[1:].any():  # position 0 is never a target
                dropped.append(line)
                continue
        if sum(len(a) for a in cur_ids) + len(ids) > L:
            flush()
        cur_ids.append(ids)
        cur_mask.append(mask)
        n_tokens += len(ids)
        n_learn += int(mask.sum())
    flush()
    if not rows:
        raise DataError("no example keeps an assistant token within the context; raise --context")
    report = {"examples": len(examples), "rows": len(rows), "context": context, "tokens": n_tokens,
              "assistant_tokens": n_learn, "padding": 1.0 - n_tokens / (len(rows) * L),
              "truncated": cut, "dropped": dropped}
    return np.stack(rows), np.stack(masks), report


def describe_report(r: dict) -> list[str]:
    lines = [f"{r['examples']} conversations, {r['tokens']:,} tokens ({r['assistant_tokens']:,} learned: assistant "
             f"turns) packed into {r['rows']} rows of {r['context']}+1 tokens ({100 * r['padding']:.0f}% padding)"]
    if r["truncated"]:
        shown = ", ".join(f"line {n} (-{k} tokens)" for n, k in r["truncated"][:10])
        more = f" and {len(r['truncated']) - 10} more" if len(r["truncated"]) > 10 else ""
        lines.append(f"truncated to the context: {len(r['truncated'])} conversations: {shown}{more}")
    if r["dropped"]:
        lines.append(f"dropped (no assistant token left within the context): lines {', '.join(map(str, r['dropped'][:20]))}")
    return lines


def load_rows(path, tokenizer, context: int):
    """The packed training rows of a JSONL file for this tokenizer: (rows, masks, report)."""
    if tokenizer is None:
        raise DataError("the base model has no tokenizer: fine-tuning on chat data needs one")
    pad = tokenizer.eos_id if getattr(tokenizer, "eos_id", None) is not None else 0
    examples = [(n, *encode_example(tokenizer, msgs, f"{path}:{n}")) for n, msgs in read_jsonl(path)]
    return pack_rows(examples, context, pad)


# --- the run ----------------------------------------------------------------------------------


@dataclass
class FinetuneArgs:
    data: str
    out: str
    base: str | None = None  # None = the default model
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str = "all"  # "all": every projection of the base (lora.all_targets)
    epochs: int = 3
    steps: int = 0  # 0 = epochs * rows/batch
    lr: float = 2e-4
    batch: int = 4
    context: int = 256
    seed: int = 0
    warmup: int = -1  # -1 = 10% of the steps (at most 100)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    save_every: int = 50
    plot: bool = True
    threads: int = 0  # threads sharing out each batch (parallel.py); 0: every usable core, fixed at start
    dtype: str = "stored"  # the base's weights: as the file stores them (kept packed) or "f32"; bf16/f16 on torch
    device: str = "cpu"  # where the base runs (devices.py); the adapters and AdamW stay on the host

    def validate(self) -> None:
        if self.dtype not in ("stored", "f32", "bf16", "f16"):
            raise ValueError(f"--dtype must be stored, f32, bf16 or f16, got {self.dtype!r}")
        from ..devices import make_plan
        make_plan(1, self.device, None if self.dtype == "stored" else self.dtype)  # a bad device/dtype: one line
        for k in ("rank", "epochs", "batch", "context", "save_every"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"--{k} must be at least 1, got {getattr(self, k)}")
        if self.steps < 0:
            raise ValueError(f"--steps must be positive, got {self.steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        self.threads = resolve_threads(self.threads)  # fixed now and saved: a resume cuts batches and draws dropout alike
        if not isinstance(self.targets, str) or not self.targets.strip(","):
            raise ValueError(f"--targets must name projections (or all), got {self.targets!r}")


def read_tensors(path) -> dict:
    """The float32 tensors of a checkpoint's safetensors file (checkpoint.py's reader, one-line errors)."""
    return ck._load_tensors(path)


class Finetuner(RunLog):
    """One LoRA fine-tuning run: base model (frozen), adapters, AdamW on the adapters only, data rows."""

    def __init__(self, run_dir, args: FinetuneArgs, model, lora: LoRA, rows, masks, report, *,
                 progress: bool | None = None, verbose: bool = True, dist: Dist | None = None):
        self.run_dir, self.args, self.model, self.lora = Path(run_dir), args, model, lora
        self.cfg = model.config
        self.dist = dist or Dist()
        self.dist.check_batch(args.batch)
        self.rows, self.masks, self.report = rows, masks, report
        lora.attach(model)
        # no optimizer state for the base: AdamW sees the adapters' parameters only
        self.opt = AdamW(lora.params, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
        n = len(rows)
        self.total = args.steps or args.epochs * math.ceil(n / args.batch)
        self.warmup = args.warmup if args.warmup >= 0 else min(100, self.total // 10)
        self.step = 0
        self.progress = (sys.stderr.isatty() if progress is None else progress) and self.dist.is_main
        self.verbose = verbose
        self.history: list[dict] = []
        self._log = None
        self._perms: dict[int, np.ndarray] = {}
        self._lock = ck.lock_run(self.run_dir) if self.dist.is_main else None  # rank 0 writes the run
        # a base without a chat template was trained in training_template's format: the adapter keeps it
        self.chat_template = None if getattr(model.tokenizer, "chat_template", None) else training_template(model.tokenizer)
        keep_freed_memory()

    # --- construction -----------------------------------------------------------------------

    @staticmethod
    def _load_base(args: FinetuneArgs):
        import scratchlm

        return scratchlm.load(args.base, progress=False, dtype=None if args.dtype == "stored" else args.dtype,
                              device=args.device)

    @classmethod
    def new(cls, args: FinetuneArgs, model=None, **kw) -> "Finetuner":
        """Start a run in args.out (a new or empty directory). `model`: an already loaded base to use. In a
        data-parallel job (kw dist) rank 0 makes the run directory; the others then open it."""
        dist = kw.get("dist") or Dist()
        if not dist.is_main:
            dist.check_batch(args.batch)
            dist.barrier()  # rank 0 has written the run (or failed, and torchrun stops this rank)
            return cls.resume(args.out, steps=args.steps or None, model=model, threads=args.threads, **kw)
        args.validate()
        dist.check_batch(args.batch)  # before the run directory is written
        out = ck.check_writable(args.out)
        if (out / MARKER).exists():
            raise FormatError(f"{out}: already holds a fine-tuning run; use --resume {out} or another --out")
        if model is None:
            model = cls._load_base(args)
        if args.context > model.config.max_seq_len:
            raise ValueError(f"--context {args.context} is longer than the base model's context of "
                             f"{model.config.max_seq_len} tokens")
        if args.base is None:
            from .. import assets
            args.base = str(assets.default_model_path())
        lora = LoRA(model.config, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
                    seed=args.seed, base_name=model.info.get("name") or str(args.base))  # checks targets and rank
        args.targets = ",".join(lora.targets)  # "all" made explicit for this base
        rows, masks, report = load_rows(args.data, model.tokenizer, args.context)
        ck.atomic_write_json(out / MARKER, {"format": "scratchlm-finetune", "version": 1,
                                            "args": dataclasses.asdict(args)})
        (out / ck.LOG_NAME).write_bytes(b"")
        t = cls(out, args, model, lora, rows, masks, report, **kw)
        dist.barrier()
        return t

    @classmethod
    def resume(cls, run_dir, steps: int | None = None, model=None, threads: int | None = None,
               device: str | None = None, **kw) -> "Finetuner":
        """Continue a run from its latest checkpoint; `steps` is the new total; `threads` replaces the run's
        thread count (one that cuts batches otherwise draws other dropout masks)."""
        run_dir = Path(run_dir)
        meta = ck.read_json(run_dir / MARKER, "fine-tuning run description")
        if not isinstance(meta, dict) or not isinstance(meta.get("args"), dict):
            raise FormatError(f"{run_dir / MARKER}: not a fine-tuning run description")
        try:
            args = FinetuneArgs(**meta["args"])
        except TypeError as e:
            raise FormatError(f"{run_dir / MARKER}: {e}") from None
        if steps is not None:
            args.steps = steps
        if threads is not None:
            args.threads = threads
        if device is not None:
            args.device = device
        args.validate()
        main = (kw.get("dist") or Dist()).is_main
        if main:  # rank 0 writes the run; the other ranks of a data-parallel job only read it
            ck.check_writable(run_dir)
        if model is None:
            model = cls._load_base(args)
        if args.context > model.config.max_seq_len:
            raise ValueError(f"--context {args.context} is longer than the base model's context of "
                             f"{model.config.max_seq_len} tokens")
        rows, masks, report = load_rows(args.data, model.tokenizer, args.context)
        ckpt = ck.latest_checkpoint(run_dir)
        weights = None
        if ckpt is not None:
            weights = read_tensors(ckpt / "model.safetensors")
        lora = LoRA(model.config, rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=args.targets,
                    seed=args.seed, weights=weights, base_name=model.info.get("name") or str(args.base))
        t = cls(run_dir, args, model, lora, rows, masks, report, **kw)
        if ckpt is None:
            if main:
                (run_dir / ck.LOG_NAME).write_bytes(b"")
            return t
        state = ck.read_json(ckpt / "state.json", "checkpoint state")
        t.opt.load_state(read_tensors(ckpt / "optimizer.safetensors"), state.get("optimizer") or {}, str(ckpt))
        t.step = int(state["step"])
        t.restore_log(state)
        return t

    # --- pieces -------------------------------------------------------------------------------

    def batch_rows(self, step: int) -> np.ndarray:
        """Row indices of optimizer step `step`: epoch e visits the rows in its own seeded order."""
        n, B = len(self.rows), self.args.batch
        out = []
        for k in range(step * B, (step + 1) * B):
            e, j = divmod(k, n)
            if e not in self._perms:
                self._perms = {e: np.random.default_rng([self.args.seed, e]).permutation(n)}
            out.append(self._perms[e][j])
        return np.asarray(out)

    def train_step(self) -> dict:
        a = self.args
        idx = self.batch_rows(self.step)
        rows, masks = self.rows[idx], self.masks[idx]  # [B,T+1] each
        x, y, m = rows[:, :-1], rows[:, 1:], masks[:, 1:]  # inputs, next-token targets, which targets count
        if not m.any():
            m = np.ones_like(m)  # cannot happen with packed rows (each holds assistant tokens); be safe
        lr = lr_at(self.step, a.lr, self.warmup, self.total, a.lr * a.min_lr_ratio)
        self.lora.rng = np.random.default_rng([a.seed, 1, self.step])  # dropout masks of this step
        self.lora.training = True
        d = self.dist  # data-parallel: every rank takes the same rows, computes its shard, one all-reduce sums
        try:
            loss, grads = parallel_loss_and_grads(self.model, x, y, loss_mask=m, wrt="adapters", threads=a.threads,
                                                  rows=shard_rows(len(x), d.rank, d.world) if d.world > 1 else None)
        finally:
            self.lora.training = False
        if d.world > 1:
            loss = d.all_reduce_sum([loss])[0]
            grads = d.all_reduce_grads(grads)
        norm = clip_grad_norm(grads, a.grad_clip) if a.grad_clip > 0 else global_norm(grads)
        self.opt.step(grads, lr)
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": norm, "tokens": int(x.size), "learned": int(m.sum())}

    def save(self) -> Path | None:
        """Checkpoint the current step (rank 0 writes it; every rank waits until it is complete)."""
        ckpt = None
        if self.dist.is_main:
            state = {"log_bytes": self.sync_log()}
            ckpt = ck.save_checkpoint(self.run_dir, self.step, self.lora.params, self.opt, state)
            self.lora.save(self.run_dir, chat_template=self.chat_template)  # the PEFT adapter, usable at once
        self.dist.barrier()
        return ckpt

    # --- the loop ------------------------------------------------------------------------------

    def train(self) -> dict:
        from tqdm import tqdm

        a = self.args
        for line in describe_report(self.report):
            self.say(line)
        self.say(f"{adapter_summary(self.lora)} (base: {self.cfg.n_params:,} frozen); "
                 f"{self.total} steps of {a.batch} rows")
        if self.step:
            self.say(f"resuming {self.run_dir} at step {self.step} of {self.total}")
        if self.dist.world > 1:
            self.say(f"{self.dist.world} data-parallel ranks ({self.dist.backend}), {a.batch} rows a step among them")
        self.dist.check_same("the step to start at and the adapters' size", self.step, self.lora.n_params)
        bar = tqdm(total=self.total, initial=self.step, disable=not self.progress, unit="step", dynamic_ncols=True,
                   file=sys.stderr)
        r, t0, n0 = {}, time.perf_counter(), 0
        try:
            while self.step < self.total:
                r = self.train_step()
                n0 += r["tokens"]
                tok_s = n0 / max(time.perf_counter() - t0, 1e-9)
                self.log({"step": self.step, "loss": round(r["loss"], 6), "lr": r["lr"],
                          "grad_norm": round(r["grad_norm"], 6), "tok_s": round(tok_s, 1)})
                bar.update(1)
                bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if not math.isfinite(r["loss"]):
                    raise ValueError(f"the loss became {r['loss']} at step {self.step}; lower --lr")
                if self.step % a.save_every == 0 or self.step == self.total:
                    self.save()
        finally:
            bar.close()
            self.close_log()
            if self._lock is not None:
                self._lock.close()
        if a.plot:
            self.plot()
        if self.dist.is_main and not (self.run_dir / "adapter_config.json").exists():
            self.lora.save(self.run_dir, chat_template=self.chat_template)
        return {"step": self.step, "loss": r.get("loss"), "out": str(self.run_dir)}
