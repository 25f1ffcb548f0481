"""End-to-end tests on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF)."""

import warnings

import numpy as np
import pytest

import scratchlm
from scratchlm.config import ModelConfig
from scratchlm.errors import PromptError
from scratchlm.generate import ContextLimitWarning
from scratchlm.model import Model


@pytest.fixture(scope="module")
def model():
    return scratchlm.load()


def test_default_model_config(model):
    c = model.config
    assert (c.arch, c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size) == ("llama", 30, 576, 9, 3, 1536, 49152)
    assert c.tie_embeddings and model.tokenizer is not None and model.tokenizer.chat_template


def test_logits_match_transformers_on_the_same_gguf(model, default_model_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(default_model_path.parent, gguf_file=default_model_path.name,
                                              torch_dtype=torch.float32).eval()
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912; 北京是中国的首都。")
    with torch.no_grad():
        ref = hf(torch.tensor(ids)[None]).logits[0].numpy()
    ours = model.logits(ids)
    assert ours.shape == ref.shape == (len(ids), 49152)
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-3


def test_golden_answer_mentions_paris(model):
    answer = model.chat([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=40)
    assert "Paris" in answer


def test_greedy_is_reproducible_and_seeded_sampling_too(model):
    a = model.generate("Once upon a time", max_tokens=12, temperature=0)
    assert a == model.generate("Once upon a time", max_tokens=12, temperature=0)
    s1 = model.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    assert s1 == model.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7)


def test_stop_string_cuts_before_it(model):
    full = model.generate("The days of the week are Monday,", max_tokens=24, temperature=0, ignore_eos=True)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    stream = model.generate("The days of the week are Monday,", max_tokens=24, temperature=0, ignore_eos=True,
                            stop=[stop], stream=True)
    text = "".join(stream)
    assert text == full[:full.index(stop)] and stream.finish_reason == "stop"


def test_stops_on_end_token(model):
    stream = model.chat([{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=200, stream=True)
    "".join(stream)
    assert stream.finish_reason == "eos"  # <|im_end|> ends the answer well before 200 tokens
    im_end = model.tokenizer.special_tokens["<|im_end|>"]
    assert im_end in model.tokenizer.eos_ids and im_end not in stream.token_ids


def test_max_tokens(model):
    stream = model.generate("Count: 1, 2, 3,", max_tokens=5, temperature=0, ignore_eos=True, stream=True)
    "".join(stream)
    assert len(stream.token_ids) == 5 and stream.finish_reason == "length"


@pytest.fixture(scope="module")
def small_ctx_model(model):
    """The default model's weights and tokenizer with the context cut to 40 tokens."""
    cfg = ModelConfig.from_dict(dict(model.config.to_dict(), max_seq_len=40))
    return Model(cfg, {k: v.copy() for k, v in model.weights.items()}, model.tokenizer, info=model.info)


def test_context_limit_stops_with_a_message(small_ctx_model):
    prompt = "one two three four five six seven eight nine ten"
    n = len(small_ctx_model.tokenizer.encode(prompt))
    stream = small_ctx_model.generate(prompt, max_tokens=100, temperature=0, ignore_eos=True, stream=True)
    "".join(stream)
    assert stream.finish_reason == "context" and "context" in stream.message
    assert n + len(stream.token_ids) == 40
    with pytest.warns(ContextLimitWarning):
        small_ctx_model.generate(prompt, max_tokens=100, temperature=0, ignore_eos=True)


def test_prompt_longer_than_context(small_ctx_model):
    with pytest.raises(PromptError, match="context"):
        small_ctx_model.generate("word " * 60, max_tokens=5)


def test_empty_prompt_starts_from_bos(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        stream = model.generate("", max_tokens=4, temperature=0, ignore_eos=True, stream=True)
        "".join(stream)
    assert stream.prompt_tokens == 1 and len(stream.token_ids) == 4


def test_streaming_never_breaks_a_character(model):
    """Random sampling at high temperature produces byte tokens that split characters; every streamed
    piece must be whole characters: the pieces join to exactly the decoding of all generated ids."""
    stream = model.generate("用中文写一首关于月亮的诗：🌙", max_tokens=60, temperature=1.5, top_k=0, top_p=1.0,
                            min_p=0.0, seed=3, ignore_eos=True, stream=True)
    pieces = list(stream)
    assert "".join(pieces) == model.tokenizer.decode(stream.token_ids)
