"""Load benchmark of `scratchlm serve`: 1, 4 and 8 concurrent streaming clients on the default model.

    .venv/bin/python benchmarks/bench_serve.py [--max-tokens 64] [--rounds 2] [--soak 200] [--llamacpp]

Each client sends `--rounds` chat requests one after the other (streamed, temperature 0, ignore_eos so every
answer is --max-tokens long), all clients at once. Reported per concurrency: aggregate generated tok/s
(completion tokens of all requests / wall time), time to first token (median, p95), and the server's peak
RSS (VmHWM) so far. Then `--soak` requests, 8 at a time, with the server's RSS sampled every 25: flat
after warm-up means no memory kept per request.

`--llamacpp` runs llama-cpp-python's own OpenAI server (benchmarks/.venv-llamacpp, `llama_cpp.server`, with
use_extra_bufts off: see llamacpp_worker.py) on the same file with the same clients, after ours, and
prints the ratio. Its server has no ignore_eos, so its answers may stop early: tok/s counts what came. It runs one request at
a time (interrupt_requests off, so a new request waits instead of cutting the running stream short).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LLAMACPP_PY = ROOT / "benchmarks" / ".venv-llamacpp" / "bin" / "python"
PROMPTS = ["Write a long story about a dragon who learns to paint.", "Explain how a steam engine works.",
           "Describe a walk through a busy market in detail.", "Write a letter to a friend about your holidays.",
           "Tell me about the history of the bicycle.", "Describe the life cycle of a star.",
           "Write a recipe for a vegetable soup, step by step.", "Explain why the seasons change."]

# llama-cpp-python's server, started under its own venv: the Llama class builds llama_model_params itself
# and has no argument for use_extra_bufts, so the default-params function is wrapped to turn it off.
LLAMACPP_LAUNCHER = r"""
import sys, uvicorn
import llama_cpp.llama_cpp as L
_default = L.llama_model_default_params
def _params():
    p = _default()
    p.use_extra_bufts = False
    return p
L.llama_model_default_params = _params
from llama_cpp.server.app import create_app
from llama_cpp.server.settings import ServerSettings, ModelSettings
path, port, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# interrupt_requests off: by default a new request cuts the stream in progress short; this way they queue
app = create_app(server_settings=ServerSettings(host="127.0.0.1", port=port, interrupt_requests=False),
                 model_settings=[ModelSettings(model=path, n_threads=2, n_threads_batch=2, n_ctx=ctx, verbose=False)])
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> float:
    """A field of /proc/PID/status (VmRSS, VmHWM) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_ours(parallel: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "scratchlm", "serve", "--port", "0", "--parallel", str(parallel),
                          "--queue", "256"], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in p.stdout:
        if line.startswith("scratchlm serve: http://"):
            threading.Thread(target=p.stdout.read, daemon=True).start()
            return p, line.split()[2]
    raise RuntimeError("scratchlm serve did not start")


def start_llamacpp(model_path: str, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    p = subprocess.Popen([str(LLAMACPP_PY), "-c", LLAMACPP_LAUNCHER, model_path, str(port), str(ctx)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"llama-cpp-python's server exited with {p.returncode}")
        try:
            httpx.get(url + "/v1/models", timeout=5)
            return p, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("llama-cpp-python's server did not start")


async def one_request(ac: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    async with ac.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise RuntimeError(ev["error"])
            if ev.get("usage"):
                usage = ev["usage"]["completion_tokens"]
            for c in ev.get("choices") or []:
                if (c.get("delta") or {}).get("content"):
                    chunks += 1
                    if ttft is None:
                        ttft = time.perf_counter() - t0
    return {"ttft": ttft if ttft is not None else float("nan"), "tokens": usage if usage is not None else chunks}


async def load(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(timeout=None) as ac:
        async def client(i):
            return [await one_request(ac, url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens) for r in range(rounds)]

        t0 = time.perf_counter()
        results = [x for xs in await asyncio.gather(*(client(i) for i in range(clients))) for x in xs]
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results if r["tokens"] > 0)
    if len(ttfts) < len(results):
        print(f"  ({len(results) - len(ttfts)} of {len(results)} answers came back empty)")
    p95 = ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]
    return {"tok_s": sum(r["tokens"] for r in results) / wall, "ttft_med": statistics.median(ttfts), "ttft_p95": p95,
            "requests": len(results)}


async def soak(url: str, pid: int, n: int, concurrency: int, max_tokens: int) -> list[tuple[int, float]]:
    sem = asyncio.Semaphore(concurrency)
    done, samples = 0, []
    async with httpx.AsyncClient(timeout=None) as ac:
        async def one(i):
            nonlocal done
            async with sem:
                await one_request(ac, url, PROMPTS[i % len(PROMPTS)], max_tokens)
            done += 1
            if done % 25 == 0:
                samples.append((done, proc_status(pid, "VmRSS")))

        await asyncio.gather(*(one(i) for i in range(n)))
    return samples


def run_side(name: str, proc: subprocess.Popen, url: str, a) -> dict:
    asyncio.run(load(url, 1, 1, 8))  # warm-up: first-call costs (numba caches, page faults) out of the figures
    rows = {}
    for c in a.clients:
        r = asyncio.run(load(url, c, a.rounds, a.max_tokens))
        r["peak_rss"] = proc_status(proc.pid, "VmHWM")
        rows[c] = r
        print(f"{name:10s} {c:2d} clients: {r['tok_s']:6.1f} tok/s aggregate, TTFT median {r['ttft_med']:.2f} s "
              f"p95 {r['ttft_p95']:.2f} s, peak RSS {r['peak_rss']:.0f} MB", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, one after the other")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--soak", type=int, default=200, help="requests of the RSS-flatness run, 8 at a time (0: none)")
    ap.add_argument("--soak-tokens", type=int, default=16)
    ap.add_argument("--llamacpp", action="store_true", help="also run llama-cpp-python's server, side by side")
    a = ap.parse_args()

    proc, url = start_ours(max(a.clients))
    try:
        ours = run_side("scratchlm", proc, url, a)
        if a.soak:
            samples = soak(url, proc.pid, a.soak, 8, a.soak_tokens)
            samples = asyncio.run(samples)
            print("soak RSS (MB) after N requests: " + ", ".join(f"{n}: {rss:.0f}" for n, rss in samples), flush=True)
            warm = [rss for n, rss in samples if n >= 50]
            if warm:
                print(f"soak: RSS from request 50 to {a.soak} varies by {max(warm) - min(warm):.0f} MB "
                      f"({min(warm):.0f}-{max(warm):.0f}); errors: none", flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    base = min(a.clients)
    for c in a.clients:
        print(f"scratchlm {c} streams / {base}: {ours[c]['tok_s'] / ours[base]['tok_s']:.2f}x aggregate tok/s")

    if a.llamacpp:
        if not LLAMACPP_PY.exists():
            print("no benchmarks/.venv-llamacpp: llama-cpp-python's server not run")
            return
        sys.path.insert(0, str(ROOT))
        from scratchlm.assets import default_model_path

        lproc, lurl = start_llamacpp(str(default_model_path()), 2048)
        try:
            theirs = run_side("llama.cpp", lproc, lurl, a)
        finally:
            lproc.terminate()
            lproc.wait(60)
        for c in a.clients:
            print(f"{c} streams: scratchlm / llama-cpp-python server = {ours[c]['tok_s'] / theirs[c]['tok_s']:.2f}x "
                  f"aggregate tok/s; TTFT median {ours[c]['ttft_med']:.2f} vs {theirs[c]['ttft_med']:.2f} s")


if __name__ == "__main__":
    main()
