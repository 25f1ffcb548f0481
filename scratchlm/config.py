"""ModelConfig: the handful of numbers that define a decoder.

Letters used for shapes everywhere in scratchlm:
  B batch, T new tokens, S positions in the cache, D model dim, H query heads,
  K kv heads, Hd head dim, F ffn hidden, V vocab.

Each file format fills a ModelConfig from its own metadata (params.json, config.json,
GGUF keys); the model code reads only this dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import FormatError, UnsupportedError

ARCHES = ("llama", "gpt2")


@dataclass
class ModelConfig:
    arch: str  # "llama" (Llama 1-3, SmolLM2, ...) or "gpt2"
    dim: int  # D
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # K (== H without grouped-query attention)
    vocab_size: int  # V
    ffn_dim: int  # F
    max_seq_len: int  # context length the model was trained for
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}, or {"rope_type": "freq_factors", "factors": [Hd/2 floats]}
    # (GGUF's rope_freqs tensor: the inverse frequencies are divided by these factors).
    rope_scaling: dict | None = None
    tie_embeddings: bool = False
    head_dim: int = 0  # Hd; 0 means D // H
    extra: dict = field(default_factory=dict)  # format-specific details kept for export/info

    def __post_init__(self):
        if self.head_dim == 0 and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        """Reject configs whose numbers cannot describe a model (read from untrusted files)."""
        if self.arch not in ARCHES:
            raise UnsupportedError(f"unsupported architecture {self.arch!r} (supported: {', '.join(ARCHES)})")
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v > 1 << 24:
                raise FormatError(f"config: {name} must be a positive integer below 2**24, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise FormatError(f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise FormatError(f"config: head dim must be even for RoPE, got {self.head_dim}")
        if not (0 < float(self.norm_eps) < 1):
            raise FormatError(f"config: norm_eps must be in (0, 1), got {self.norm_eps!r}")

    @property
    def n_params(self) -> int:
        """Number of parameters the weights of this config hold."""
        D, F, V, Hd, H, K = self.dim, self.ffn_dim, self.vocab_size, self.head_dim, self.n_heads, self.n_kv_heads
        per_layer = D * H * Hd + 2 * D * K * Hd + H * Hd * D
        if self.arch == "gpt2":
            per_layer += 2 * D * F + (H + 2 * K) * Hd + D + F + D + 4 * D
            rest = V * D + self.max_seq_len * D + 2 * D
        else:
            per_layer += 3 * D * F + 2 * D
            rest = V * D + D
        if not self.tie_embeddings:
            rest += V * D
        return self.n_layers * per_layer + rest

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise FormatError(f"config: unknown keys {sorted(unknown)}")
        return cls(**d)



def is_int(x) -> bool:
    """A real integer (JSON true/false are Python bools, which are ints too: not a size)."""
    return isinstance(x, int) and not isinstance(x, bool)


MISSING = object()


def config_value(d: dict, key: str, kind: str, source: str, default=MISSING):
    """d[key] checked to be of `kind` ("int", "float", "bool"), for config files read from disk
    (config.json, params.json); a missing (or null) key is an error unless a default is given."""
    v = d.get(key, MISSING)
    if v is MISSING or (v is None and default is not MISSING):
        if default is MISSING:
            raise FormatError(f"{source}: missing key {key!r}")
        return default
    ok = {"int": is_int(v), "float": is_int(v) or isinstance(v, float), "bool": isinstance(v, bool)}[kind]
    if not ok:
        want = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind]
        raise FormatError(f"{source}: {key!r} must be {want}, got {v!r}")
    return float(v) if kind == "float" else v

def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The exact set of canonical (Meta-named) tensors a model of this config holds, with shapes.

    Loaders check a file against this: a missing, extra or misshaped tensor is an error.
    Weights are stored [out, in] (PyTorch's Linear layout); a matmul is x @ W.T.
    """
    D, F, V, Hd, H, K = cfg.dim, cfg.ffn_dim, cfg.vocab_size, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (V, D)}
    gpt2 = cfg.arch == "gpt2"
    if gpt2:
        shapes["pos_embeddings.weight"] = (cfg.max_seq_len, D)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (D,)
        shapes[p + "attention.wq.weight"] = (H * Hd, D)
        shapes[p + "attention.wk.weight"] = (K * Hd, D)
        shapes[p + "attention.wv.weight"] = (K * Hd, D)
        shapes[p + "attention.wo.weight"] = (D, H * Hd)
        shapes[p + "ffn_norm.weight"] = (D,)
        if gpt2:
            shapes[p + "attention_norm.bias"] = (D,)
            shapes[p + "attention.wq.bias"] = (H * Hd,)
            shapes[p + "attention.wk.bias"] = (K * Hd,)
            shapes[p + "attention.wv.bias"] = (K * Hd,)
            shapes[p + "attention.wo.bias"] = (D,)
            shapes[p + "ffn_norm.bias"] = (D,)
            shapes[p + "feed_forward.w1.weight"] = (F, D)  # c_fc
            shapes[p + "feed_forward.w1.bias"] = (F,)
            shapes[p + "feed_forward.w2.weight"] = (D, F)  # c_proj
            shapes[p + "feed_forward.w2.bias"] = (D,)
        else:
            shapes[p + "feed_forward.w1.weight"] = (F, D)  # gate
            shapes[p + "feed_forward.w3.weight"] = (F, D)  # up
            shapes[p + "feed_forward.w2.weight"] = (D, F)  # down
    shapes["norm.weight"] = (D,)
    if gpt2:
        shapes["norm.bias"] = (D,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (V, D)
    return shapes


def check_weights(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Strict loading: the tensors of `source` must be exactly those the config implies."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in shapes]
    if missing:
        raise FormatError(f"{source}: missing tensor {missing[0]!r} (expected shape {list(want[missing[0]])})"
                          + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [n for n in shapes if n not in want]
    if extra:
        raise FormatError(f"{source}: unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for n, s in want.items():
        if tuple(shapes[n]) != s:
            raise FormatError(f"{source}: tensor {n!r} has shape {list(shapes[n])}, expected {list(s)}")
