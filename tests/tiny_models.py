"""Tiny random reference models, built with transformers / torch, for loader and model tests.

Every builder writes a directory and returns its path; the transformers model that wrote it is the
reference (`hf_reference(path)` loads it back in float32). Weights are re-drawn with a larger spread
than transformers' init (norms != 1, biases != 0) so that a swapped or mis-permuted tensor shows up in
the logits. Import as `from tests.tiny_models import ...` (repository root on sys.path).

    path = make_hf_llama(tmp / "llama")                       # GQA 4 heads / 2 kv heads, untied, fp32
    path = make_hf_llama(tmp / "x", tied=True, dtype="bfloat16", shard=True)
    path = make_hf_gpt2(tmp / "gpt2")
    path = make_meta_from_hf(hf_path, tmp / "meta", n_shards=2)  # the same network in Meta's layout
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Llama 3.1's rope scaling with Meta's constants (what use_scaled_rope means in params.json).
META_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}
# A small-context variant where all three llama3 frequency bands (kept, smoothed, scaled) occur with Hd=16.
SMALL_ROPE_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):  # norm gains around 1
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def make_hf_llama(path, *, vocab=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn=128, tied=False,
                  dtype="float32", rope_scaling=None, rope_theta=10000.0, shard=False, legacy_config=False,
                  max_pos=512, norm_eps=1e-5, seed=0) -> Path:
    """A random LlamaForCausalLM saved with save_pretrained (fp32/fp16/bf16, optionally sharded).

    legacy_config rewrites config.json the way most hub checkpoints have it (rope_theta and
    rope_scaling at top level, torch_dtype) instead of transformers 5's rope_parameters / dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    kw = dict(vocab_size=vocab, hidden_size=dim, num_hidden_layers=n_layers, num_attention_heads=n_heads,
              num_key_value_heads=n_kv_heads, intermediate_size=ffn, max_position_embeddings=max_pos,
              rms_norm_eps=norm_eps, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
              rope_theta=rope_theta)
    if rope_scaling:
        kw["rope_scaling"] = dict(rope_scaling)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    _randomize(model, seed)
    if tied:
        model.tie_weights()
    model = model.to(TORCH_DTYPES[dtype])
    model.save_pretrained(path, max_shard_size="60KB" if shard else "10GB")
    if legacy_config:
        cfgp = path / "config.json"
        c = json.loads(cfgp.read_text())
        rp = c.pop("rope_parameters", None) or {}
        c["rope_theta"] = rp.pop("rope_theta", rope_theta)
        c["rope_scaling"] = rp if rp.get("rope_type", "default") != "default" else None
        c["torch_dtype"] = c.pop("dtype", dtype)
        cfgp.write_text(json.dumps(c, indent=2))
    return path


def make_hf_gpt2(path, *, vocab=300, dim=64, n_layers=2, n_heads=4, n_positions=128, tied=True,
                 dtype="float32", seed=1) -> Path:
    """A random GPT2LMHeadModel (tanh GELU, learned positions, biases everywhere)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    cfg = GPT2Config(vocab_size=vocab, n_embd=dim, n_layer=n_layers, n_head=n_heads, n_positions=n_positions,
                     tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    _randomize(model, seed)
    if tied:
        model.tie_weights()
    model.to(TORCH_DTYPES[dtype]).save_pretrained(path)
    return path


def hf_reference(path):
    """The transformers model of a directory written above, upcast to float32, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(model, ids) -> "numpy.ndarray":
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()  # [T, V]


def hf_state_dict(path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face directory as stored (all shards), read with the safetensors package."""
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Per head, rows [a0..a(h-1), b0..b(h-1)] -> [a0, b0, a1, b1, ...] (written here in torch, apart
    from scratchlm's permute.py, so the tests compare against an independent expression)."""
    hd = w.shape[0] // n_heads
    halves = w.reshape(n_heads, 2, hd // 2, *w.shape[1:])
    return torch.stack([halves[:, 0], halves[:, 1]], dim=2).reshape(w.shape)


def hf_llama_to_meta_names(sd: dict[str, torch.Tensor], n_heads: int, n_kv_heads: int) -> dict[str, torch.Tensor]:
    """A Hugging Face Llama state dict in Meta's names and q/k row order (the test-side key map)."""
    out = {}
    for k, v in sd.items():
        k2 = (k.replace("model.embed_tokens.", "tok_embeddings.").replace("model.norm.", "norm.")
              .replace("lm_head.", "output.").replace("model.layers.", "layers.")
              .replace(".self_attn.q_proj.", ".attention.wq.").replace(".self_attn.k_proj.", ".attention.wk.")
              .replace(".self_attn.v_proj.", ".attention.wv.").replace(".self_attn.o_proj.", ".attention.wo.")
              .replace(".mlp.gate_proj.", ".feed_forward.w1.").replace(".mlp.up_proj.", ".feed_forward.w3.")
              .replace(".mlp.down_proj.", ".feed_forward.w2.").replace(".input_layernorm.", ".attention_norm.")
              .replace(".post_attention_layernorm.", ".ffn_norm."))
        if ".attention.wq." in k2:
            v = rotate_half_to_interleaved(v, n_heads)
        elif ".attention.wk." in k2:
            v = rotate_half_to_interleaved(v, n_kv_heads)
        out[k2] = v.contiguous()
    return out


def make_meta_from_hf(hf_path, path, *, n_shards=1, dtype="bfloat16", embed_split_dim=0,
                      multiple_of=32, ffn_dim_multiplier=0.75, extra_tensors=None) -> Path:
    """The network of a make_hf_llama directory in Meta's layout: params.json + consolidated.NN.pth.

    Shards are split the way Meta's model-parallel code does (column-parallel layers by rows,
    row-parallel by columns, norms replicated; the embedding by rows as in Llama 3, or by columns
    as in Llama 2 with embed_split_dim=1). The defaults multiple_of=32, ffn_dim_multiplier=0.75 give
    Meta's ffn size 128 for dim 64."""
    hf_path, path = Path(hf_path), Path(path)
    c = json.loads((hf_path / "config.json").read_text())
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    theta = rp.get("rope_theta", c.get("rope_theta", 10000.0))
    scaled = rp.get("rope_type") == "llama3"
    if scaled and {k: rp[k] for k in META_ROPE_SCALING} != META_ROPE_SCALING:
        raise ValueError("Meta's use_scaled_rope has fixed constants; build the HF model with META_ROPE_SCALING")
    n_heads, n_kv = c["num_attention_heads"], c["num_key_value_heads"]
    sd = hf_llama_to_meta_names(hf_state_dict(hf_path), n_heads, n_kv)
    sd = {k: v.to(TORCH_DTYPES[dtype]) for k, v in sd.items()}
    sd.update(extra_tensors or {})
    path.mkdir(parents=True, exist_ok=True)
    params = {"dim": c["hidden_size"], "n_layers": c["num_hidden_layers"], "n_heads": n_heads, "n_kv_heads": n_kv,
              "vocab_size": c["vocab_size"], "multiple_of": multiple_of, "ffn_dim_multiplier": ffn_dim_multiplier,
              "norm_eps": c["rms_norm_eps"], "rope_theta": theta, "use_scaled_rope": scaled}
    (path / "params.json").write_text(json.dumps(params))

    def axis(name):
        if name == "tok_embeddings.weight":
            return embed_split_dim
        if any(s in name for s in (".wq.", ".wk.", ".wv.", ".w1.", ".w3.")) or name == "output.weight":
            return 0
        if ".wo." in name or ".w2." in name:
            return 1
        return None  # norms: replicated

    for i in range(n_shards):
        shard = {}
        for k, v in sd.items():
            ax = axis(k)
            shard[k] = v.clone() if ax is None or n_shards == 1 else v.chunk(n_shards, dim=ax)[i].clone()
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path


def as_arrays(weights: dict, stored_16bit: bool | None = None) -> dict:
    """A loader's weights with every QuantizedMatrix dequantized to its float32 array (exact), checking on
    the way that matrices were kept packed only where the file is 16-bit or quantized (stored_16bit: every
    matrix must be packed (True) or none (False); None: no check)."""
    from scratchlm.quant import QuantizedMatrix

    packed = {n for n, w in weights.items() if isinstance(w, QuantizedMatrix)}
    matrices = {n for n, w in weights.items() if len(w.shape) == 2}
    if stored_16bit is not None:
        assert packed == (matrices if stored_16bit else set()), sorted(matrices ^ packed)[:3]
    return {n: w.dequantize() if n in packed else w for n, w in weights.items()}
