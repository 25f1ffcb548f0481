"""`scratchlm serve` as a client sees it: the official openai client (sync and async, stream and not),
httpx for the error cases, a client that disconnects, a full queue, and 8 simultaneous streams that must
each give what the model gives alone (greedy, in this process, through generate.py's own loop)."""

import asyncio
import json
import time

import httpx
import openai
import pytest

import scratchlm
from scratchlm.chat import encode_chat
from tests.serve_util import ServerProcess

KEY = "test-key-123"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(["--api-key", KEY, "--parallel", "8", "--queue", "4"], tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model():
    return scratchlm.load()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def auth():
    return {"Authorization": f"Bearer {KEY}"}


def ask(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client, model_id):
    assert model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert client.models.retrieve(model_id).id == model_id
    h = httpx.get(server.url + "/health").json()  # no key needed
    assert h["status"] == "ok" and h["slots_idle"] + h["slots_processing"] == 8


def test_chat_non_stream_equals_chat_alone(client, model, model_id):
    msgs = ask("What is the capital of France?")
    r = client.chat.completions.create(model=model_id, messages=msgs, temperature=0, max_tokens=24)
    lone = model.chat(msgs, temperature=0, max_tokens=24, stream=True)
    text = "".join(lone)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == text and "Paris" in text
    assert c.finish_reason == ("length" if lone.finish_reason == "length" else "stop")
    assert r.usage.prompt_tokens == len(encode_chat(model.tokenizer, msgs))
    assert r.usage.completion_tokens == len(lone.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == model_id


def test_chat_stream_with_usage(client, model_id):
    msgs = ask("Name three colours.")
    whole = client.chat.completions.create(model=model_id, messages=msgs, temperature=0, max_tokens=20)
    chunks = list(client.chat.completions.create(model=model_id, messages=msgs, temperature=0, max_tokens=20,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_async_stream_and_not(server, model, model_id):
    async def go():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=300, max_retries=0)
        whole = await ac.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                            max_tokens=12)
        stream = await ac.completions.create(model=model_id, prompt="The capital of France is", temperature=0,
                                             max_tokens=12, stream=True)
        pieces = [c.choices[0].text async for c in stream if c.choices]
        await ac.close()
        return whole, "".join(pieces)

    whole, streamed = asyncio.run(go())
    alone = model.generate("The capital of France is", temperature=0, max_tokens=12)
    assert whole.choices[0].text == streamed == alone
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")


def test_sampling_fields_seed_stop_n_logprobs(client, model, model_id):
    kw = dict(model=model_id, prompt="Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9, seed=7,
              extra_body={"top_k": 30, "min_p": 0.02, "repetition_penalty": 1.1})
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    alone = model.generate("Once upon a time", max_tokens=16, temperature=0.9, top_p=0.9, seed=7, top_k=30,
                           min_p=0.02, repetition_penalty=1.1)
    assert a.choices[0].text == b.choices[0].text == alone  # a seed reproduces, and equals generate's
    pen = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=8, temperature=0,
                                    presence_penalty=1.5, frequency_penalty=0.5)
    assert pen.choices[0].text == model.generate("Once upon a time", max_tokens=8, temperature=0,
                                                 presence_penalty=1.5, frequency_penalty=0.5)

    r = client.chat.completions.create(model=model_id, messages=ask("What is the capital of France?"),
                                       temperature=0, max_tokens=30, stop=["Paris", "zzz"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"

    r = client.chat.completions.create(model=model_id, messages=ask("Say hi"), temperature=1.0, max_tokens=6, n=2,
                                       seed=1, logprobs=True, top_logprobs=3)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        for t in c.logprobs.content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    greedy = client.chat.completions.create(model=model_id, messages=ask("Say hi"), temperature=0, max_tokens=6,
                                            logprobs=True, top_logprobs=2)
    for t in greedy.choices[0].logprobs.content:  # greedy picks the most likely token
        assert t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7?",
           "Name a famous painter.", "Give me a tip for learning Python.", "Why is the sky blue?",
           "Translate 'good morning' into Spanish.", "What do bees make?"]


def test_eight_simultaneous_streams_equal_their_lone_outputs(server, model, model_id):
    N = 40
    before = server.health()

    async def one(ac, text):
        stream = await ac.chat.completions.create(model=model_id, messages=ask(text), temperature=0, max_tokens=N,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def go():
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=600, max_retries=0)
        out = await asyncio.gather(*(one(ac, p) for p in PROMPTS))
        await ac.close()
        return out

    served = asyncio.run(go())
    after = server.health()
    for text, got in zip(PROMPTS, served):
        assert got == model.chat(ask(text), temperature=0, max_tokens=N, ignore_eos=True), text
    # they were decoded together: more than two sequences per decode step on average
    steps = after["decode_steps"] - before["decode_steps"]
    tokens = after["tokens_decoded"] - before["tokens_decoded"]
    assert steps > 0 and tokens / steps > 2, (tokens, steps)
    assert after["max_batch"] == 8


def error_of(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"] and "Traceback" not in r.text
    return e


def test_bad_requests_get_openai_shaped_errors(server, model_id):
    url = server.url + "/v1/chat/completions"
    msgs = ask("hi")
    e = error_of(httpx.post(url, content=b"{not json", headers=auth()), 400)
    assert "JSON" in e["message"]
    error_of(httpx.post(url, content=b"[1, 2]", headers=auth()), 400)
    e = error_of(httpx.post(url, json={"model": model_id, "messages": msgs, "temperature": "hot"}, headers=auth()), 400)
    assert e["param"] == "temperature"
    e = error_of(httpx.post(url, json={"model": model_id, "messages": "hi"}, headers=auth()), 400)
    assert e["param"] == "messages"
    error_of(httpx.post(url, json={"messages": msgs, "max_tokens": 0}, headers=auth()), 400)
    error_of(httpx.post(url, json={"messages": msgs, "stream": "yes"}, headers=auth()), 400)
    error_of(httpx.post(url, json={"messages": msgs, "n": 99}, headers=auth()), 400)
    e = error_of(httpx.post(server.url + "/v1/completions", json={"prompt": 5}, headers=auth()), 400)
    assert e["param"] == "prompt"
    # prompt + max_tokens over the context: both numbers named
    e = error_of(httpx.post(url, json={"messages": msgs, "max_tokens": 9000}, headers=auth()), 400)
    assert "9000" in e["message"] and "8192" in e["message"] and e["code"] == "context_length_exceeded"
    e = error_of(httpx.post(url, json={"model": "gpt-4o", "messages": msgs}, headers=auth()), 404)
    assert e["code"] == "model_not_found"
    error_of(httpx.get(server.url + "/v1/nothing-here", headers=auth()), 404)
    error_of(httpx.get(url, headers=auth()), 405)
    # an oversized body: 413, and the server still answers
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (8 << 20)}]}).encode()
    error_of(httpx.post(url, content=big, headers=auth(), timeout=120), 413)
    assert httpx.get(server.url + "/health").status_code == 200


def test_api_key(server, model_id):
    url = server.url + "/v1/chat/completions"
    body = {"model": model_id, "messages": ask("hi"), "max_tokens": 2}
    assert error_of(httpx.post(url, json=body), 401)["code"] == "invalid_api_key"
    error_of(httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}), 401)
    error_of(httpx.get(server.url + "/v1/models"), 401)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=model_id, messages=ask("hi"), max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(
            model="no-such-model", messages=ask("hi"), max_tokens=2)


def wait_for(predicate, what, timeout=300):
    """Poll until predicate() is true (a generous bound: the check is that it happens, not how fast)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"never happened: {what}")


def test_disconnect_frees_the_slot(server):
    before = server.health()["requests_cancelled"]
    body = {"messages": ask("Tell me a very long story."), "max_tokens": 4000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth(), timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # held: breaking out of a for over r.iter_lines() itself would close the stream
        for line in lines:
            if '"content": "' in line and '"content": ""' not in line:
                break  # text is flowing
        assert server.health()["slots_processing"] >= 1
    # leaving the block closed the connection mid-stream (4000 tokens would take minutes)
    wait_for(lambda: server.health()["slots_processing"] == 0, "the slot to free")
    assert server.health()["requests_cancelled"] == before + 1


def test_full_queue_answers_503(server):
    # 8 slots + a queue of 4: of 16 requests sent at once, 4 cannot even wait
    body = {"messages": ask("Count to fifty."), "max_tokens": 32, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(timeout=600) as ac:
            return await asyncio.gather(*(ac.post(server.url + "/v1/chat/completions", json=body, headers=auth())
                                          for _ in range(16)))

    rs = asyncio.run(go())
    codes = sorted(r.status_code for r in rs)
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 12, codes
    e = error_of(next(r for r in rs if r.status_code == 503), 503)
    assert e["type"] == "server_error" and "busy" in e["message"]
    for r in rs:
        if r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == 32
