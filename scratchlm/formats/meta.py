"""Meta's original checkpoints: params.json + consolidated.NN.pth (+ tokenizer.model).

Meta's names are already our canonical names and its q/k rows are already in the interleaved RoPE
order, so the work here is (1) reading the .pth files without running pickled code and (2) gluing the
model-parallel shards back together.

A .pth written by torch.save is a zip archive:

    <prefix>/data.pkl     a pickle of the state dict; each tensor is a call
                          torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
                          where storage is a "persistent id" ('storage', torch.BFloat16Storage, key, device, numel)
    <prefix>/data/<key>   the raw bytes of each storage
    <prefix>/byteorder    "little" (or "big")

Unpickling normally imports and calls whatever globals the pickle names, so a malicious file can run
anything. Our Unpickler admits exactly four kinds of global and maps each to a stand-in of ours that only
records numbers; any other global (os.system, builtins.eval, ...) stops the load before anything runs.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

from ..config import ModelConfig, check_weights, config_value, is_int
from ..errors import FormatError, ModelNotFoundError, UnsupportedError
from ..quant import GGML_TYPE_IDS, QuantizedMatrix
from .safetensors_hf import bf16_to_f32

# Meta's defaults for Llama 3.1's scaled RoPE (use_scaled_rope in params.json).
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
IGNORED = ("rope.freqs",)  # Llama 1/2 checkpoints store the RoPE frequencies; we compute them
MAX_PICKLE = 256 << 20


# ---------------------------------------------------------------------------------------------------
# The restricted .pth reader

class _StorageKind:
    """Stand-in for torch.BFloat16Storage & co.: just the element type."""

    def __init__(self, name: str, dtype: str, itemsize: int):
        self.name, self.dtype, self.itemsize = name, dtype, itemsize


STORAGE_KINDS = {
    "BFloat16Storage": _StorageKind("BFloat16Storage", "bf16", 2),
    "HalfStorage": _StorageKind("HalfStorage", "f2", 2),
    "FloatStorage": _StorageKind("FloatStorage", "f4", 4),
}


class _Storage:
    def __init__(self, kind: _StorageKind, key: str, numel: int):
        self.kind, self.key, self.numel = kind, key, numel


class TensorRef:
    """A tensor described by the pickle: where its elements are, not the elements themselves."""

    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...]):
        self.storage, self.offset, self.shape = storage, offset, shape

    @property
    def dtype(self) -> str:
        return {"bf16": "bfloat16", "f2": "float16", "f4": "float32"}[self.storage.kind.dtype]


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """Stand-in for torch._utils._rebuild_tensor_v2: check the numbers, return a TensorRef."""
    if not isinstance(storage, _Storage):
        raise FormatError("tensor without a storage")
    if not (is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) <= 8 and all(is_int(d) and d >= 0 for d in size)
            and all(is_int(s) for s in stride)):
        raise FormatError(f"tensor has bad offset/size/stride {offset!r} {size!r} {stride!r}")
    numel, expect = 1, 1
    for d, s in zip(reversed(size), reversed(stride)):
        if d > 1 and s != expect:  # a dim of size 1 may carry any stride
            raise UnsupportedError(f"non-contiguous tensor (size {list(size)}, stride {list(stride)})")
        expect *= d
    for d in size:
        numel *= d
    if offset + numel > storage.numel:
        raise FormatError(f"tensor of {numel} elements at offset {offset} overruns its storage of {storage.numel}")
    return TensorRef(storage, offset, tuple(size))


def _new_dict(*args):
    """Stand-in for collections.OrderedDict: a pickle builds it empty, then fills it with SETITEMS."""
    if args:
        raise FormatError("OrderedDict called with arguments")
    return {}


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): _new_dict,
    **{("torch", name): kind for name, kind in STORAGE_KINDS.items()},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise FormatError(f"refusing to load global {module}.{name} (only tensors are allowed)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise FormatError(f"unknown persistent id {str(pid)[:80]!r}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageKind):
            raise UnsupportedError(f"storage type {kind!r} is not supported (bfloat16, float16, float32 only)")
        if not (isinstance(key, str) and re.fullmatch(r"[0-9A-Za-z_]{1,64}", key) and is_int(numel) and numel >= 0):
            raise FormatError(f"bad storage reference {str(pid)[:80]!r}")
        return _Storage(kind, key, numel)


class PthFile:
    """A torch.save zip archive read without executing it: the state dict's TensorRefs, and their data."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.size = self.path.stat().st_size
            self.zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise UnsupportedError(f"{self.path}: not a zip-format torch checkpoint (the legacy format is not supported)") from None
        except OSError as e:
            raise FormatError(f"{self.path}: cannot read: {e.strerror or e}") from None
        pkls = [n for n in self.zip.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise FormatError(f"{self.path}: expected one <name>/data.pkl in the archive, found {len(pkls)}")
        self.prefix = pkls[0][: -len("data.pkl")]
        order = "little"
        if self.prefix + "byteorder" in self.zip.namelist():
            order = self._entry(self.prefix + "byteorder", 16).decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise FormatError(f"{self.path}: bad byteorder {order!r}")
        self.endian = "<" if order == "little" else ">"
        raw = self._entry(pkls[0], MAX_PICKLE)
        try:
            obj = _RestrictedUnpickler(io.BytesIO(raw)).load()
        except (FormatError, UnsupportedError) as e:
            raise type(e)(f"{self.path}: {e}") from None
        except Exception as e:  # any malformed pickle: a one-line error, never a traceback
            raise FormatError(f"{self.path}: data.pkl is not a valid state dict pickle ({type(e).__name__}: {e})"[:300]) from None
        if not isinstance(obj, dict):
            raise FormatError(f"{self.path}: data.pkl holds a {type(obj).__name__}, expected a state dict")
        for k, v in obj.items():
            if not isinstance(k, str) or not isinstance(v, TensorRef):
                raise FormatError(f"{self.path}: state dict entry {str(k)[:60]!r} is not a tensor")
        self.tensors: dict[str, TensorRef] = obj

    def _entry(self, name: str, limit: int) -> bytes:
        try:
            zi = self.zip.getinfo(name)
        except KeyError:
            raise FormatError(f"{self.path}: archive has no entry {name!r}") from None
        # torch stores entries uncompressed; anything else could be a zip bomb.
        if zi.compress_type != zipfile.ZIP_STORED or zi.file_size > min(limit, self.size):
            raise FormatError(f"{self.path}: entry {name!r} is compressed or too large ({zi.file_size} bytes)")
        try:
            return self.zip.read(zi)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise FormatError(f"{self.path}: entry {name!r} is corrupt ({e})") from None

    def read(self, name: str, packed: bool = False) -> np.ndarray:
        """One tensor as a new float32 C-contiguous array; packed=True: bfloat16 and float16 tensors as
        their native-order 16-bit patterns instead (uint16 and float16), float32 ones as float32."""
        t = self.tensors[name]
        kind = t.storage.kind
        nbytes = t.storage.numel * kind.itemsize
        raw = self._entry(f"{self.prefix}data/{t.storage.key}", self.size)
        if len(raw) != nbytes:
            raise FormatError(f"{self.path}: storage {t.storage.key} of {name!r} has {len(raw)} bytes, expected {nbytes}")
        numel = 1
        for d in t.shape:
            numel *= d
        npdt = np.dtype(self.endian + ("u2" if kind.dtype == "bf16" else kind.dtype))
        x = np.frombuffer(raw, dtype=npdt, count=numel, offset=t.offset * kind.itemsize).reshape(t.shape)
        if packed and kind.itemsize == 2:
            return x.astype(npdt.newbyteorder("="), copy=False)  # the bytes as read (native order)
        return bf16_to_f32(x.astype("=u2")) if kind.dtype == "bf16" else x.astype(np.float32)  # new C-order arrays

    def close(self) -> None:
        self.zip.close()


def read_pth(path) -> dict[str, np.ndarray]:
    """Every tensor of a torch.save'd state dict, as float32 arrays, without running pickled code."""
    f = PthFile(path)
    try:
        return {n: f.read(n) for n in f.tensors}
    finally:
        f.close()


# ---------------------------------------------------------------------------------------------------
# params.json -> ModelConfig, and shard merging

def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size, computed the way Meta's model.py does: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _param(p: dict, key: str, kind: str, default=None, required=False):
    """A typed params.json value (see config.config_value); None when absent and not required."""
    return config_value(p, key, kind, "params.json") if required else config_value(p, key, kind, "params.json", default)


def config_from_params(p: dict, vocab_size: int | None = None) -> ModelConfig:
    """A ModelConfig from Meta's params.json (parsed). vocab_size fills in params.json's -1."""
    D = _param(p, "dim", "int", required=True)
    H = _param(p, "n_heads", "int", required=True)
    V = _param(p, "vocab_size", "int", -1)
    if V == -1:
        V = vocab_size
    multiple_of = _param(p, "multiple_of", "int", 256)
    if not 0 < multiple_of <= 1 << 20 or not 0 < D <= 1 << 24:
        raise FormatError(f"params.json: dim {D} / multiple_of {multiple_of} out of range")
    scaling = None
    theta = _param(p, "rope_theta", "float", 10000.0)  # Llama 2's params.json has no rope_theta: 10000
    if _param(p, "use_scaled_rope", "bool", False):
        scaling = dict(LLAMA3_ROPE_SCALING)
        # Newer llama-models params may carry the factors (Llama 3.2 uses 32); Meta's defaults otherwise.
        scaling["factor"] = _param(p, "rope_scaling_factor", "float", scaling["factor"])
        scaling["high_freq_factor"] = _param(p, "rope_high_freq_factor", "float", scaling["high_freq_factor"])
    # params.json does not say the context length; Meta's code takes it from the caller. Llama 3.1+
    # (scaled RoPE) is trained to 128K, Llama 3 (theta 500000) to 8K, Llama 2 to 4K.
    default_ctx = 131072 if scaling else 8192 if theta >= 500000 else 4096
    return ModelConfig(
        arch="llama", dim=D, n_layers=_param(p, "n_layers", "int", required=True), n_heads=H,
        n_kv_heads=_param(p, "n_kv_heads", "int", H), vocab_size=V,
        ffn_dim=ffn_hidden_dim(D, multiple_of, _param(p, "ffn_dim_multiplier", "float")),
        max_seq_len=_param(p, "max_seq_len", "int", default_ctx), norm_eps=_param(p, "norm_eps", "float", 1e-5),
        rope_theta=theta, rope_scaling=scaling, tie_embeddings=False,
        extra={"format": "meta"})


def _split_dim(name: str, shard_shape: tuple[int, ...], dim: int) -> int | None:
    """The axis along which model-parallel shards split a tensor (None: replicated in every shard).

    Column-parallel layers (wq, wk, wv, w1, w3, output) split their output rows; row-parallel ones
    (wo, w2) split their input columns. Llama 3's embedding is split by vocabulary rows, Llama 2's by
    embedding columns: the shard's shape tells which."""
    if name == "tok_embeddings.weight":
        return 0 if len(shard_shape) == 2 and shard_shape[1] == dim else 1
    if name == "output.weight" or re.search(r"\.(attention\.w[qkv]|feed_forward\.w[13])\.weight$", name):
        return 0
    if re.search(r"\.(attention\.wo|feed_forward\.w2)\.weight$", name):
        return 1
    return None


def load_meta_dir(path, progress: bool = False, dtype: str | None = None) -> tuple[ModelConfig, dict, dict]:
    """Load Meta's layout: (config, canonical weights, info). bfloat16 / float16 matrices stay 16-bit
    (QuantizedMatrix of type BF16 / F16); dtype="f32" widens every weight to float32."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"{path}: no such model directory")
    if not (path / "params.json").is_file():
        raise FormatError(f"{path}: not a Meta model directory (no params.json)")
    try:
        p = json.loads((path / "params.json").read_bytes()[: 1 << 20].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{path / 'params.json'}: not valid JSON") from None
    if not isinstance(p, dict):
        raise FormatError(f"{path / 'params.json'}: not a JSON object")
    shard_paths = sorted(path.glob("consolidated.*.pth"))
    if not shard_paths:
        raise FormatError(f"{path}: no consolidated.NN.pth files")
    nums = []
    for sp in shard_paths:
        m = re.fullmatch(r"consolidated\.(\d{2,3})\.pth", sp.name)
        if not m:
            raise FormatError(f"{sp}: unexpected checkpoint name (expected consolidated.NN.pth)")
        nums.append(int(m.group(1)))
    if nums != list(range(len(nums))):
        raise FormatError(f"{path}: shards must be consolidated.00.pth ... consolidated.{len(nums) - 1:02d}.pth, found {[s.name for s in shard_paths]}")

    shards = []
    try:
        for sp in shard_paths:
            shards.append(PthFile(sp))
        return _load_shards(path, p, shard_paths, shards, progress, dtype)
    finally:
        for s in shards:
            s.close()


def _load_shards(path: Path, p: dict, shard_paths: list[Path], shards: list[PthFile], progress: bool,
                 dtype: str | None = None):
    """Check the merged shapes from the pickles alone, then read each tensor and glue its shards."""
    names = [n for n in shards[0].tensors if n not in IGNORED]
    for s in shards[1:]:
        other = [n for n in s.tensors if n not in IGNORED]
        if set(other) != set(names):
            diff = sorted(set(other) ^ set(names))
            raise FormatError(f"{s.path}: tensor {diff[0]!r} is in one shard but not in {shard_paths[0].name}")
    D = _param(p, "dim", "int", required=True)

    # Merged shapes from the pickles alone, before reading any data.
    shapes, axes = {}, {}
    for n in names:
        parts = [s.tensors[n].shape for s in shards]
        ax = _split_dim(n, parts[0], D) if len(shards) > 1 else None
        if ax is None:
            if any(ps != parts[0] for ps in parts):
                raise FormatError(f"{path}: replicated tensor {n!r} has different shapes across shards: {parts}")
            shapes[n] = parts[0]
        else:
            if any(len(ps) != len(parts[0]) or ps[:ax] + ps[ax + 1:] != parts[0][:ax] + parts[0][ax + 1:] for ps in parts):
                raise FormatError(f"{path}: shards of {n!r} do not fit together: {parts}")
            full = list(parts[0])
            full[ax] = sum(ps[ax] for ps in parts)
            shapes[n] = tuple(full)
        axes[n] = ax
    emb = shapes.get("tok_embeddings.weight")
    cfg = config_from_params(p, vocab_size=emb[0] if emb and len(emb) == 2 else None)
    if "output.weight" not in shapes:
        cfg.tie_embeddings = True  # no separate head: the embedding is reused
    where = str(shard_paths[0]) if len(shards) == 1 else f"{path} ({len(shards)} shards)"
    check_weights(cfg, shapes, where)

    weights = {}
    steps = names
    if progress:
        from tqdm import tqdm
        steps = tqdm(names, desc=f"loading {path.name}", unit="tensor")
    for n in steps:
        packed = dtype != "f32" and len(shapes[n]) == 2
        parts = [s.read(n, packed) for s in (shards if axes[n] is not None else shards[:1])]
        if axes[n] is None:
            for s in shards[1:]:
                if not np.array_equal(s.read(n, packed), parts[0]):
                    raise FormatError(f"{s.path}: replicated tensor {n!r} differs from {shard_paths[0].name}")
            w = parts[0]
        else:
            w = np.ascontiguousarray(np.concatenate(parts, axis=axes[n]))  # shards glued back
        if packed and w.dtype.itemsize == 2:  # bfloat16 patterns (uint16) or float16: kept 16-bit
            w = QuantizedMatrix(np.ascontiguousarray(w).view(np.uint8), GGML_TYPE_IDS["F16" if w.dtype == np.float16 else "BF16"],
                                w.shape)
        weights[n] = w
    dtypes = sorted({s.tensors[n].dtype for s in shards for n in names})
    info = {"format": "meta", "files": [str(sp) for sp in shard_paths],
            "torch_dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "tokenizer": str(path / "tokenizer.model") if (path / "tokenizer.model").is_file() else None,
            # params.json does not name the special tokens; the tokenizer knows them.
            "eos_token_id": None, "bos_token_id": None}
    return cfg, weights, info
