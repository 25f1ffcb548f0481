"""Write a Llama-3-8B-shaped model with random weights, to measure loading and decoding at real size without
downloading one: (a) a Q4_K_M GGUF with the real Llama 3 tokenizer, (b) a Hugging Face directory of bf16
safetensors shards (model-0000X-of-0000N.safetensors + model.safetensors.index.json + config.json +
tokenizer.json).

    .venv/bin/python benchmarks/make_8b_shaped.py [OUT_DIR] [--only gguf|hf] [--layers N] [--seed S]

Shape of Meta-Llama-3-8B: 32 layers, D=4096, 32 query / 8 kv heads of 128, F=14336, V=128256, rope theta
500000, context 8192. Weights ~ N(0, 0.02), norms 1. Both files hold the same weights (the GGUF is their
Q4_K_M quantization): every tensor is generated in groups of rows, each group from its own seed, so any slice
of rows comes out the same whichever writer asks for it. Nothing is held whole: the writers in
scratchlm/formats/export.py fetch one tensor at a time and encode it a few thousand rows at a time, so peak
memory stays around 1 GB while ~4.9 GB (GGUF) and ~16 GB (bf16) are written.

After writing, the files are checked without loading 8 B weights into float32 (that would take 32 GB): the
GGUF's and the shards' headers against the config's exact tensor set (our loaders' strict check), one tensor
of each read back against the generator, and transformers' AutoConfig on config.json.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

import scratchlm
from scratchlm import assets
from scratchlm.config import ModelConfig, check_weights, expected_shapes
from scratchlm.formats.export import gguf_plan, write_gguf, write_hf_shards
from scratchlm.quantize import FILE_TYPES, rel_rmse, tensor_types

DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "llama3-8b-shaped"
ROWS_PER_SEED = 256  # rows generated from one seed (a slice of any size is cut from whole groups)


def llama3_8b_config(n_layers: int = 32) -> ModelConfig:
    return ModelConfig(arch="llama", dim=4096, n_layers=n_layers, n_heads=32, n_kv_heads=8, vocab_size=128256,
                       ffn_dim=14336, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0, tie_embeddings=False)


class RandomRows:
    """A stand-in for one float32 weight tensor that makes its rows when sliced: rows [a, b) are cut from
    the groups of ROWS_PER_SEED rows they touch, group g drawn from seed (seed, tensor index, g)."""

    def __init__(self, shape: tuple[int, ...], key: tuple[int, int], std: float, ones: bool):
        self.shape, self.key, self.std, self.ones = tuple(shape), key, np.float32(std), ones
        self.ndim, self.dtype = len(self.shape), np.dtype(np.float32)

    def _group(self, g: int) -> np.ndarray:
        n = min(ROWS_PER_SEED, self.shape[0] - g * ROWS_PER_SEED)
        rng = np.random.default_rng((*self.key, g))
        rows = rng.standard_normal((n, *self.shape[1:]), dtype=np.float32)  # [n, cols]
        rows *= self.std
        return rows

    def __getitem__(self, rows: slice) -> np.ndarray:
        a, b, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("RandomRows takes contiguous row slices only")
        if self.ones:
            return np.ones((max(0, b - a), *self.shape[1:]), np.float32)
        if b <= a:
            return np.empty((0, *self.shape[1:]), np.float32)
        g0, g1 = a // ROWS_PER_SEED, (b - 1) // ROWS_PER_SEED
        block = np.concatenate([self._group(g) for g in range(g0, g1 + 1)])  # [rows of groups g0..g1, cols]
        return block[a - g0 * ROWS_PER_SEED : b - g0 * ROWS_PER_SEED]

    def __array__(self, dtype=None, copy=None):
        x = self[0 : self.shape[0]]
        return x if dtype is None else x.astype(dtype)


class RandomWeights(Mapping):
    """Canonical name -> RandomRows for every tensor a config implies (norms are ones, the rest N(0, std))."""

    def __init__(self, cfg: ModelConfig, seed: int = 0, std: float = 0.02):
        self.shapes = expected_shapes(cfg)
        self.index = {n: i for i, n in enumerate(self.shapes)}
        self.seed, self.std = seed, std

    def __getitem__(self, name: str) -> RandomRows:
        shape = self.shapes[name]
        return RandomRows(shape, (self.seed, self.index[name]), self.std, ones=len(shape) == 1)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def llama3_tokenizer():
    from scratchlm.chat import LLAMA3_TEMPLATE

    tok = scratchlm.load_tokenizer(assets.llama3_tokenizer_path())
    if not tok.chat_template:
        tok.chat_template = LLAMA3_TEMPLATE  # Meta ships no template; scratchlm's Meta loader uses this one
    return tok


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_q4_k_m(path: Path, cfg: ModelConfig, weights: RandomWeights, tok) -> dict[str, int]:
    shapes = {n: s for n, s, _ in gguf_plan(cfg, weights)}
    types = tensor_types("Q4_K_M", shapes, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads)
    write_gguf(path, cfg, weights, tok, types=types, file_type=FILE_TYPES["Q4_K_M"][1],
               name="Llama-3-8B-shaped (random weights)", progress=True, desc="Q4_K_M")
    return types


def check_gguf(path: Path, cfg: ModelConfig, weights: RandomWeights, types: dict[str, int]) -> str:
    """Header-level strict check and one tensor read back (dequantized) against the generator."""
    from scratchlm.formats.gguf import _canonical_names, gguf_config, read_gguf

    f = read_gguf(path)
    got = gguf_config(f)
    if (got.dim, got.n_layers, got.n_heads, got.n_kv_heads, got.vocab_size, got.ffn_dim, got.max_seq_len) != \
            (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_dim, cfg.max_seq_len):
        raise SystemExit(f"{path}: config read back differs: {got}")
    check_weights(cfg, {c: f.tensors[g].shape for g, c in _canonical_names(f, cfg).items()}, str(path))
    wrong = [n for n, t in types.items() if f.tensors[n].ggml_type != t]
    if wrong:
        raise SystemExit(f"{path}: tensor {wrong[0]!r} has the wrong type")
    name = "blk.0.attn_q.weight"
    err = rel_rmse(np.asarray(weights["layers.0.attention.wq.weight"]), f.tensor(name))
    f.close()
    return f"{name} rel RMSE {err:.4f} ({'Q4_K' if types[name] == 12 else types[name]})"


def check_hf(out: Path, cfg: ModelConfig, weights: RandomWeights) -> str:
    """Our HF reader's pass 1 (headers, key map, strict shapes), one tensor read back, transformers' AutoConfig."""
    import json

    from scratchlm.formats.permute import meta_to_hf
    from scratchlm.formats.safetensors_hf import (SafetensorsFile, _canonical_shapes, _shard_files, config_from_hf,
                                                   map_hf_name)

    got = config_from_hf(json.loads((out / "config.json").read_text()), str(out / "config.json"))
    shapes = {}
    files = _shard_files(out)
    for p in files:
        with SafetensorsFile(p) as sf:
            for name in sf.entries:
                canon, how = map_hf_name(name, got.arch)
                shapes.update(_canonical_shapes(name, canon, how, sf.shape(name), str(p)))
    check_weights(got, shapes, str(out))
    with SafetensorsFile(files[0]) as sf:
        back = sf.read("model.layers.0.self_attn.q_proj.weight")
    want = meta_to_hf(np.asarray(weights["layers.0.attention.wq.weight"]), cfg.n_heads, cfg.head_dim)
    if not np.allclose(back, want, rtol=2**-8, atol=0):
        raise SystemExit(f"{files[0]}: q_proj read back differs from the generator beyond bf16 rounding")
    msg = f"{len(files)} shards, strict check passed"
    try:
        from transformers import AutoConfig

        hc = AutoConfig.from_pretrained(out)
        msg += f"; transformers: {type(hc).__name__} {hc.num_hidden_layers} layers, {hc.dtype}"
    except ImportError:
        pass
    return msg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=str(DEFAULT_OUT), help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--only", choices=("gguf", "hf"), default=None, help="write just one of the two")
    ap.add_argument("--layers", type=int, default=32, help="transformer blocks (default 32; fewer for a quick try)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = llama3_8b_config(a.layers)
    weights = RandomWeights(cfg, a.seed)
    tok = llama3_tokenizer()
    print(f"Llama-3-8B shape: {cfg.n_params / 1e9:.2f} B parameters, {len(weights)} tensors -> {out}", flush=True)
    if a.only in (None, "gguf"):
        path = out / "llama3-8b-shaped-Q4_K_M.gguf"
        t = time.perf_counter()
        types = write_q4_k_m(path, cfg, weights, tok)
        s = time.perf_counter() - t
        print(f"wrote {path}: {path.stat().st_size / 1e9:.2f} GB in {s:.0f} s "
              f"({cfg.n_params / s / 1e6:.0f} M weights/s, generation included); peak RSS {peak_rss_gb():.2f} GB", flush=True)
        print("  check:", check_gguf(path, cfg, weights, types), flush=True)
    if a.only in (None, "hf"):
        hf = out / "hf-bf16"
        t = time.perf_counter()
        write_hf_shards(hf, cfg, weights, tok, dtype="bf16", progress=True)
        s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
        print(f"wrote {hf}: {size / 1e9:.2f} GB of bf16 shards in {s:.0f} s; peak RSS {peak_rss_gb():.2f} GB", flush=True)
        print("  check:", check_hf(hf, cfg, weights), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
