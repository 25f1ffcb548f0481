"""Continuous batching from the inside: Model.decode_batch against the lone decode step, the scheduler's
chunked prefill, a failure inside the model (500, and the server goes on), and a clean stop on SIGTERM
that ends a stream in flight with a final chunk."""

import json
import signal

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

import scratchlm
from scratchlm.generate import prompt_ids
from scratchlm.serve.app import create_app
from scratchlm.serve.scheduler import Scheduler
from tests.serve_util import ServerProcess

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return scratchlm.load()


def lone_steps(model, ids, tokens):
    """Logits [len(tokens), V] of feeding `tokens` after the prompt `ids`, one forward per token."""
    cache = model.new_cache(len(ids) + len(tokens))
    model.forward(np.asarray([ids]), cache, 0, last_only=True)
    out = [model.forward(np.asarray([[t]]), cache, len(ids) + i, last_only=True)[0, -1] for i, t in enumerate(tokens)]
    return np.stack(out)


def test_decode_batch_equals_the_lone_step_bit_for_bit(model):
    # three sequences whose caches hold different numbers of positions (5, 40, 300): each attends to its own
    prompts = [[1, 2, 3, 4, 5], list(range(100, 140)), list(range(1000, 1300))]
    feed = [[11, 12, 13], [21, 22, 23], [31, 32, 33]]
    caches = []
    for ids in prompts:
        c = model.new_cache(len(ids) + 3)
        model.forward(np.asarray([ids]), c, 0, last_only=True)
        caches.append(c)
    got = []
    for step in range(3):
        logits = model.decode_batch([f[step] for f in feed], caches, [len(p) + step for p in prompts])  # [3,V]
        got.append(logits)
    got = np.stack(got, axis=1)  # [3 sequences, 3 steps, V]
    for b, ids in enumerate(prompts):
        assert np.array_equal(got[b], lone_steps(model, ids, feed[b])), b


def test_decode_batch_gpt2_float32_close(tmp_path):
    from tests.tiny_models import make_hf_gpt2

    m = scratchlm.load(make_hf_gpt2(tmp_path / "gpt2"))
    prompts, feed = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], [[20, 21], [30, 31]]
    caches = []
    for ids in prompts:
        caches.append(m.new_cache(len(ids) + 2))
        m.forward(np.asarray([ids]), caches[-1], 0)
    got = np.stack([m.decode_batch([f[s] for f in feed], caches, [len(p) + s for p in prompts]) for s in range(2)], 1)
    for b, ids in enumerate(prompts):
        np.testing.assert_allclose(got[b], lone_steps(m, ids, feed[b]), rtol=1e-5, atol=1e-5)


def test_decode_batch_rejects_a_full_cache(model):
    c = model.new_cache(4)
    model.forward(np.asarray([[1, 2, 3, 4]]), c, 0)
    with pytest.raises(ValueError, match="past the end"):
        model.decode_batch([5], [c], [4])


def chat_body(text, **kw):
    return {"messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def test_long_prompt_read_in_chunks_matches_generate(model):
    # a prompt of ~300 tokens read 64 at a time between decode steps: the same greedy text as generate
    text = "Here is a list of numbers: " + ", ".join(str(i) for i in range(100)) + ". What comes after 99?"
    ids = prompt_ids(model, text)
    assert len(ids) > 200
    app = create_app(model, scheduler=Scheduler(model, parallel=2, prefill_chunk=64))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": text, "temperature": 0, "max_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == model.generate(text, temperature=0, max_tokens=12)
    assert r.json()["usage"]["prompt_tokens"] == len(ids)


def test_an_exception_inside_the_model_is_a_500_and_the_server_goes_on(model, monkeypatch):
    app = create_app(model)
    real = model.decode_batch
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        raise RuntimeError("simulated kernel failure")

    with TestClient(app) as client:
        monkeypatch.setattr(model, "decode_batch", broken)
        r = client.post("/v1/chat/completions", json=chat_body("hi", max_tokens=8))
        assert r.status_code == 500 and calls["n"] == 1
        e = r.json()["error"]
        assert e["type"] == "server_error" and "simulated kernel failure" in e["message"] and "Traceback" not in r.text
        # a stream that fails after its first token: an error event, then the stream ends
        with client.stream("POST", "/v1/chat/completions", json=chat_body("hi", max_tokens=8, stream=True)) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert s.status_code == 200 and "simulated kernel failure" in json.loads(events[-1][6:])["error"]["message"]
        monkeypatch.setattr(model, "decode_batch", real)
        r = client.post("/v1/chat/completions", json=chat_body("What is the capital of France?", max_tokens=12))
        assert r.status_code == 200 and "Paris" in r.json()["choices"][0]["message"]["content"]
        assert client.get("/health").json()["errors"] == 2


def test_sigterm_ends_streams_with_a_final_chunk(tmp_path):
    server = ServerProcess([], tmp_path)
    try:
        body = chat_body("Tell me a long story.", max_tokens=4000, stream=True, ignore_eos=True)
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            for line in lines:
                if '"content": "' in line and '"content": ""' not in line:
                    break
            server.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert server.proc.wait(120) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("argv", [["serve", "--queue", "-1"], ["serve", "-m", "/no/such/model.gguf"]])
def test_serve_bad_arguments_are_one_line_errors(argv, capsys):
    from scratchlm.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error: ") and err.count("\n") == 1
