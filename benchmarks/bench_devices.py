"""The same model on each device, side by side in one run: decode and prefill tok/s, a training step, and the
layer-placement figures (--gpu-layers, --stream-layers: compute and transfer time per token).

Rows: cpu (NumPy, the stored types, e.g. Q4_1 blocks and the C kernels; and f32), torch-cpu f32 and bf16, and where a GPU is
present cuda bf16 / f16 / f32 with transformers (eager attention, bf16, the same GGUF) timed on the same GPU in
the same run. The training step is a from-scratch Llama (4 blocks, D=256) forward + our backward on a
[8, 128] batch, on each device. Prints a Markdown table (for NOTES.md) and writes the figures as JSON.

    .venv/bin/python benchmarks/bench_devices.py [--model FILE.gguf] [--prompt-tokens 128] [--gen-tokens 32]
        [--transformers] [--stream-model FILE.gguf] [--out benchmarks/out/devices.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def infer_row(path, P, G, **placement):
    from scratchlm.benchmark import run_bench

    r = run_bench(path, prompt_tokens=P, gen_tokens=G, **placement)
    return {k: v for k, v in r.items() if k != "source"}


def transformers_row(path, P, G, device: str, dtype: str):
    """transformers on `device`, eager attention, greedy decoding with its KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    tdt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    path = Path(path)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    where = dict(pretrained_model_name_or_path=path) if path.is_dir() else dict(
        pretrained_model_name_or_path=path.parent, gguf_file=path.name)  # a Hugging Face directory, or a GGUF
    m = AutoModelForCausalLM.from_pretrained(**where, dtype=tdt, attn_implementation="eager").to(device).eval()
    sync()
    load_s = time.perf_counter() - t0
    ids = torch.tensor(np.random.default_rng(0).integers(100, 1000, P))[None].to(device)
    with torch.no_grad():
        m(ids[:, :8], use_cache=True)  # warm up (kernels, allocator)
        sync()
        t0 = time.perf_counter()
        out = m(ids, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        sync()
        prefill_s = time.perf_counter() - t0
        past = out.past_key_values
        t0 = time.perf_counter()
        for _ in range(G):
            out = m(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            int(tok)  # to the host, as our loop samples there
        decode_s = time.perf_counter() - t0
    del m
    return {"load_s": load_s, "prefill_tok_s": P / prefill_s, "decode_tok_s": G / decode_s,
            "placement": f"transformers eager, {device}, {dtype}"}


def train_row(device: str, steps: int = 3):
    """Median seconds of one forward + backward of a from-scratch Llama on `device` (f32)."""
    from scratchlm import devices
    from scratchlm.config import ModelConfig
    from scratchlm.model import Model
    from scratchlm.training.trainer import init_weights

    cfg = ModelConfig(arch="llama", dim=256, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=4096, ffn_dim=704,
                      max_seq_len=128, tie_embeddings=True, norm_eps=1e-5, rope_theta=10000.0)
    w = init_weights(cfg, 0)
    plan = None
    if device != "cpu":
        plan = devices.make_plan(cfg.n_layers, device, "f32")
        w = devices.place_weights(w, plan)
    model = Model(cfg, w)
    if plan is not None:
        devices.apply_plan(model, plan)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4096, (8, 128)), rng.integers(0, 4096, (8, 128))
    model.loss_and_grads(x, y)  # warm up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.loss_and_grads(x, y)
        if device.startswith("cuda"):
            devices._torch().cuda.synchronize()
        times.append(time.perf_counter() - t0)
    s = statistics.median(times)
    return {"train_step_s": s, "train_tok_s": x.size / s}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file or Hugging Face directory (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--transformers", action="store_true",
                    help="also time transformers on the CPU (always done on a GPU, when one is present)")
    ap.add_argument("--stream-model", default=None,
                    help="a (larger) GGUF for the cuda --stream-layers row, e.g. the 8B-shaped one")
    ap.add_argument("--skip-train", action="store_true", help="no training-step rows")
    ap.add_argument("--out", default=str(HERE / "out" / "devices.json"))
    a = ap.parse_args()
    import torch
    from scratchlm import assets

    path = a.model or str(assets.default_model_path())
    P, G = a.prompt_tokens, a.gen_tokens
    cuda = torch.cuda.is_available()
    L = __import__("scratchlm").load(path, progress=False).config.n_layers
    rows = []

    def add(name, fn, *args, **kw):
        print(f"... {name}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            r = fn(*args, **kw)
        except Exception as e:  # a row that cannot run says why, the others still run
            r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        r["name"], r["wall_s"] = name, time.perf_counter() - t0
        rows.append(r)
        print(f"    {json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})}",
              file=sys.stderr, flush=True)

    add("cpu (NumPy, stored types)", infer_row, path, P, G)
    add("cpu (NumPy, f32)", infer_row, path, P, G, dtype="f32")
    add("torch-cpu f32", infer_row, path, P, G, device="torch-cpu", dtype="f32")
    add("torch-cpu bf16", infer_row, path, P, G, device="torch-cpu", dtype="bf16")
    add(f"torch-cpu bf16 --gpu-layers {L // 2}", infer_row, path, P, G, device="torch-cpu", dtype="bf16", gpu_layers=L // 2)
    add("torch-cpu bf16 --stream-layers", infer_row, path, P, G, device="torch-cpu", dtype="bf16", stream_layers=True)
    if a.transformers:
        add("transformers cpu bf16 (eager)", transformers_row, path, P, G, "cpu", "bf16")
        add("transformers cpu f32 (eager)", transformers_row, path, P, G, "cpu", "f32")
    if cuda:
        for dt in ("bf16", "f16", "f32"):
            add(f"cuda {dt}", infer_row, path, P, G, device="cuda", dtype=dt)
        add("transformers cuda bf16 (eager)", transformers_row, path, P, G, "cuda", "bf16")
        add(f"cuda bf16 --gpu-layers {L // 2}", infer_row, path, P, G, device="cuda", dtype="bf16", gpu_layers=L // 2)
        add("cuda bf16 --stream-layers", infer_row, path, P, G, device="cuda", dtype="bf16", stream_layers=True)
        if torch.cuda.device_count() > 1:
            add("cuda bf16 --devices cuda:0,cuda:1", infer_row, path, P, G, dtype="bf16", devices="cuda:0,cuda:1")
        if a.stream_model:
            add(f"cuda bf16 --stream-layers, {Path(a.stream_model).name}", infer_row, a.stream_model, P, G,
                device="cuda", dtype="bf16", stream_layers=True)
    if not a.skip_train:
        for dev in ["cpu", "torch-cpu"] + (["cuda"] if cuda else []):
            add(f"train step {dev}", train_row, dev)

    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": path, "prompt_tokens": P, "gen_tokens": G, "cuda": cuda,
                                       "gpu": torch.cuda.get_device_name(0) if cuda else None, "rows": rows}, indent=1))
    print(f"model {Path(path).name}, prefill {P} tokens, decode {G}; GPU: "
          f"{torch.cuda.get_device_name(0) if cuda else 'none on this machine'}\n")
    print("| run | prefill tok/s | decode tok/s | compute ms/token | transfer ms/token (MB) | load s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "train_step_s" in r or "error" in r and r["name"].startswith("train"):
            continue
        if "error" in r:
            print(f"| {r['name']} | {r['error']} | | | | |")
            continue
        comp = f"{r['compute_ms_per_token']:.1f}" if "compute_ms_per_token" in r else ""
        tr = (f"{r['transfer_ms_per_token']:.1f} ({r['transfer_mb_per_token']:.1f})"
              + (" overlapped" if r.get("transfer_overlapped") else "")) if "transfer_ms_per_token" in r else ""
        print(f"| {r['name']} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {comp} | {tr} | {r['load_s']:.1f} |")
    train = [r for r in rows if r["name"].startswith("train")]
    if train:
        print("\n| training step (Llama 4x256, batch [8,128], f32) | s/step | tok/s |")
        print("| --- | ---: | ---: |")
        for r in train:
            if "error" in r:
                print(f"| {r['name']} | {r['error']} | |")
            else:
                print(f"| {r['name']} | {r['train_step_s']:.3f} | {r['train_tok_s']:.0f} |")
    ref = next((r for r in rows if r["name"] == "transformers cuda bf16 (eager)" and "error" not in r), None)
    ours = next((r for r in rows if r["name"] == "cuda bf16" and "error" not in r), None)
    if ref and ours:
        print(f"\ncuda bf16 / transformers eager bf16 on the same GPU: decode "
              f"{ours['decode_tok_s'] / ref['decode_tok_s']:.2f}x, prefill {ours['prefill_tok_s'] / ref['prefill_tok_s']:.2f}x")


if __name__ == "__main__":
    main()
