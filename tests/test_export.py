"""Export to GGUF and Hugging Face directories, checked with transformers (logits), the gguf package and
HF tokenizers (ids), and our own loaders (the exact weights come back)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import scratchlm
from scratchlm.cli import main as cli_main
from scratchlm.config import ModelConfig, expected_shapes
from scratchlm.errors import UnsupportedError
from scratchlm.formats.export import export_gguf, export_hf
from scratchlm.model import Model
from scratchlm.tokenizer.train import train_bpe, train_char_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
hf_tokenizers = pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CORPUS = (STDLIB / "textwrap.py").read_text(encoding="utf-8")
TEXT = (STDLIB / "bisect.py").read_text(encoding="utf-8")[:3000] + " ünïcödé → 😀 12345\n"
V = 300

SMALL_ROPE_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, V)


def random_model(arch, tok, *, tied=False, K=2, scaling=None, seed=0) -> Model:
    """Random weights with a wide spread (norm gains != 1, biases != 0), so any misplaced tensor shows."""
    gpt2 = arch == "gpt2"
    # transformers' GGUF reader ignores gpt2's feed_forward_length and sizes wpe from n_positions (default
    # 1024, n_ctx is not used): keep F = 4D and 1024 positions so it can build the model at all.
    cfg = ModelConfig(arch=arch, dim=64, n_layers=2, n_heads=4, n_kv_heads=4 if gpt2 else K, vocab_size=V,
                      ffn_dim=256 if gpt2 else 96, max_seq_len=1024 if gpt2 else 128, norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=scaling, tie_embeddings=tied)
    rng = np.random.default_rng(seed)
    w = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            a = 1 + 0.2 * rng.standard_normal(shape)
        elif len(shape) == 1:
            a = 0.1 * rng.standard_normal(shape)
        else:
            a = 0.15 * rng.standard_normal(shape)
        w[name] = a.astype(np.float32)
    return Model(cfg, w, tok)


def rel_err(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def hf_logits(hm, ids) -> np.ndarray:
    with torch.no_grad():
        return hm(torch.tensor([ids])).logits[0].float().numpy()


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


MODELS = [("llama", dict(tied=False)), ("llama", dict(tied=True)), ("llama", dict(K=4, tied=False)),
          ("gpt2", dict(tied=True)), ("gpt2", dict(tied=False))]


@pytest.mark.parametrize("arch,kw", MODELS, ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_hf_export(tmp_path, bpe, arch, kw):
    model = random_model(arch, bpe, **kw)
    ids = bpe.encode(TEXT)[:48]
    export_hf(model, tmp_path / "hf")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hm).__name__ == ("LlamaForCausalLM" if arch == "llama" else "GPT2LMHeadModel")
    assert rel_err(model.logits(ids), hf_logits(hm, ids)) < 1e-4
    back = scratchlm.load(tmp_path / "hf")
    assert back.config.to_dict() | {"extra": {}} == model.config.to_dict() | {"extra": {}}
    assert same_weights(back.weights, model.weights)
    # the tokenizer: HF tokenizers on tokenizer.json, and transformers' AutoTokenizer, give our ids
    ht = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert ht.encode(TEXT, add_special_tokens=False).ids == bpe.encode(TEXT)
    at = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert at(TEXT)["input_ids"] == bpe.encode(TEXT) and at.eos_token_id == bpe.eos_id
    assert back.tokenizer.encode(TEXT) == bpe.encode(TEXT) and back.tokenizer.eos_ids == bpe.eos_ids


@pytest.mark.parametrize("arch,kw", MODELS, ids=lambda x: x if isinstance(x, str) else ",".join(f"{k}={v}" for k, v in x.items()))
def test_gguf_export(tmp_path, bpe, arch, kw):
    model = random_model(arch, bpe, **kw)
    ids = bpe.encode(TEXT)[:48]
    export_gguf(model, tmp_path / "m.gguf")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert rel_err(model.logits(ids), hf_logits(hm, ids)) < 1e-4
    back = scratchlm.load(tmp_path / "m.gguf")
    assert same_weights(back.weights, model.weights)
    assert back.config.tie_embeddings == model.config.tie_embeddings
    assert back.tokenizer.encode(TEXT) == bpe.encode(TEXT)
    assert back.tokenizer.special_tokens == bpe.special_tokens and back.tokenizer.eos_id == bpe.eos_id
    assert not back.tokenizer.add_bos
    # what gguf-py reads: architecture, names, the vocabulary in GPT-2's byte-as-character form
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in r.tensors}
    assert ("blk.0.attn_qkv.weight" in names) == (arch == "gpt2") and ("output.weight" in names) == (not kw["tied"])
    tokens = r.fields["tokenizer.ggml.tokens"]
    texts = [bytes(tokens.parts[i]).decode() for i in tokens.data]
    assert len(texts) == V and texts[ord(" ")] == "Ġ" and texts[bpe.eos_id] == "<|endoftext|>"
    assert bytes(r.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "llama-bpe"


def test_f16_exports_round_weights_once(tmp_path, bpe):
    model = random_model("llama", bpe)
    rounded = {k: (v.astype(np.float16).astype(np.float32) if v.ndim == 2 else v) for k, v in model.weights.items()}
    export_gguf(model, tmp_path / "m16.gguf", dtype="f16")
    back = scratchlm.load(tmp_path / "m16.gguf")
    assert same_weights(back.weights, rounded)  # matrices f16, norms kept f32
    r = gguf.GGUFReader(tmp_path / "m16.gguf")
    kinds = {t.name: t.tensor_type.name for t in r.tensors}
    assert kinds["blk.0.attn_q.weight"] == "F16" and kinds["blk.0.attn_norm.weight"] == "F32"
    ids = bpe.encode(TEXT)[:32]
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m16.gguf", dtype=torch.float32).eval()
    assert rel_err(Model(model.config, rounded, bpe).logits(ids), hf_logits(hm, ids)) < 1e-4

    export_hf(model, tmp_path / "hf16", dtype="f16")
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "float16"
    back = scratchlm.load(tmp_path / "hf16")
    assert same_weights(back.weights, {k: v.astype(np.float16).astype(np.float32) for k, v in model.weights.items()})


def test_llama3_rope_scaling(tmp_path, bpe):
    """HF keeps the rope_scaling dict; GGUF gets llama.cpp's rope_freqs divisors, which our reader applies."""
    model = random_model("llama", bpe, scaling=SMALL_ROPE_SCALING)
    ids = bpe.encode(TEXT)[:100]  # past original_max_position_embeddings
    ours = model.logits(ids)
    export_hf(model, tmp_path / "hf")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert rel_err(ours, hf_logits(hm, ids)) < 1e-4
    export_gguf(model, tmp_path / "m.gguf")
    back = scratchlm.load(tmp_path / "m.gguf")
    assert back.config.rope_scaling["rope_type"] == "freq_factors"
    assert rel_err(back.logits(ids), ours) < 1e-5
    with pytest.raises(UnsupportedError, match="config.json"):
        export_hf(back, tmp_path / "hf2")  # per-frequency factors have no config.json form


@pytest.mark.parametrize("text", ["plain ascii text only\n", CORPUS[:2000] + " ünïcödé → 😀\n"])
def test_char_tokenizer_exports(tmp_path, text):
    """A character vocabulary becomes a valid byte-level BPE vocabulary in both formats (ASCII: no merges)."""
    tok = train_char_tokenizer(text)
    model = random_model("llama", tok)  # V = 300 >= the tokenizer: padded with unused entries in GGUF
    export_gguf(model, tmp_path / "c.gguf")
    back = scratchlm.load(tmp_path / "c.gguf")
    assert back.tokenizer.encode(text) == tok.encode(text)
    assert back.tokenizer.decode(tok.encode(text)) == text and back.tokenizer.eos_id == tok.eos_id
    r = gguf.GGUFReader(tmp_path / "c.gguf")
    merges = r.fields["tokenizer.ggml.merges"]
    assert len(merges.data) == len(tok.merge_list()) and (len(merges.data) == 0) == text.isascii()
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    assert types[tok.vocab_size:] == [5] * (V - tok.vocab_size) and types[tok.eos_id] == 3
    export_hf(model, tmp_path / "hf")
    ht = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert ht.encode(text, add_special_tokens=False).ids == tok.encode(text)
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = tok.encode(text)[:40]
    assert rel_err(model.logits(ids), hf_logits(hm, ids)) < 1e-4


def test_cli_export(tmp_path, bpe, capsys):
    export_hf(random_model("gpt2", bpe), tmp_path / "src")
    assert cli_main(["export", str(tmp_path / "src"), "--format", "gguf", "-o", str(tmp_path / "out.gguf"),
                     "--dtype", "f16"]) == 0
    assert "out.gguf" in capsys.readouterr().out
    back = scratchlm.load(tmp_path / "out.gguf")
    assert back.config.arch == "gpt2" and back.tokenizer.encode(TEXT) == bpe.encode(TEXT)
    assert not list(tmp_path.glob("*.tmp"))
    assert cli_main(["export", str(tmp_path / "missing"), "--format", "hf", "-o", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error:") and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        cli_main(["export", str(tmp_path / "src"), "--format", "onnx", "-o", str(tmp_path / "x")])


def test_unsupported_tokenizer_and_sizes(tmp_path, bpe):
    small = train_bpe(CORPUS, 400)
    with pytest.raises(UnsupportedError, match="400 tokens"):
        export_gguf(random_model("llama", small), tmp_path / "x.gguf")
    with pytest.raises(UnsupportedError, match="dtype"):
        export_hf(random_model("llama", bpe), tmp_path / "x", dtype="bf16")


def test_default_model_to_hf(tmp_path, default_model_path):
    """The real quantized SmolLM2 GGUF, exported to HF f32: same weights, same logits in transformers, same ids."""
    model = scratchlm.load(default_model_path)
    export_hf(model, tmp_path / "hf")
    back = scratchlm.load(tmp_path / "hf")
    assert same_weights(back.weights, model.weights)
    text = "def add(a, b):\n    return a + b  # 12345 ünïcode"
    ht = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert ht.encode(text, add_special_tokens=False).ids == model.tokenizer.encode(text)
    assert back.tokenizer.chat_template == model.tokenizer.chat_template
    assert back.tokenizer.eos_ids == model.tokenizer.eos_ids
    ids = model.tokenizer.encode("The capital of France is")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    # the exported model in scratchlm and in transformers (the packed original's own agreement with a float32
    # forward is test_packed's: its decode kernels use 16-bit-like activations)
    assert rel_err(back.logits(ids), hf_logits(hm, ids)) < 1e-4
