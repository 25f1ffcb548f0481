"""LoRA adapters, from scratch: low-rank updates W + (alpha/r) * B @ A on chosen projections of a frozen base.

For a projection y = x @ W.T with W [out, in], LoRA learns A [r, in] and B [out, r] and computes

    y = x @ W.T + s * (dropout(x) @ A.T) @ B.T          s = alpha / r

B starts at zero, so training starts from exactly the base model; A starts like PEFT's (kaiming-uniform,
bound 1/sqrt(in)). Only A and B are trained.

The model fuses q/k/v into one matrix wqkv and gate/up into w13 (model.py); the adapters follow that
fusion: the A matrices of one fused group are stacked into one array, so the group needs one matmul
for all its adapters (x @ A_cat.T), and each B adds into its own rows of the fused output. The named
parameters (`params`) are views into the stacked arrays, so an optimizer updating them in place
updates what the forward uses (the same trick as the model's own fused weights).

q/k rows: like the model's weights, lora_B of q and k is kept in Meta's interleaved RoPE order;
PEFT files store Hugging Face's rotate-half order, converted on save/load with formats/permute.py.

GPT-2 projects q, k and v with one matrix (Hugging Face's `c_attn`), so its adapters are on that matrix
as a whole (target "qkv": one A [r, D], one B [3D, r]), as PEFT puts them; its other targets are o
(attn.c_proj), up (mlp.c_fc) and down (mlp.c_proj).

Files: Hugging Face PEFT format, `adapter_config.json` + `adapter_model.safetensors` with keys
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` (Llama) or
`base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight` (GPT-2), so PEFT loads our adapters on
the transformers model, and we load PEFT adapters trained elsewhere.
"""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import numpy as np

from .. import ops
from ..config import ModelConfig
from ..errors import FormatError, ModelNotFoundError, UnsupportedError

# Per architecture, each target: (the fused group it adds to in model.py, the name stem of its
# parameters, the module path of its PEFT keys). Groups: qkv = x @ wqkv.T, o = wo, w13 = the FFN's input
# projection (Llama's fused gate/up, GPT-2's c_fc), down = the FFN's output projection.
_SPECS = {
    "llama": {"q": ("qkv", "attention.wq", "self_attn.q_proj"), "k": ("qkv", "attention.wk", "self_attn.k_proj"),
              "v": ("qkv", "attention.wv", "self_attn.v_proj"), "o": ("o", "attention.wo", "self_attn.o_proj"),
              "gate": ("w13", "feed_forward.w1", "mlp.gate_proj"), "up": ("w13", "feed_forward.w3", "mlp.up_proj"),
              "down": ("down", "feed_forward.w2", "mlp.down_proj")},
    "gpt2": {"qkv": ("qkv", "attention.wqkv", "attn.c_attn"), "o": ("o", "attention.wo", "attn.c_proj"),
             "up": ("w13", "feed_forward.w1", "mlp.c_fc"), "down": ("down", "feed_forward.w2", "mlp.c_proj")},
}
_PEFT_PREFIX = {"llama": "base_model.model.model.layers.", "gpt2": "base_model.model.transformer.h."}
TARGETS = tuple(_SPECS["llama"])
GROUPS = ("qkv", "o", "w13", "down")

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
TEMPLATE_NAME = "chat_template.jinja"  # the chat format of the training data, saved when the base has none
_PEFT_KEY = re.compile(r"base_model\.model\.(?:model\.layers|transformer\.h)\.(\d+)\.([\w.]+)\.lora_([AB])\.weight")


def _spec(cfg: ModelConfig) -> dict:
    if cfg.arch not in _SPECS:
        raise UnsupportedError(f"LoRA supports Llama and GPT-2 models; this model is {cfg.arch}")
    return _SPECS[cfg.arch]


def all_targets(cfg: ModelConfig) -> tuple[str, ...]:
    """Every projection an adapter can go on, for this base: q,k,v,o,gate,up,down (Llama), qkv,o,up,down (GPT-2)."""
    return tuple(_spec(cfg))


def parse_targets(spec, cfg: ModelConfig) -> tuple[str, ...]:
    """"q,k,v" (or a list) -> this base's targets in canonical order. Hugging Face module names are accepted
    too (q_proj, c_attn; GPT-2's c_proj means both attn.c_proj and mlp.c_proj, as in PEFT); None or "all":
    every target; "qkv" on Llama: q, k and v."""
    spec_t = _spec(cfg)
    names = ",".join(spec_t)
    if spec is None or spec == "all":
        return tuple(spec_t)
    aliases = {}
    for t, (_, _, hf) in spec_t.items():
        aliases.setdefault(hf.split(".")[-1], []).append(t)  # q_proj -> q; c_proj -> o, down
        aliases[hf] = [t]
    if cfg.arch == "llama":
        aliases["qkv"] = ["q", "k", "v"]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = set()
    for t in items:
        t = str(t).strip()
        if not t:
            continue
        if t not in spec_t and t not in aliases:
            hint = " (GPT-2 projects q, k and v with one matrix: use qkv)" if cfg.arch == "gpt2" and t in "qkv" else ""
            raise ValueError(f"unknown LoRA target {t!r} for a {cfg.arch} base: choose from {names}{hint}")
        out.update([t] if t in spec_t else aliases[t])
    if not out:
        raise ValueError(f"no LoRA targets given: choose from {names}")
    return tuple(t for t in spec_t if t in out)


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(out, in) of each target projection of this base."""
    D, F, q, kv = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    _spec(cfg)  # a one-line error for an architecture LoRA does not know
    if cfg.arch == "gpt2":
        return {"qkv": (q + 2 * kv, D), "o": (D, q), "up": (F, D), "down": (D, F)}
    return {"q": (q, D), "k": (kv, D), "v": (kv, D), "o": (D, q), "gate": (F, D), "up": (F, D), "down": (D, F)}


def _row_offsets(cfg: ModelConfig) -> dict[str, int]:
    """First output row of each target inside its fused group's output."""
    if cfg.arch == "gpt2":
        return dict.fromkeys(_SPECS["gpt2"], 0)
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return {"q": 0, "k": q, "v": q + kv, "o": 0, "gate": 0, "up": cfg.ffn_dim, "down": 0}


class _Group:
    """The adapters of one fused projection of one layer: stacked A [n*r, in], and block-diagonal
    B [out_all, n*r] (target j's B in rows lo:hi, columns j*r:(j+1)*r; zeros elsewhere), so the whole
    group is two matmuls: (x @ A.T) @ B.T. parts: (lo, hi) of each target's output rows."""

    __slots__ = ("A", "B", "parts")

    def __init__(self, A, B, parts):
        self.A, self.B, self.parts = A, B, parts


class LoRA:
    """Adapters for one model: rank, alpha, dropout, targets, and the A/B arrays of every adapted layer.

    `params` maps "layers.{i}.attention.wq.lora_A" ([r, in]) / ".lora_B" ([out, r]) to float32 arrays.
    Attach with `attach(model)`: the model's forward then adds the adapters (model.adapter).
    """

    def __init__(self, cfg: ModelConfig, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 targets=None, layers=None, use_rslora: bool = False, seed: int = 0, weights: dict | None = None,
                 base_name: str | None = None):
        spec = _spec(cfg)
        rank = int(rank)
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
        if not (0.0 <= float(dropout) < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.config, self.rank, self.alpha, self.dropout = cfg, rank, float(alpha), float(dropout)
        self.targets = parse_targets(targets, cfg)
        self.layers = tuple(range(cfg.n_layers)) if layers is None else tuple(sorted(set(int(i) for i in layers)))
        self.use_rslora = bool(use_rslora)
        # rsLoRA (PEFT's use_rslora) scales by alpha/sqrt(r) so that larger ranks still learn
        self.scale = self.alpha / (math.sqrt(rank) if use_rslora else rank)
        self.base_name = base_name
        self.training = False
        self.rng = np.random.default_rng(seed)  # dropout masks
        self._thread = threading.local()  # a chunk thread's own dropout generator (training/parallel.py)
        shapes = target_shapes(cfg)
        for t in self.targets:
            out, inp = shapes[t]
            if rank > min(out, inp):
                raise ValueError(f"LoRA rank {rank} is larger than the {t} projection ([{out}, {inp}]) allows "
                                 f"(at most {min(out, inp)})")
        init = np.random.default_rng(seed)
        rows = _row_offsets(cfg)
        width = {"qkv": (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, "o": cfg.dim,
                 "w13": cfg.ffn_dim * (1 if cfg.arch == "gpt2" else 2), "down": cfg.dim}  # the fused output of each group
        self.params: dict[str, np.ndarray] = {}
        self.groups: list[dict[str, _Group]] = [{} for _ in range(cfg.n_layers)]
        for i in self.layers:
            for g in GROUPS:
                ts = [t for t in self.targets if spec[t][0] == g]
                if not ts:
                    continue
                inp = shapes[ts[0]][1]
                A = np.empty((len(ts) * rank, inp), np.float32)  # [n*r, in], stacked A's of the group
                Bg = np.zeros((width[g], len(ts) * rank), np.float32)  # [out_all, n*r], block-diagonal
                parts = []
                for j, t in enumerate(ts):
                    out = shapes[t][0]
                    name = f"layers.{i}.{spec[t][1]}"
                    a = A[j * rank:(j + 1) * rank]  # a view: updates to the parameter reach the stack
                    b = Bg[rows[t]:rows[t] + out, j * rank:(j + 1) * rank]  # [out, r], a view of its block
                    if weights is None:
                        bound = 1.0 / math.sqrt(inp)  # kaiming_uniform(a=sqrt(5)) on [r, in], as PEFT
                        a[...] = init.uniform(-bound, bound, size=a.shape).astype(np.float32)
                        # b stays zero, so training starts at exactly the base model
                    else:
                        a[...] = weights[name + ".lora_A"]
                        b[...] = weights[name + ".lora_B"]
                    self.params[name + ".lora_A"] = a
                    self.params[name + ".lora_B"] = b
                    parts.append((rows[t], rows[t] + out))
                self.groups[i][g] = _Group(A, Bg, parts)

    # --- use in the model -------------------------------------------------------------------

    def attach(self, model) -> "LoRA":
        """Make `model.forward` add these adapters (checks that they fit the model)."""
        check_fits(self, model.config)
        model.adapter = self
        return self

    def set_thread_rng(self, rng) -> None:
        """Draw the calling thread's dropout masks from `rng` (None: from self.rng again), so chunks of a
        batch running in threads (training/parallel.py) each have their own deterministic masks. A list holds
        one generator per row of the batch the thread runs: each row's masks then come from its own, whatever
        chunk (or data-parallel rank) the row is computed in."""
        self._thread.rng = rng

    @property
    def n_params(self) -> int:
        return sum(int(a.size) for a in self.params.values())

    def apply(self, i: int, group: str, x, out, record=None) -> None:
        """Add the adapters of layer i's `group` to the base output `out` [B,T,out_all] in place (or to a
        tuple of arrays that are its pieces side by side).

        x [B,T,in] is the base projection's input. The recorder gets what the backward needs:
        lora.<group>.x (the adapters' input, after dropout), .keep (the dropout mask) and .u (x @ A.T).
        """
        g = self.groups[i].get(group)
        if g is None:
            return
        xd, keep = x, None
        if self.training and self.dropout > 0:
            # inverted dropout: keep with probability 1-p and scale by 1/(1-p), as torch.nn.Dropout. The
            # mask compares raw random 32-bit words with p * 2^32 (twice as fast as random floats)
            rng = getattr(self._thread, "rng", None) or self.rng
            if isinstance(rng, list):  # one generator per row of x [B,T,in]
                if len(rng) != x.shape[0]:
                    raise ValueError(f"{len(rng)} dropout generators for a batch of {x.shape[0]} rows")
                raw = b"".join(r.bytes(4 * (x.size // x.shape[0])) for r in rng)
            else:
                raw = rng.bytes(4 * x.size)
            bits = np.frombuffer(raw, np.uint32).reshape(x.shape)  # [B,T,in]
            keep = bits >= np.uint32(min(round(self.dropout * 2.0 ** 32), 2 ** 32 - 1))  # [B,T,in] bool
            xd = x * np.float32(1.0 / (1.0 - self.dropout))
        # the adapters are kept on the host (AdamW updates them there); on a torch device they, and the dropout
        # mask, are copied to x's device and dtype for the product: r rows each, small next to the base matrix
        A, Bm = ops.move(g.A, x), ops.move(g.B, x)
        if keep is not None and not ops.is_numpy_array(x):
            xd = xd * ops.move(keep, x)
        elif keep is not None:
            xd *= keep
        u = ops.linear(xd, A)  # [B,T,in] @ [in,n*r] -> [B,T,n*r]: every adapter of the group in one matmul
        delta = ops.linear(u * self.scale, Bm)  # [B,T,n*r] @ [n*r,out_all] -> [B,T,out_all], each B into its rows
        if isinstance(out, tuple):  # the group's output in pieces side by side (the model's gate and up)
            lo = 0
            for o in out:
                o += delta[..., lo:lo + o.shape[-1]]
                lo += o.shape[-1]
        else:
            out += delta
        if record is not None:
            record(f"lora.{group}.x", xd)
            record(f"lora.{group}.u", u)
            if keep is not None:
                record(f"lora.{group}.keep", keep)

    def backward(self, i: int, group: str, dy, act: dict, grads: dict):
        """Gradients of layer i's `group` adapters from dy [B,T,out_all], the gradient of the fused output.

        `act` holds the recordings of apply() (keys "lora.<group>.x" ...). Fills grads[name.lora_A/B] and
        returns the adapters' contribution to the gradient of x [B,T,in] (None if the group has none).
        """
        g = self.groups[i].get(group)
        if g is None:
            return None
        r, s = self.rank, float(self.scale)
        xd, u = act[f"lora.{group}.x"], act[f"lora.{group}.u"]
        host = np.empty(0, np.float32)  # the gradients go to the host, where the adapters are
        n_in = xd.shape[-1]
        N = math.prod(xd.shape[:-1])
        x2 = xd.reshape(N, n_in)  # [B,T,in] -> [N,in]
        u2 = u.reshape(N, -1)  # [B,T,n*r] -> [N,n*r]
        dy2 = dy.reshape(N, dy.shape[-1])  # [B,T,out_all] -> [N,out_all]
        dB = dy2.T @ u2  # [out_all,N] @ [N,n*r] -> [out_all,n*r]; only the diagonal blocks are used
        Bm, A = ops.move(g.B, dy), ops.move(g.A, dy)  # on dy's device (a no-op on NumPy)
        du = dy2 @ Bm  # [N,out_all] @ [out_all,n*r] -> [N,n*r]
        du *= s
        dA = du.T @ x2  # [n*r,N] @ [N,in] -> [n*r,in]: every A of the group in one matmul
        for j, (lo, hi) in enumerate(g.parts):
            name = f"layers.{i}.{self._stem(group, j)}"
            grads[name + ".lora_B"] = ops.move(dB[lo:hi, j * r:(j + 1) * r] * s, host)  # [out,r]
            grads[name + ".lora_A"] = ops.move(dA[j * r:(j + 1) * r], host)  # [r,in]
        dx = (du @ A).reshape(xd.shape)  # [N,n*r] @ [n*r,in] -> [N,in] -> [B,T,in]
        keep = act.get(f"lora.{group}.keep")
        if keep is not None:  # the dropout's gradient: the same mask and scale
            dx *= 1.0 / (1.0 - self.dropout)
            dx *= keep if ops.is_numpy_array(dx) else ops.move(keep, dx)
        return dx

    def _stem(self, group: str, j: int) -> str:
        """The parameter name stem of the j-th target of `group` ("attention.wk" for the k of qkv)."""
        spec = _SPECS[self.config.arch]
        return spec[[t for t in self.targets if spec[t][0] == group][j]][1]

    def merge_into(self, model) -> None:
        """Add s * B @ A to the model's weights in place (then the model needs no adapter) and detach.

        Group by group: the block-diagonal B of a group times its stacked A is exactly the sum of each
        target's B @ A in its own rows, added to the fused base matrix (the canonical weights are views)."""
        check_fits(self, model.config)
        for i, groups in enumerate(self.groups):
            L = model.layers[i]
            fused = {"qkv": L.wqkv, "o": L.wo, "w13": L.w1 if model.config.arch == "gpt2" else L.w13, "down": L.w2}
            for name, g in groups.items():
                if not hasattr(fused[name], "__iadd__"):  # a QuantizedMatrix (or a tuple of them)
                    raise UnsupportedError("merging an adapter needs float32 base weights: load the base with "
                                           "dtype='f32' (the merged model can then be quantized again)")
                fused[name] += (g.B @ g.A) * np.float32(self.scale)  # [out_all,n*r] @ [n*r,in] -> [out_all,in]
        if getattr(model, "adapter", None) is self:
            model.adapter = None

    # --- PEFT files -------------------------------------------------------------------------

    def peft_config(self) -> dict:
        spec, gpt2 = _SPECS[self.config.arch], self.config.arch == "gpt2"
        # Llama: leaf names (q_proj); GPT-2: attn.c_proj and mlp.c_proj share a leaf name, so the full path.
        # PEFT matches a target module by the end of its name either way.
        modules = sorted(spec[t][2] if gpt2 else spec[t][2].split(".")[1] for t in self.targets)
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": modules,
            # GPT-2's Conv1D layers store W as [in, out]: PEFT marks them fan_in_fan_out (A and B keep their shapes)
            "bias": "none", "base_model_name_or_path": self.base_name, "fan_in_fan_out": gpt2,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": self.use_rslora, "use_dora": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None if len(self.layers) == self.config.n_layers else list(self.layers),
            "revision": None,
        }

    def peft_tensors(self, tensors: dict | None = None) -> dict[str, np.ndarray]:
        """The adapters (or `tensors` keyed like params, e.g. their gradients) under PEFT's key names,
        q/k rows of lora_B in Hugging Face order."""
        from ..formats.permute import meta_to_hf

        cfg, out = self.config, {}
        spec, prefix = _SPECS[cfg.arch], _PEFT_PREFIX[cfg.arch]
        for name, a in (self.params if tensors is None else tensors).items():
            i, t, ab = _split_name(name, cfg)
            if ab == "B" and t in ("q", "k") and cfg.arch == "llama":
                a = meta_to_hf(a, cfg.n_heads if t == "q" else cfg.n_kv_heads, cfg.head_dim)
            out[f"{prefix}{i}.{spec[t][2]}.lora_{ab}.weight"] = np.ascontiguousarray(a)
        return out

    def save(self, out_dir, chat_template: str | None = None) -> Path:
        """Write adapter_config.json and adapter_model.safetensors into out_dir (atomic writes), and
        chat_template.jinja when given (the format the adapter was trained in, for a base that has none)."""
        from safetensors.numpy import save

        from .checkpoint import atomic_write, atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / WEIGHTS_NAME, save(self.peft_tensors(), metadata={"format": "pt"}))
        atomic_write_json(out / CONFIG_NAME, self.peft_config())
        if chat_template:
            atomic_write(out / TEMPLATE_NAME, chat_template.encode())
        return out


def _split_name(name: str, cfg: ModelConfig) -> tuple[int, str, str]:
    """"layers.3.attention.wq.lora_B" -> (3, "q", "B")."""
    parts = name.split(".")
    stems = {v[1]: t for t, v in _SPECS[cfg.arch].items()}
    return int(parts[1]), stems[".".join(parts[2:4])], parts[4][-1]


def check_fits(lora: LoRA, cfg: ModelConfig) -> None:
    """One-line error when the adapters were made for a different base (architecture, layer count or any shape)."""
    _spec(cfg)
    if lora.config.arch != cfg.arch:
        raise FormatError(f"the adapter does not match the base model: it was made for a {lora.config.arch} "
                          f"model, the base is {cfg.arch}")
    shapes = target_shapes(cfg)
    for name, a in lora.params.items():
        i, t, ab = _split_name(name, cfg)
        out, inp = shapes[t]
        want = (lora.rank, inp) if ab == "A" else (out, lora.rank)
        if i >= cfg.n_layers or tuple(a.shape) != want:
            where = f"layer {i} (the base has {cfg.n_layers})" if i >= cfg.n_layers else f"shape {list(a.shape)}, expected {list(want)}"
            raise FormatError(f"the adapter does not match the base model: {name} has {where}")


# --- loading PEFT adapters ------------------------------------------------------------------


def _read_config(path: Path) -> dict:
    from .checkpoint import read_json

    c = read_json(path, "adapter config")
    if not isinstance(c, dict):
        raise FormatError(f"{path}: not a JSON object")
    if c.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"{path}: peft_type {c.get('peft_type')!r} is not supported (only LORA)")
    if c.get("use_dora"):
        raise UnsupportedError(f"{path}: use_dora=True is not supported")
    if c.get("bias", "none") != "none":
        raise UnsupportedError(f"{path}: bias={c.get('bias')!r} is not supported (only 'none')")
    if c.get("rank_pattern") or c.get("alpha_pattern"):
        raise UnsupportedError(f"{path}: per-layer rank_pattern/alpha_pattern are not supported")
    if c.get("modules_to_save"):
        raise UnsupportedError(f"{path}: modules_to_save ({c['modules_to_save']}) is not supported")
    r = c.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise FormatError(f"{path}: bad rank r={r!r}")
    alpha = c.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise FormatError(f"{path}: bad lora_alpha {alpha!r}")
    return c


def load_peft(adapter_dir, cfg: ModelConfig) -> LoRA:
    """Read a PEFT LoRA adapter directory into a LoRA for base config `cfg`; names and shapes are checked."""
    from ..formats.permute import hf_to_meta
    from ..formats.safetensors_hf import read_safetensors

    spec, prefix = _spec(cfg), _PEFT_PREFIX[cfg.arch]
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ModelNotFoundError(f"{d}: no such adapter directory")
    if not (d / CONFIG_NAME).is_file() or not (d / WEIGHTS_NAME).is_file():
        raise ModelNotFoundError(f"{d}: not a PEFT adapter directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    c = _read_config(d / CONFIG_NAME)
    r = c["r"]
    tensors = read_safetensors(d / WEIGHTS_NAME)
    shapes = target_shapes(cfg)
    by_module = {v[2]: t for t, v in spec.items()}  # self_attn.q_proj -> q
    weights, targets, layers = {}, set(), set()
    for key, a in tensors.items():
        m = _PEFT_KEY.fullmatch(key)
        t = by_module.get(m.group(2)) if m and key.startswith(prefix) else None
        if t is None:
            raise FormatError(f"{d / WEIGHTS_NAME}: {key!r} is not a LoRA weight of a {cfg.arch} layer (expected "
                              f"{prefix}N.<{'|'.join(by_module)}>.lora_A|B.weight)")
        i, ab = int(m.group(1)), m.group(3)
        if i >= cfg.n_layers:
            raise FormatError(f"the adapter does not match the base model: {key} is for layer {i}, "
                              f"the base has {cfg.n_layers} layers")
        out, inp = shapes[t]
        want = (r, inp) if ab == "A" else (out, r)
        if tuple(a.shape) != want:
            raise FormatError(f"the adapter does not match the base model: {key} has shape {list(a.shape)}, "
                              f"expected {list(want)} (r={r})")
        if ab == "B" and t in ("q", "k") and cfg.arch == "llama":
            a = hf_to_meta(a, cfg.n_heads if t == "q" else cfg.n_kv_heads, cfg.head_dim)
        weights[f"layers.{i}.{spec[t][1]}.lora_{ab}"] = a
        targets.add(t)
        layers.add(i)
    if not weights:
        raise FormatError(f"{d / WEIGHTS_NAME}: holds no LoRA weights")
    # fan_in_fan_out describes how the base stores W ([in, out]: GPT-2's Conv1D), not A and B; on a
    # Llama base (nn.Linear, [out, in]) it would mean a transposed update
    if c.get("fan_in_fan_out") and cfg.arch != "gpt2":
        raise UnsupportedError(f"{d / CONFIG_NAME}: fan_in_fan_out=True is not supported for a {cfg.arch} base")
    # every (layer, target) pair must be complete: both A and B, for each adapted layer
    for i in layers:
        for t in targets:
            for ab in "AB":
                if f"layers.{i}.{spec[t][1]}.lora_{ab}" not in weights:
                    raise FormatError(f"{d / WEIGHTS_NAME}: missing the lora_{ab} weight of "
                                      f"{prefix}{i}.{spec[t][2]} (adapters must cover the same projections in each layer)")
    return LoRA(cfg, rank=r, alpha=float(c.get("lora_alpha", r)), dropout=float(c.get("lora_dropout") or 0.0),
                targets=tuple(targets), layers=sorted(layers), use_rslora=bool(c.get("use_rslora", False)),
                weights=weights, base_name=c.get("base_model_name_or_path"))


def load_adapter(model, adapter_dir) -> LoRA:
    """Load a PEFT adapter directory and attach it to `model` (scratchlm.load(..., adapter=DIR)). A base
    without a chat template takes the adapter's chat_template.jinja, the format it was fine-tuned in."""
    lora = load_peft(adapter_dir, model.config)
    template = Path(adapter_dir) / TEMPLATE_NAME
    tok = model.tokenizer
    if tok is not None and not getattr(tok, "chat_template", None) and template.is_file():
        tok.chat_template = template.read_text(encoding="utf-8")
    return lora.attach(model)


def adapter_summary(lora: LoRA) -> str:
    return (f"LoRA r={lora.rank} alpha={lora.alpha:g} targets={','.join(lora.targets)} on {len(lora.layers)} layers, "
            f"{lora.n_params:,} parameters")


def dump_config(lora: LoRA) -> str:
    return json.dumps(lora.peft_config(), indent=1)
