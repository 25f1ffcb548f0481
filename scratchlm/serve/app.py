"""The HTTP side of `scratchlm serve`: OpenAI's routes and wire format on Starlette, SSE for streams.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models   GET /health   GET / (the web chat)

Requests become `scheduler.Sequence`s (one per prompt and choice) that the scheduler thread runs; what
it produces comes back through an asyncio queue per request (`loop.call_soon_threadsafe`). Every error
is OpenAI's JSON shape, {"error": {"message", "type", "param", "code"}}, with its status: 400 bad JSON or
fields, 401 API key, 404 unknown model or route, 413 body too large, 500 a failure inside the model (the
server goes on), 503 the queue is full or the server is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
import uuid
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..chat import encode_chat
from ..errors import PromptError
from ..generate import DEFAULTS, prompt_ids
from ..sampling import SamplingParams
from .scheduler import QueueFull, Scheduler, Sequence, SequenceParams, ShuttingDown

log = logging.getLogger("scratchlm.serve")

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 8 << 20  # a request body past this is refused with 413 (a whole book is ~1 MB of text)
MAX_STOP = 16  # stop strings per request
MAX_TOP_LOGPROBS = 20  # as OpenAI


class APIError(Exception):
    """An error answered as OpenAI's JSON: status, one-line message, type, the parameter at fault, code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# --- reading a request ----------------------------------------------------------------------------------

async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past `limit` bytes (counted as it arrives), 400 if it is not JSON."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {int(length)} bytes; the limit is {limit}", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON: {e}".splitlines()[0]) from None
    if not isinstance(body, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def get_int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    x = body.get(name)
    if x is None:
        return default
    if not _is_int(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else f" >= {lo}" if lo is not None else ""
        raise APIError(400, f"{name} must be an integer{rng}, got {json.dumps(x)}", param=name)
    return x


def get_num(body: dict, name: str, default, lo: float | None = None, hi: float | None = None):
    x = body.get(name)
    if x is None:
        return default
    if not _is_num(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
        rng = f" in [{lo}, {hi}]" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise APIError(400, f"{name} must be a number{rng}, got {json.dumps(x)}", param=name)
    return float(x)


def get_bool(body: dict, name: str, default: bool) -> bool:
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise APIError(400, f"{name} must be true or false, got {json.dumps(x)}", param=name)
    return x


def get_stop(body: dict) -> list[str]:
    x = body.get("stop")
    if x is None:
        return []
    if isinstance(x, str):
        x = [x]
    if not isinstance(x, list) or not all(isinstance(s, str) for s in x) or len(x) > MAX_STOP:
        raise APIError(400, f"stop must be a string or a list of at most {MAX_STOP} strings", param="stop")
    return [s for s in x if s]


def chat_messages(body: dict) -> list[dict]:
    """messages as the chat template wants them: content parts of type "text" joined, "developer" = system."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise APIError(400, f"messages[{i}].content: only parts of type 'text' are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out


# --- the app --------------------------------------------------------------------------------------------

class ServeState:
    """What the routes share: the model, its names, the scheduler and the limits."""

    def __init__(self, model, scheduler: Scheduler, *, model_id: str, api_key: str | None, ctx: int,
                 max_body: int):
        self.model, self.scheduler, self.model_id = model, scheduler, model_id
        self.api_key, self.ctx, self.max_body = api_key, ctx, max_body
        src = Path(str(model.info.get("source") or model_id))
        # names a client may use for this model: the id, the file name, the model's own name
        self.aliases = {model_id, src.name, src.stem, str(model.info.get("name") or model_id)}
        self.created = int(time.time())


def default_model_id(model) -> str:
    src = model.info.get("source")
    return Path(str(src)).stem if src else str(model.info.get("name") or "scratchlm")


def create_app(model, *, model_id: str | None = None, api_key: str | None = None, parallel: int = 8,
               queue_size: int = 64, ctx: int | None = None, max_body: int = MAX_BODY_BYTES,
               scheduler: Scheduler | None = None) -> Starlette:
    """The ASGI app serving `model`. Its scheduler thread starts and stops with the app's lifespan;
    `app.state.serve.scheduler` is it (the CLI stops it on a signal so streams end with a final chunk)."""
    limit = model.config.max_seq_len
    ctx = limit if ctx is None else min(int(ctx), limit)
    sched = scheduler or Scheduler(model, parallel=parallel, queue_size=queue_size)
    state = ServeState(model, sched, model_id=model_id or default_model_id(model), api_key=api_key, ctx=ctx,
                       max_body=max_body)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if sched._thread is None:
            sched.start()
        yield
        sched.shutdown()
        await run_in_threadpool(sched.join, 30)

    routes = [
        Route("/", lambda r: FileResponse(STATIC / "index.html"), methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=STATIC), name="static"),
        Route("/health", _route(state, health, auth=False), methods=["GET"]),
        Route("/v1/models", _route(state, list_models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", _route(state, get_model), methods=["GET"]),
        Route("/v1/chat/completions", _route(state, chat_completions), methods=["POST"]),
        Route("/v1/completions", _route(state, completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.serve = state
    return app


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """The router's own errors (no such route, wrong method) in OpenAI's shape too."""
    what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse(error_body(what.get(exc.status_code, str(exc.detail)), "invalid_request_error",
                                   code=exc.status_code), status_code=exc.status_code, headers=exc.headers)


def _route(state: ServeState, fn, auth: bool = True):
    """A route calling fn(state, request): the API key checked first; APIError and any other exception
    answered as JSON (500 logs its traceback here, never sends it)."""

    async def endpoint(request: Request) -> Response:
        try:
            if auth and state.api_key is not None:
                _check_key(request, state.api_key)
            return await fn(state, request)
        except APIError as e:
            return e.response()
        except Exception as e:  # noqa: BLE001
            log.exception("request failed")
            return APIError(500, f"internal error: {type(e).__name__}", type="server_error").response()

    return endpoint


def _check_key(request: Request, key: str) -> None:
    got = request.headers.get("authorization", "")
    if not got:
        raise APIError(401, "no API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "incorrect API key", code="invalid_api_key")


async def health(state: ServeState, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": state.model_id, **state.scheduler.counts()})


def _model_card(state: ServeState) -> dict:
    return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "scratchlm",
            "context_length": state.ctx}


async def list_models(state: ServeState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(state: ServeState, request: Request) -> Response:
    _check_model(state, request.path_params["model_id"])
    return JSONResponse(_model_card(state))


def _check_model(state: ServeState, name) -> None:
    if name is None:
        return
    if not isinstance(name, str):
        raise APIError(400, f"model must be a string, got {json.dumps(name)}", param="model")
    if name not in state.aliases:
        raise APIError(404, f"the model {name!r} does not exist; this server has {state.model_id!r}",
                       param="model", code="model_not_found")


# --- completions ------------------------------------------------------------------------------------------

def _sampling(body: dict, chat: bool, n_max: int):
    """The options shared by both endpoints, checked: (SamplingParams, seed, stop, n, logprobs k or None,
    ignore_eos, max_tokens or None). Fields left out take `scratchlm generate`'s defaults."""
    params = SamplingParams(
        temperature=get_num(body, "temperature", DEFAULTS["temperature"], 0.0, 2.0),
        top_p=get_num(body, "top_p", DEFAULTS["top_p"], 0.0, 1.0),
        top_k=get_int(body, "top_k", DEFAULTS["top_k"], 0),
        min_p=get_num(body, "min_p", DEFAULTS["min_p"], 0.0, 1.0),
        repetition_penalty=get_num(body, "repetition_penalty", DEFAULTS["repetition_penalty"], 0.0),
        presence_penalty=get_num(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=get_num(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )
    try:
        params.validate()
    except ValueError as e:
        raise APIError(400, str(e)) from None
    seed = get_int(body, "seed", None)
    n = get_int(body, "n", 1, 1, n_max)
    if chat:
        k = get_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        logprobs = k if get_bool(body, "logprobs", False) else None
        if body.get("top_logprobs") is not None and logprobs is None:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:
        logprobs = get_int(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
    max_tokens = get_int(body, "max_completion_tokens", None, 1) if chat else None
    max_tokens = get_int(body, "max_tokens", max_tokens, 1)
    return params, seed, get_stop(body), n, logprobs, get_bool(body, "ignore_eos", False), max_tokens


def _check_length(state: ServeState, n_prompt: int, max_tokens: int | None) -> int:
    """max_tokens for a prompt of n_prompt tokens (the rest of the context when not given); 400 when the
    two do not fit in the context."""
    ctx = state.ctx
    if max_tokens is None:
        if n_prompt >= ctx:
            raise APIError(400, f"the prompt has {n_prompt} tokens but the context holds {ctx}; shorten it",
                           param="messages", code="context_length_exceeded")
        return ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        raise APIError(400, f"the prompt has {n_prompt} tokens and max_tokens is {max_tokens}: {n_prompt + max_tokens} "
                            f"in all, over the context of {ctx} tokens; shorten the prompt or lower max_tokens",
                       param="max_tokens", code="context_length_exceeded")
    return max_tokens


def _completion_prompts(state: ServeState, body: dict) -> list[list[int]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of such lists -> token ids each."""
    p = body.get("prompt")
    if isinstance(p, str) or (isinstance(p, list) and p and all(_is_int(t) for t in p)):
        items = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, list) and x and all(_is_int(t) for t in x))
                                           for x in p):
        items = p
    else:
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
    V = state.model.config.vocab_size
    out = []
    for item in items:
        if isinstance(item, list) and not all(0 <= t < V for t in item):
            raise APIError(400, f"prompt token ids must lie in [0, {V})", param="prompt")
        try:
            out.append(prompt_ids(state.model, item))
        except PromptError as e:
            raise APIError(400, str(e), param="prompt") from None
    return out


async def chat_completions(state: ServeState, request: Request) -> Response:
    body = await read_json(request, state.max_body)
    _check_model(state, body.get("model"))
    messages = chat_messages(body)
    opts = _sampling(body, True, state.scheduler.parallel)
    if state.model.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat")
    try:
        ids = await run_in_threadpool(encode_chat, state.model.tokenizer, messages, add_generation_prompt=True)
    except PromptError as e:
        raise APIError(400, str(e), param="messages") from None
    return await _run(state, request, body, [ids], opts, chat=True)


async def completions(state: ServeState, request: Request) -> Response:
    body = await read_json(request, state.max_body)
    _check_model(state, body.get("model"))
    opts = _sampling(body, False, state.scheduler.parallel)
    if get_bool(body, "echo", False):
        raise APIError(400, "echo is not supported", param="echo")
    prompts = await run_in_threadpool(_completion_prompts, state, body)
    return await _run(state, request, body, prompts, opts, chat=False)


class _Request:
    """One request's sequences and the queue their events arrive on, as (choice index, event)."""

    def __init__(self, seqs: list[Sequence], queue: asyncio.Queue):
        self.seqs, self.queue = seqs, queue

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.finished:
                s.cancel()


async def _run(state: ServeState, request: Request, body: dict, prompts: list[list[int]], opts, chat: bool):
    params, seed, stop, n, logprobs, ignore_eos, max_tokens = opts
    stream = get_bool(body, "stream", False)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    include_usage = stream and get_bool(so or {}, "include_usage", False)
    if len(prompts) * n > state.scheduler.parallel:
        raise APIError(400, f"{len(prompts)} prompts x n={n} choices is more than the server's "
                            f"{state.scheduler.parallel} parallel slots", param="n")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    seqs = []
    for p, ids in enumerate(prompts):
        m = _check_length(state, len(ids), max_tokens)
        for j in range(n):
            i = p * n + j
            sp = SequenceParams(ids=ids, max_tokens=m, sampling=params, seed=None if seed is None else seed + j,
                                stop=stop, ignore_eos=ignore_eos, logprobs=logprobs)
            seqs.append(Sequence(sp, lambda ev, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))))
    try:
        state.scheduler.submit(seqs)
    except QueueFull as e:
        raise APIError(503, str(e), type="server_error", code="server_busy") from None
    except ShuttingDown as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down") from None
    run = _Request(seqs, queue)
    watch = asyncio.ensure_future(_watch_disconnect(request, run))
    fmt = _Format(state, chat, prompts, n, logprobs)
    try:
        first = await queue.get()
    except BaseException:
        watch.cancel()
        run.cancel()
        raise
    if first is None:  # the client left before anything came
        watch.cancel()
        return Response(status_code=499)
    if first[1]["error"] is not None:
        watch.cancel()
        run.cancel()
        raise APIError(500, f"generation failed: {first[1]['error']}", type="server_error")
    if not stream:
        try:
            return await _collect(run, first, fmt)
        finally:
            watch.cancel()
            run.cancel()
    return _SSE(_stream(run, first, fmt, include_usage), run, watch)


async def _watch_disconnect(request: Request, run: _Request) -> None:
    """Wait for the client to go away; then cancel the request's sequences (their slots free at the next
    step) and wake whoever waits on the queue."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            break
    if any(not s.finished for s in run.seqs):
        run.cancel()
        run.queue.put_nowait(None)


class _Format:
    """OpenAI's JSON for one request: choice bodies, stream chunks, logprobs, usage."""

    def __init__(self, state: ServeState, chat: bool, prompts: list[list[int]], n: int, logprobs: int | None):
        self.state, self.chat, self.n, self.logprobs = state, chat, n, logprobs
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.tok = state.model.tokenizer

    def head(self, chunk: bool) -> dict:
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_id,
                "system_fingerprint": f"scratchlm-{__version__}"}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def _piece(self, token_id: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(token_id) if self.tok is not None else b""
        return b.decode("utf-8", errors="replace"), list(b)

    def logprobs_json(self, tokens: list[dict], offset: int = 0):
        """Chat: {"content": [{token, logprob, bytes, top_logprobs}]}; completions: the legacy columns."""
        if self.logprobs is None:
            return None
        if self.chat:
            content = []
            for t in tokens:
                s, b = self._piece(t["id"])
                top = [dict(zip(("token", "bytes"), self._piece(i)), logprob=lp) for i, lp in t["top"]]
                content.append({"token": s, "logprob": t["logprob"], "bytes": b, "top_logprobs": top})
            return {"content": content}
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            s, _ = self._piece(t["id"])
            out["tokens"].append(s)
            out["token_logprobs"].append(t["logprob"])
            out["top_logprobs"].append({self._piece(i)[0]: lp for i, lp in t["top"]})
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def choice(self, index: int, text: str, tokens: list[dict], finish_reason: str | None) -> dict:
        lp = self.logprobs_json(tokens)
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}

    def delta(self, index: int, text: str | None, tokens: list[dict], finish_reason: str | None, offset: int = 0,
              role: bool = False) -> dict:
        if self.chat:
            d = {} if text is None else {"content": text}
            if role:
                d = {"role": "assistant", **d}
            c = {"index": index, "delta": d, "logprobs": self.logprobs_json(tokens) if tokens else None,
                 "finish_reason": finish_reason}
        else:
            c = {"index": index, "text": text or "", "logprobs": self.logprobs_json(tokens, offset) if tokens else None,
                 "finish_reason": finish_reason}
        return {**self.head(True), "choices": [c]}


async def _collect(run: _Request, first, fmt: _Format) -> Response:
    """A whole answer: wait for every choice to finish."""
    k = len(run.seqs)
    texts, tokens, reasons, completion = [""] * k, [[] for _ in range(k)], [None] * k, [0] * k
    item = first
    while True:
        if item is None:
            return Response(status_code=499)  # the client left
        i, ev = item
        if ev["error"] is not None:
            raise APIError(500, f"generation failed: {ev['error']}", type="server_error")
        texts[i] += ev["text"]
        tokens[i] += ev["tokens"]
        completion[i] = ev["completion_tokens"]
        if ev["finish_reason"] is not None:
            reasons[i] = ev["finish_reason"]
            if all(r is not None for r in reasons):
                break
        item = await run.queue.get()
    choices = [fmt.choice(i, texts[i], tokens[i], reasons[i]) for i in range(k)]
    return JSONResponse({**fmt.head(False), "choices": choices, "usage": fmt.usage(sum(completion))})


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


async def _stream(run: _Request, first, fmt: _Format, include_usage: bool):
    """The SSE chunks of a stream: a role chunk per choice (chat), text chunks as they come, a final
    chunk per choice with its finish_reason, the usage chunk if asked for, then [DONE]."""
    k = len(run.seqs)
    if fmt.chat:
        for i in range(k):
            yield _sse(fmt.delta(i, "", [], None, role=True))
    done, completion, offsets = [False] * k, [0] * k, [0] * k
    item = first
    while True:
        if item is None:
            return  # the client left
        i, ev = item
        if ev["error"] is not None:
            yield _sse(error_body(f"generation failed: {ev['error']}", "server_error", code=500))
            return
        completion[i] = ev["completion_tokens"]
        if ev["text"] or ev["tokens"]:
            yield _sse(fmt.delta(i, ev["text"], ev["tokens"], None, offsets[i]))
            offsets[i] += len(ev["text"])
        if ev["finish_reason"] is not None:
            yield _sse(fmt.delta(i, None, [], ev["finish_reason"]))
            done[i] = True
            if all(done):
                break
        item = await run.queue.get()
    if include_usage:
        yield _sse({**fmt.head(True), "choices": [], "usage": fmt.usage(sum(completion))})
    yield b"data: [DONE]\n\n"


class _SSE(Response):
    """A server-sent-events response over an async iterator of chunks. Unlike Starlette's StreamingResponse
    it does not read the client's messages itself: _watch_disconnect does, and a client that goes away
    cancels its sequences even while they wait in the queue or read a prompt."""

    media_type = "text/event-stream"

    def __init__(self, chunks, run: _Request, watch: asyncio.Future):
        # no body attribute: then init_headers declares no content-length (the length is unknown)
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.chunks, self.run, self.watch = chunks, run, watch

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke under a write
            pass
        finally:
            self.watch.cancel()
            self.run.cancel()
            await self.chunks.aclose()
