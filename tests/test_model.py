"""The decoder against Hugging Face transformers on tiny random models, mapped by hand here
(independently of the loaders), plus KV cache == no cache and the torch backend."""

import numpy as np
import pytest
import torch

from scratchlm.config import ModelConfig
from scratchlm.errors import FormatError, PromptError
from scratchlm.model import Model

transformers = pytest.importorskip("transformers")


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_to_meta_rows(w, n, hd):
    """Rotate-half row order (HF) -> interleaved pairs (Meta), written out independently of formats/permute.py."""
    out = np.empty_like(w)
    for h in range(n):
        for i in range(hd // 2):
            out[h * hd + 2 * i] = w[h * hd + i]
            out[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    return out


def llama_to_canonical(sd, cfg):
    """HF Llama tensors (weights or their grads) -> Meta names, q/k rows in Meta's interleaved order."""
    H, K, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        out[q + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[q + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[q + "attention.wq.weight"] = hf_to_meta_rows(sd[p + "self_attn.q_proj.weight"], H, Hd)
        out[q + "attention.wk.weight"] = hf_to_meta_rows(sd[p + "self_attn.k_proj.weight"], K, Hd)
        out[q + "attention.wv.weight"] = sd[p + "self_attn.v_proj.weight"]
        out[q + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[q + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[q + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[q + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
    return out


def gpt2_to_canonical(sd, cfg):
    """HF GPT-2 tensors (weights or grads) -> canonical names; Conv1D stores [in, out], c_attn is q|k|v."""
    D = cfg.dim
    out = {"tok_embeddings.weight": sd["transformer.wte.weight"], "pos_embeddings.weight": sd["transformer.wpe.weight"],
           "norm.weight": sd["transformer.ln_f.weight"], "norm.bias": sd["transformer.ln_f.bias"]}
    for i in range(cfg.n_layers):
        p, q = f"transformer.h.{i}.", f"layers.{i}."
        for a, b in (("attention_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[q + a + ".weight"], out[q + a + ".bias"] = sd[p + b + ".weight"], sd[p + b + ".bias"]
        ca, cb = sd[p + "attn.c_attn.weight"].T, sd[p + "attn.c_attn.bias"]
        for j, n in enumerate("qkv"):
            out[q + f"attention.w{n}.weight"] = ca[j * D:(j + 1) * D]
            out[q + f"attention.w{n}.bias"] = cb[j * D:(j + 1) * D]
        out[q + "attention.wo.weight"], out[q + "attention.wo.bias"] = sd[p + "attn.c_proj.weight"].T, sd[p + "attn.c_proj.bias"]
        out[q + "feed_forward.w1.weight"], out[q + "feed_forward.w1.bias"] = sd[p + "mlp.c_fc.weight"].T, sd[p + "mlp.c_fc.bias"]
        out[q + "feed_forward.w2.weight"], out[q + "feed_forward.w2.bias"] = sd[p + "mlp.c_proj.weight"].T, sd[p + "mlp.c_proj.bias"]
    return out



def tiny_llama(tied=False, scaling=True, K=2, seed=0):
    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=K, max_position_embeddings=128, rope_theta=500000.0, tie_word_embeddings=tied,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16} if scaling else None)
    m = transformers.LlamaForCausalLM(hc).eval()
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    cfg = ModelConfig(arch="llama", dim=64, n_layers=2, n_heads=4, n_kv_heads=K, vocab_size=300, ffn_dim=96,
                      max_seq_len=128, norm_eps=hc.rms_norm_eps, rope_theta=500000.0,
                      rope_scaling=dict(hc.rope_scaling) if scaling else None, tie_embeddings=tied)
    W = llama_to_canonical(sd, cfg)
    return m, cfg, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in W.items()}


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    hc = transformers.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                 bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(hc).eval()
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    cfg = ModelConfig(arch="gpt2", dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=300, ffn_dim=256,
                      max_seq_len=64, norm_eps=1e-5, tie_embeddings=True)
    W = gpt2_to_canonical(sd, cfg)
    return m, cfg, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in W.items()}


def hf_logits(m, ids):
    with torch.no_grad():
        return m(torch.tensor(ids)[None]).logits[0].numpy()


IDS = np.random.default_rng(1).integers(0, 300, size=50)


@pytest.mark.parametrize("tied,scaling,K", [(False, True, 2), (True, False, 2), (False, False, 4), (True, True, 1)])
def test_llama_logits_match_transformers(tied, scaling, K):
    m, cfg, W = tiny_llama(tied, scaling, K)
    assert rel_err(Model(cfg, W).logits(IDS), hf_logits(m, IDS)) < 1e-4


def test_gpt2_logits_match_transformers():
    m, cfg, W = tiny_gpt2()
    assert rel_err(Model(cfg, W).logits(IDS), hf_logits(m, IDS)) < 1e-4


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_kv_cache_equals_recompute(make):
    _, cfg, W = make()
    model = Model(cfg, W)
    full = model.logits(IDS)
    cache = model.new_cache(len(IDS))
    steps = [model.forward(IDS[None, :20], cache, 0)[0]]  # prefill 20, then one token at a time
    for t in range(20, len(IDS)):
        steps.append(model.forward(IDS[None, t:t + 1], cache, t)[0])
    assert np.max(np.abs(np.concatenate(steps) - full)) < 1e-5


def test_torch_backend_runs_the_same_forward():
    _, cfg, W = tiny_llama()
    ref = Model(cfg, W).logits(IDS)
    tmodel = Model(cfg, {k: torch.from_numpy(v.copy()) for k, v in W.items()})
    assert isinstance(tmodel.forward(np.asarray([IDS[:3]])), torch.Tensor)
    assert rel_err(tmodel.logits(IDS), ref) < 1e-5


def test_weights_are_views_of_the_fused_matrices():
    _, cfg, W = tiny_llama()
    model = Model(cfg, W)
    before = model.logits(IDS[:10])
    model.weights["layers.0.attention.wk.weight"][:] = 0.0  # writing a canonical entry changes the model
    assert not np.allclose(model.logits(IDS[:10]), before)


def test_strict_weights():
    _, cfg, W = tiny_llama()
    bad = dict(W)
    del bad["layers.1.feed_forward.w3.weight"]
    with pytest.raises(FormatError, match="layers.1.feed_forward.w3.weight"):
        Model(cfg, bad)
    bad = dict(W, **{"layers.0.attention.wq.weight": W["layers.0.attention.wq.weight"][:, :32]})
    with pytest.raises(FormatError, match="layers.0.attention.wq.weight"):
        Model(cfg, bad)
    with pytest.raises(FormatError, match="unexpected tensor 'extra'"):
        Model(cfg, dict(W, extra=np.zeros(3, np.float32)))


def test_bad_ids_and_context():
    _, cfg, W = tiny_gpt2()
    model = Model(cfg, W)
    with pytest.raises(PromptError, match="outside the model's vocabulary"):
        model.logits([1, 300])
    with pytest.raises(PromptError):
        model.logits([])
    with pytest.raises(PromptError, match="context"):
        model.logits(np.zeros(65, dtype=np.int64))
