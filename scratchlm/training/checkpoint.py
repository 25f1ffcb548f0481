"""Run directories and checkpoints that survive a crash.

A run directory:

    scratchlm-run.json        the marker that makes `scratchlm.load(RUN_DIR)` recognise it
    config.json               {"model": ModelConfig fields, "train": training arguments}
    tokenizer.json            the tokenizer (tokenizer.save), read back with scratchlm.load_tokenizer
    tokens.bin, tokens.json   the encoded corpus (see data.py)
    log.jsonl                 one JSON object per logged step / evaluation / sample
    loss.png                  train and validation loss curves
    checkpoints/step-NNNNNNN/ model.safetensors, optimizer.safetensors, state.json
    latest                    "checkpoints/step-NNNNNNN": the newest complete checkpoint

Crash safety: every file is written to a temp file in the same directory, flushed, fsync'ed and
renamed over its name (a rename within one file system is atomic), then the directory is fsync'ed
so the rename itself is durable. A checkpoint is assembled in a temp directory, renamed into place
whole, and only then does `latest` move to it; older checkpoints are deleted after that. A SIGKILL
at any instant therefore leaves `latest` naming a complete checkpoint (or no `latest` at all, before
the first one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import FormatError, ModelNotFoundError

RUN_MARKER = "scratchlm-run.json"
RUN_FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
LOG_NAME = "log.jsonl"
TOKENIZER_NAME = "tokenizer.json"
MAX_STATE_BYTES = 1 << 24  # state.json / config.json are small; refuse absurd files before reading


# --- atomic file writes ----------------------------------------------------------------------


def fsync_dir(path) -> None:
    """Make renames/creations inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes) -> None:
    """Write `data` to `path` so that a reader (or a crash) sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path, what: str):
    path = Path(path)
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise FormatError(f"{path}: {what} is larger than {MAX_STATE_BYTES >> 20} MiB")
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: missing {what}") from None
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot read {what}: {e}") from None


# --- safetensors ----------------------------------------------------------------------------


def _save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.numpy import save

    data = save({n: np.ascontiguousarray(a, dtype=np.float32) for n, a in tensors.items()},
                metadata={k: str(v) for k, v in (metadata or {}).items()})
    atomic_write(path, data)


def _load_tensors(path) -> dict:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None


# --- run directory --------------------------------------------------------------------------


def is_run_dir(path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


def check_writable(out) -> Path:
    """Create `out` (and parents) if needed and prove we can write there, with a one-line error if not."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FormatError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{out}: output directory is not writable ({e.strerror or e})") from None
    return out


def init_run(out, cfg: ModelConfig, train_args: dict, tokenizer) -> Path:
    """Write the marker, config.json and the tokenizer of a new run (a fresh directory, or an empty one)."""
    out = check_writable(out)
    if is_run_dir(out) or (out / "latest").exists():
        raise FormatError(f"{out}: already holds a training run; use --resume {out} or another --out")
    atomic_write_json(out / "config.json", {"model": cfg.to_dict(), "train": train_args})
    save_tokenizer(tokenizer, out / TOKENIZER_NAME)
    (out / CKPT_DIR).mkdir(exist_ok=True)
    # the marker comes last: a directory with it has everything a checkpoint needs besides weights
    atomic_write_json(out / RUN_MARKER, {"format": "scratchlm-run", "version": RUN_FORMAT_VERSION})
    return out


def save_tokenizer(tokenizer, path) -> None:
    """tokenizer.save(path) writes the file; we then fsync it so a crash cannot leave it half-written."""
    tokenizer.save(str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    fsync_dir(Path(path).parent)


def load_run_tokenizer(run_dir):
    path = Path(run_dir) / TOKENIZER_NAME
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: the run has no tokenizer")
    from ..tokenizer import load_tokenizer
    return load_tokenizer(path)


def read_run_config(run_dir) -> tuple[ModelConfig, dict]:
    run_dir = Path(run_dir)
    marker = read_json(run_dir / RUN_MARKER, "run marker")
    if not isinstance(marker, dict) or marker.get("format") != "scratchlm-run":
        raise FormatError(f"{run_dir / RUN_MARKER}: not a scratchlm run marker")
    if marker.get("version") != RUN_FORMAT_VERSION:
        raise FormatError(f"{run_dir}: run format version {marker.get('version')!r}, this scratchlm reads {RUN_FORMAT_VERSION}")
    cfg_json = read_json(run_dir / "config.json", "run config")
    if not isinstance(cfg_json, dict) or not isinstance(cfg_json.get("model"), dict):
        raise FormatError(f"{run_dir / 'config.json'}: expected {{'model': {{...}}, 'train': {{...}}}}")
    if cfg_json["model"].get("arch") == "seq2seq":  # seq2seq_train.py reads those
        from ..errors import UnsupportedError
        raise UnsupportedError(f"{run_dir}: an encoder-decoder (seq2seq) run; `scratchlm generate -m` and "
                               "`explain -m` run it, this command needs a decoder model")
    try:
        cfg = ModelConfig.from_dict(cfg_json["model"])
    except TypeError as e:
        raise FormatError(f"{run_dir / 'config.json'}: bad model config ({e})") from None
    return cfg, dict(cfg_json.get("train") or {})


def lock_run(run_dir):
    """An exclusive lock on the run (released when the returned file closes or the process dies, even by
    SIGKILL), so two trainers never write the same checkpoints."""
    import fcntl

    f = open(Path(run_dir) / "train.lock", "a+b")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise OSError(f"{run_dir}: another process is training this run") from None
    return f


# --- checkpoints ----------------------------------------------------------------------------


def _ckpt_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(run_dir, step: int, weights: dict, optimizer, state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` (weights, optimizer moments, state.json), then point `latest` at it."""
    run_dir = Path(run_dir)
    root = run_dir / CKPT_DIR
    root.mkdir(exist_ok=True)
    final = root / _ckpt_name(step)
    tmp = root / f".{_ckpt_name(step)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _save_tensors(tmp / "model.safetensors", weights, {"format": "scratchlm-run", "step": step})
    _save_tensors(tmp / "optimizer.safetensors", optimizer.state_tensors())
    atomic_write_json(tmp / "state.json", dict(state, step=step, optimizer=optimizer.state_meta()))
    if final.exists():  # left by a run killed after the rename but before `latest` moved: redo it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write(run_dir / "latest", f"{CKPT_DIR}/{final.name}\n".encode())
    # only now is it safe to forget older checkpoints (and debris of killed writes)
    names = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    for old in names[:-keep] if keep > 0 else []:
        if old != final.name:
            shutil.rmtree(root / old, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(".") and p.name != tmp.name:
            shutil.rmtree(p, ignore_errors=True)
    mine = f".tmp-{os.getpid()}"
    for p in run_dir.iterdir():  # temp files of an atomic_write that a kill interrupted
        if p.name.startswith(".") and ".tmp-" in p.name and not p.name.endswith(mine) and p.is_file():
            p.unlink(missing_ok=True)
    return final


def latest_checkpoint(run_dir) -> Path | None:
    """The directory `latest` names, or None before the first checkpoint."""
    run_dir = Path(run_dir)
    p = run_dir / "latest"
    if not p.is_file():
        return None
    rel = p.read_text(encoding="utf-8", errors="replace").strip()
    root = (run_dir / CKPT_DIR).resolve()
    ckpt = (run_dir / rel).resolve()
    if ckpt.parent != root or not ckpt.name.startswith("step-") or not ckpt.is_dir():
        raise FormatError(f"{p}: names {rel!r}, not a checkpoint directory of this run")
    return ckpt


def load_checkpoint_files(ckpt: Path, cfg: ModelConfig, *, optimizer: bool = True):
    """(weights, optimizer tensors or None, state dict) of one checkpoint directory, shapes checked."""
    from ..config import check_weights

    weights = _load_tensors(ckpt / "model.safetensors")
    check_weights(cfg, {n: tuple(a.shape) for n, a in weights.items()}, str(ckpt / "model.safetensors"))
    for n, a in weights.items():
        if a.dtype != np.float32:
            raise FormatError(f"{ckpt / 'model.safetensors'}: {n} is {a.dtype}, expected float32")
    state = read_json(ckpt / "state.json", "checkpoint state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise FormatError(f"{ckpt / 'state.json'}: no step count")
    opt = _load_tensors(ckpt / "optimizer.safetensors") if optimizer else None
    return weights, opt, state


def load_run(path, progress: bool = False):
    """`scratchlm.load(RUN_DIR)`: (ModelConfig, weights, tokenizer, info) of the run's latest checkpoint."""
    run_dir = Path(path)
    cfg, train = read_run_config(run_dir)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ModelNotFoundError(f"{run_dir}: the run has no checkpoint yet")
    weights, _, state = load_checkpoint_files(ckpt, cfg, optimizer=False)
    tokenizer = load_run_tokenizer(run_dir)
    info = {"name": f"{run_dir.name} (step {state['step']})", "step": state["step"], "checkpoint": str(ckpt),
            "eos_token_id": None, "train": train}
    return cfg, weights, tokenizer, info
