"""Devices and layer placement: where each transformer block's weights live and where it runs.

One idea carries all of it. Every block has a *home*: an empty array on the device it runs on, in the
dtype it computes in (a NumPy float32 array for the host path, a torch tensor on "cpu" or "cuda:N"
otherwise). Before block i runs, the activations move to block i's home (ops.move: a no-op when they
are there already); block i's KV cache is allocated at that home too. The embedding, the final norm
and the output head live with the last block. So:

  --device cpu            every block at home in NumPy (packed weights, the C kernels): the default
  --device torch-cpu      the same model code on torch tensors on the CPU (CI runs every line of the torch path)
  --device cuda[:N]       ... on a GPU, weights in bf16 (default) or f16/f32 (--dtype)
  --gpu-layers N          blocks 0..N-1 on the torch device, the rest on the host in NumPy (llama.cpp's -ngl)
  --stream-layers         every block's weights stay in host memory (pinned on CUDA); each block is copied to
                          the device for its turn while the previous one computes (BlockStream), so a model
                          larger than the GPU's memory runs
  --devices cuda:0,cuda:1 blocks split into contiguous runs, one per device: a pipeline

Quantized files are dequantized tensor by tensor, a few rows at a time, straight into the target dtype
on the target device: no float32 copy of the whole model (nor of one whole tensor) ever exists.
Sampling and I/O stay on the host (generate.py moves the logits back).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import UnsupportedError
from .quant import QuantizedMatrix

DEVICES_HELP = "cpu (NumPy, default), torch-cpu (the torch path on the CPU), cuda or cuda:N (a GPU, via torch)"
TORCH_DTYPES = ("f32", "bf16", "f16")

# Rows dequantized at once when a packed weight goes to a torch device: the float32 chunk stays near 8 MB.
CONVERT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Device:
    """A device as the user names it: kind "numpy" (the host path) or "torch", and torch's device string."""

    kind: str
    torch_device: str = "cpu"

    @property
    def cuda(self) -> bool:
        return self.torch_device.startswith("cuda")

    def __str__(self) -> str:
        if self.kind == "numpy":
            return "cpu"
        return "torch-cpu" if self.torch_device == "cpu" else self.torch_device


NUMPY = Device("numpy")


def parse_device(name: str) -> Device:
    """'cpu', 'torch-cpu', 'cuda' or 'cuda:N' -> Device, or a one-line error (no GPU, bad name)."""
    name = (name or "cpu").strip().lower()
    if name == "cpu":
        return NUMPY
    if name == "torch-cpu":
        _torch()
        return Device("torch", "cpu")
    if name == "cuda" or name.startswith("cuda:"):
        torch = _torch()
        index = 0
        if name != "cuda":
            try:
                index = int(name[5:])
            except ValueError:
                raise UnsupportedError(f"bad device {name!r}: expected cuda or cuda:N") from None
        if not torch.cuda.is_available():
            raise UnsupportedError(f"device {name}: torch sees no CUDA GPU on this machine (try --device torch-cpu)")
        if not 0 <= index < torch.cuda.device_count():
            raise UnsupportedError(f"device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return Device("torch", f"cuda:{index}")
    raise UnsupportedError(f"unknown device {name!r}: choose {DEVICES_HELP}")


def _torch():
    try:
        import torch
    except ImportError:
        raise UnsupportedError("torch devices need PyTorch installed (pip install torch)") from None
    return torch


def torch_dtype(name: str):
    torch = _torch()
    return {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[name]


def default_dtype(device: Device) -> str:
    """bf16 on a GPU (half the bytes per token of f32; tensor cores); f32 for torch-cpu, the reference path."""
    return "bf16" if device.cuda else "f32"


# --- converting weights ------------------------------------------------------------------------

def to_torch(w, device: str, dtype, pin: bool = False):
    """One weight (a NumPy array or a QuantizedMatrix) as a new torch tensor on `device` in `dtype`.

    Packed blocks are dequantized a chunk of rows at a time into the preallocated result, so the only
    float32 copy alive is one chunk (~8 MB). `pin`: the result in page-locked host memory (device "cpu"),
    which a CUDA copy can read asynchronously."""
    torch = _torch()
    shape = tuple(w.shape)
    out = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
    if len(shape) < 2:  # norms and biases: small
        out.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
        return out
    rows = max(1, CONVERT_CHUNK_BYTES // (4 * shape[1]))
    for a in range(0, shape[0], rows):
        b = min(a + rows, shape[0])
        part = w[a:b].dequantize() if isinstance(w, QuantizedMatrix) else np.array(w[a:b], dtype=np.float32)  # [rows,cols] f32
        out[a:b].copy_(torch.from_numpy(part))  # cast to dtype and copied to the device in one step
    return out


@dataclass
class Plan:
    """Where each block lives: `homes[i]` the Device block i runs on, `streamed[i]` whether its weights
    stay in host memory and come in for its turn; the embedding, final norm and head go with the last block."""

    homes: list
    streamed: list
    dtype: str

    @property
    def head(self) -> Device:
        return self.homes[-1]

    def describe(self) -> str:
        """One line, e.g. '2 blocks on cuda:0, 28 on cpu (bf16)'."""
        runs, prev = [], None
        for h, s in zip(self.homes, self.streamed):
            key = f"{h}" + (" streamed from host memory" if s else "")
            if runs and prev == key:
                runs[-1][0] += 1
            else:
                runs.append([1, key])
            prev = key
        where = ", ".join(f"{n} block{'s' * (n != 1)} on {k}" for n, k in runs)
        torch_used = any(h.kind == "torch" for h in self.homes)
        return where + (f" ({self.dtype})" if torch_used else "")


def make_plan(n_layers: int, device: str = "cpu", dtype: str | None = None, gpu_layers: int | None = None,
              stream_layers: bool = False, devices: str | None = None) -> Plan:
    """The placement the user asked for, or a one-line error for a combination that makes no sense."""
    if devices:
        if gpu_layers is not None or stream_layers:
            raise UnsupportedError("--devices splits the blocks itself; it takes no --gpu-layers or --stream-layers")
        devs = [parse_device(d) for d in devices.split(",") if d.strip()]
        if any(d.kind != "torch" for d in devs):
            raise UnsupportedError("--devices lists torch devices (cuda:N, torch-cpu), not cpu")
        if len(devs) > n_layers:
            raise UnsupportedError(f"--devices names {len(devs)} devices for {n_layers} blocks")
        per = -(-n_layers // len(devs))  # contiguous runs, the last one shorter
        homes = [devs[min(i // per, len(devs) - 1)] for i in range(n_layers)]
        first = devs[0]
    else:
        first = parse_device(device)
        homes = [first] * n_layers
        if gpu_layers is not None or stream_layers:
            if first.kind != "torch":
                raise UnsupportedError("--gpu-layers and --stream-layers need a torch device: --device cuda (or torch-cpu)")
            if gpu_layers is not None and stream_layers:
                raise UnsupportedError("choose --gpu-layers N or --stream-layers, not both")
        if gpu_layers is not None:
            if gpu_layers < 0:
                raise UnsupportedError(f"--gpu-layers must be >= 0, got {gpu_layers}")
            homes = [first if i < gpu_layers else NUMPY for i in range(n_layers)]  # more than n_layers: all
    if first.kind == "torch" or any(h.kind == "torch" for h in homes):
        dtype = dtype or default_dtype(first)
        if dtype not in TORCH_DTYPES:
            raise UnsupportedError(f"dtype {dtype!r} on a torch device: choose f32, bf16 or f16")
    elif dtype not in (None, "f32"):
        raise UnsupportedError(f"dtype {dtype} needs a torch device (--device torch-cpu or cuda); "
                               "the NumPy path keeps the stored types or f32")
    return Plan(homes=homes, streamed=[bool(stream_layers)] * n_layers, dtype=dtype or "stored")


def weight_home(name: str, plan: Plan) -> tuple[Device, bool]:
    """(device, streamed) of one canonical weight: a block's own, or the head's for everything else."""
    if name.startswith("layers."):
        i = int(name.split(".", 2)[1])
        return plan.homes[i], plan.streamed[i]
    return plan.head, False


def place_weights(weights: dict, plan: Plan, progress: bool = False) -> dict:
    """The canonical weights with each one moved to its home (a new dict; NumPy homes keep theirs), with a
    progress bar on stderr when `progress`. Each weight is dropped from the source dict as it is converted."""
    from tqdm import tqdm

    out = {}
    names = list(weights)
    for name in tqdm(names, desc=f"placing weights: {plan.describe()}", unit="tensor", disable=not progress,
                     leave=False):
        dev, streamed = weight_home(name, plan)
        w = weights.pop(name)
        if dev.kind == "numpy":  # a host block: kept as stored, or widened like everything else with f32
            out[name] = w.dequantize() if plan.dtype == "f32" and isinstance(w, QuantizedMatrix) else w
        elif streamed:  # stays on the host, pinned so the per-turn copy can be asynchronous
            out[name] = to_torch(w, "cpu", torch_dtype(plan.dtype), pin=dev.cuda)
        else:
            out[name] = to_torch(w, dev.torch_device, torch_dtype(plan.dtype))
    return out


def home_like(dev: Device, dtype: str):
    """The empty array that stands for a home: what ops.move and the KV cache take their device and dtype from."""
    if dev.kind == "numpy":
        return np.empty(0, np.float32)
    torch = _torch()
    return torch.empty(0, dtype=torch_dtype(dtype), device=dev.torch_device)


# --- streaming blocks in for their turn ----------------------------------------------------------

class BlockStream:
    """Blocks whose weights stay in host memory, copied to the device for their turn.

    `blocks(layers)` yields (i, block i's arrays on the device) in order. Before block i runs, block i+1's
    copy is started (on CUDA: on a side stream, from pinned memory, so it overlaps block i's compute; on the
    CPU, a plain copy made in turn); after block i, its device copy goes back to a pool that the next copy
    writes into. So at most two device copies exist at once, whatever the number of blocks.

    `transfer_s` and `transfer_bytes` add up the copies (on CUDA measured with events on the copy stream,
    so the overlapped time is counted, not hidden); `live` counts device copies now alive, `peak_live`
    the most ever alive, `copies_made` the device buffers allocated (the rest were reused)."""

    def __init__(self, device: str, streamed: list):
        torch = _torch()
        self.device = device
        self.streamed = list(streamed)
        self.cuda = device.startswith("cuda")
        self.copy_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._pool = []  # device copies free for reuse: dict slot -> tensor
        self._events = []  # (start, end) CUDA events of copies not yet added to transfer_s
        self.live = self.peak_live = self.copies_made = 0
        self.transfer_s = 0.0
        self.transfer_bytes = 0

    def _slots(self, L):
        """The arrays of host block L to copy: Llama's w1 and w3 are views of w13, copied once with it."""
        skip = ("w1", "w3") if getattr(L, "w13", None) is not None else ()
        return {s: getattr(L, s) for s in L.__slots__ if s not in skip and getattr(L, s, None) is not None}

    def _copy_in(self, L):
        """Start copying host block L to the device: (device block, its buffers, ready event or None)."""
        torch = _torch()
        if len(self._events) > 512:  # a long generation: fold the old (long finished) copies' times in
            self.collect()
        host = self._slots(L)
        bufs = self._pool.pop() if self._pool else None
        if bufs is not None and any(bufs[s].shape != t.shape for s, t in host.items() if s in bufs):
            bufs = None  # a block of another shape: a fresh copy
        if bufs is None:
            bufs = {s: torch.empty(t.shape, dtype=t.dtype, device=self.device) for s, t in host.items()}
            self.copies_made += 1
        self.live += 1
        self.peak_live = max(self.peak_live, self.live)
        self.transfer_bytes += sum(t.numel() * t.element_size() for t in host.values())
        D = type(L)()
        for s in L.__slots__:
            setattr(D, s, None)
        if self.cuda:
            main = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_stream(main)  # the reused buffers' last readers are done
                start.record()
                for s, t in host.items():
                    bufs[s].copy_(t, non_blocking=True)
                end.record()
            self._events.append((start, end))
            ready = end
        else:
            t0 = time.perf_counter()
            for s, t in host.items():
                bufs[s].copy_(t)  # a real copy into the device buffer, as the GPU path makes
            self.transfer_s += time.perf_counter() - t0
            ready = None
        for s, t in bufs.items():
            setattr(D, s, t)
        if "w13" in bufs:  # Llama's gate and up: views of the fused copy's halves, as on the host
            F = L.w1.shape[0]
            D.w1, D.w3 = bufs["w13"][:F], bufs["w13"][F:]  # [2F,D] -> [F,D] each
        return D, bufs, ready

    def _release(self, bufs):
        self.live -= 1
        self._pool.append(bufs)

    def blocks(self, layers):
        """(i, arrays of block i on its device) for every block, streamed ones copied in just ahead of their turn."""
        torch = _torch() if self.cuda else None
        ahead = {}  # i -> (device block, buffers, ready event)

        def start(j):
            if j < len(layers) and self.streamed[j] and j not in ahead:
                ahead[j] = self._copy_in(layers[j])

        start(0)
        try:
            for i, L in enumerate(layers):
                if not self.streamed[i]:
                    start(i + 1)
                    yield i, L
                    continue
                D, bufs, ready = ahead.pop(i)
                try:
                    start(i + 1)  # the next block's copy overlaps this block's compute
                    if ready is not None:
                        torch.cuda.current_stream(self.device).wait_event(ready)
                    yield i, D
                finally:
                    self._release(bufs)  # back to the pool, also when the forward stops inside this block
        finally:
            for D, bufs, _ in ahead.values():  # an exception mid-forward: copies never used
                self._release(bufs)

    def collect(self) -> None:
        """Add the finished CUDA copies' times to transfer_s (waits for them)."""
        for s, e in self._events:
            e.synchronize()
            self.transfer_s += s.elapsed_time(e) / 1e3
        self._events.clear()

    def reset_counters(self) -> None:
        self.collect()
        self.transfer_s, self.transfer_bytes = 0.0, 0


class Traffic:
    """Seconds and bytes spent moving activations between devices (blocks on different homes), for bench."""

    def __init__(self):
        self.transfer_s = 0.0
        self.transfer_bytes = 0

    def timed_move(self, x, home):
        from . import ops

        t0 = time.perf_counter()
        y = ops.move(x, home)
        if y is not x:
            for a in (x, y):
                if ops.is_torch_array(a) and a.device.type == "cuda":
                    _torch().cuda.synchronize(a.device)  # the copy is done, not just queued
            self.transfer_s += time.perf_counter() - t0
            self.transfer_bytes += int(y.nbytes)
        return y


def apply_plan(model, plan: Plan) -> None:
    """Give the model its homes (and its BlockStream when blocks are streamed); the weights must already be
    where the plan says (place_weights)."""
    model.plan = plan
    likes = {}  # one shared object per device: the model moves its per-forward constants once to each
    model.homes = [likes.setdefault(h, home_like(h, plan.dtype)) for h in plan.homes]
    model.head_home = likes.setdefault(plan.head, home_like(plan.head, plan.dtype))
    if any(plan.streamed):
        model.stream = BlockStream(plan.homes[0].torch_device, plan.streamed)
