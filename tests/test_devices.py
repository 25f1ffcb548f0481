"""Devices and layer placement (devices.py): the torch path on the CPU ("torch-cpu") against the NumPy path,
and --gpu-layers / --stream-layers against the plain path, on tiny random models written by transformers
(float32, and quantized to Q4_1 / Q8_0 GGUF so the block-by-block dequantization runs too). CUDA tests skip
without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm import devices, ops
from scratchlm.cli import main
from scratchlm.errors import UnsupportedError
from scratchlm.formats.export import quantize_model
from tests.tiny_models import make_hf_gpt2, make_hf_llama

IDS = [3, 17, 90, 4, 200, 55, 8, 120, 9, 31, 77]
CUDA = torch.cuda.is_available()


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def greedy(model, ids, n):
    """n greedy tokens through the KV cache: one prefill, then one token at a time (the decode path)."""
    cache = model.new_cache(len(ids) + n)
    logits = model.forward(np.asarray([ids]), cache, 0, last_only=True)  # [1,1,V]
    out = []
    for pos in range(len(ids), len(ids) + n):
        out.append(int(np.argmax(ops.move(logits[0, -1], np.empty(0, np.float32)))))
        logits = model.forward(np.asarray([[out[-1]]]), cache, pos, last_only=True)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    # 4 blocks, so streaming has blocks to reuse buffers for; GQA and untied head
    return make_hf_llama(tmp_path_factory.mktemp("dev") / "llama", n_layers=4)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return make_hf_gpt2(tmp_path_factory.mktemp("dev") / "gpt2", n_layers=3)


@pytest.fixture(scope="module")
def q4_gguf(llama_dir, tmp_path_factory):
    path, _ = quantize_model(llama_dir, tmp_path_factory.mktemp("dev") / "q4_1.gguf", "Q4_1", progress=False)
    return path


@pytest.fixture(scope="module")
def reference(llama_dir):
    m = scratchlm.load(llama_dir, progress=False)
    return m.logits(IDS), greedy(m, IDS[:5], 8)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_torch_cpu_equals_numpy(which, llama_dir, gpt2_dir):
    path = llama_dir if which == "llama" else gpt2_dir
    ref = scratchlm.load(path, progress=False)
    tm = scratchlm.load(path, device="torch-cpu", dtype="f32", progress=False)
    assert all(isinstance(w, torch.Tensor) and w.dtype == torch.float32 for w in tm.tensors.values())
    assert rel_err(tm.logits(IDS), ref.logits(IDS)) < 1e-5
    assert greedy(tm, IDS[:5], 8) == greedy(ref, IDS[:5], 8)
    assert all(isinstance(k, torch.Tensor) for k in tm.new_cache(8).k)  # the KV cache lives with the blocks


def test_quantized_file_dequantized_block_by_block(q4_gguf, monkeypatch):
    """A Q4_1 file on torch-cpu (f32) equals NumPy's dequantize-at-load (dtype f32); a tiny chunk size makes
    every matrix go through several chunks of rows."""
    monkeypatch.setattr(devices, "CONVERT_CHUNK_BYTES", 4 * 64 * 3)  # 3 rows of 64 columns at a time
    ref = scratchlm.load(q4_gguf, dtype="f32", progress=False)
    tm = scratchlm.load(q4_gguf, device="torch-cpu", dtype="f32", progress=False)
    assert rel_err(tm.logits(IDS), ref.logits(IDS)) < 1e-5
    packed = scratchlm.load(q4_gguf, progress=False).tensors["layers.0.attention.wo.weight"]
    np.testing.assert_array_equal(devices.to_torch(packed, "cpu", torch.float32).numpy(), packed.dequantize())


def test_bf16_on_torch_cpu(llama_dir, reference):
    tm = scratchlm.load(llama_dir, device="torch-cpu", dtype="bf16", progress=False)
    assert tm.tensors["layers.1.feed_forward.w2.weight"].dtype == torch.bfloat16
    assert tm.new_cache(4).k[0].dtype == torch.bfloat16
    assert rel_err(tm.logits(IDS), reference[0]) < 5e-2  # bf16 keeps 8 bits of mantissa


@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_gpu_layers_equal_the_plain_path(n, llama_dir, reference):
    m = scratchlm.load(llama_dir, device="torch-cpu", dtype="f32", gpu_layers=n, progress=False)
    kinds = [isinstance(L.wqkv, torch.Tensor) for L in m.layers]
    assert kinds == [i < n for i in range(4)]  # the first n blocks on the torch device, the rest NumPy
    cache = m.new_cache(8)
    assert [isinstance(k, torch.Tensor) for k in cache.k] == kinds  # each block's cache with it
    assert isinstance(m.tensors["output.weight"], torch.Tensor) == (n == 4)  # the head goes with the last block
    assert rel_err(m.logits(IDS), reference[0]) < 1e-5
    assert greedy(m, IDS[:5], 8) == reference[1]
    want = {0: "4 blocks on cpu", 1: "1 block on torch-cpu, 3 blocks on cpu (f32)", 3: "3 blocks on torch-cpu, 1 block on cpu",
            4: "4 blocks on torch-cpu (f32)"}[n]
    assert m.plan.describe().startswith(want)


def test_stream_layers_equal_the_plain_path_and_reuse_two_buffers(llama_dir, reference):
    m = scratchlm.load(llama_dir, device="torch-cpu", dtype="f32", stream_layers=True, progress=False)
    s = m.stream
    host = {id(L.wqkv) for L in m.layers}
    seen = []
    for i, D in s.blocks(m.layers):  # what the forward iterates over
        assert id(D.wqkv) not in host and D.wqkv.data_ptr() != m.layers[i].wqkv.data_ptr()  # a real copy
        assert torch.equal(D.wqkv, m.layers[i].wqkv) and torch.equal(D.w3, m.layers[i].w3)
        assert D.w1.data_ptr() == D.w13.data_ptr()  # gate and up stay views of the fused copy
        seen.append(D.wqkv.data_ptr())
        assert s.live <= 2
    assert s.live == 0 and s.peak_live == 2 and s.copies_made == 2  # 4 blocks, 2 device buffers, reused
    assert len(set(seen)) == 2
    assert rel_err(m.logits(IDS), reference[0]) < 1e-5
    assert greedy(m, IDS[:5], 8) == reference[1]
    assert s.copies_made == 2 and s.live == 0  # still the same two buffers after many forwards
    per_block = sum(t.numel() * 4 for t in s._slots(m.layers[0]).values())
    assert s.transfer_bytes >= per_block * 4 * 10  # every block copied in for every forward


def test_stream_frees_its_copies_when_a_forward_fails(llama_dir):
    m = scratchlm.load(llama_dir, device="torch-cpu", dtype="f32", stream_layers=True, progress=False)
    gen = m.stream.blocks(m.layers)
    next(gen)
    gen.close()  # what an exception inside the forward's loop does
    assert m.stream.live == 0


def test_decode_batch_with_placement(llama_dir):
    """The server's batched step runs on placed blocks too, equal to one forward per sequence."""
    m = scratchlm.load(llama_dir, device="torch-cpu", dtype="f32", gpu_layers=2, progress=False)
    prompts = [IDS[:3], IDS[:6]]
    caches = [m.new_cache(16) for _ in prompts]
    for c, p in zip(caches, prompts):
        m.forward(np.asarray([p[:-1]]), c, 0)
    got = ops.move(m.decode_batch([p[-1] for p in prompts], caches, [len(p) - 1 for p in prompts]),
                   np.empty(0, np.float32))
    for b, p in enumerate(prompts):
        assert rel_err(got[b], m.logits(p)[-1]) < 1e-5


def test_bench_reports_compute_and_transfer(llama_dir):
    from scratchlm.benchmark import run_bench

    r = run_bench(llama_dir, prompt_tokens=8, gen_tokens=4, device="torch-cpu", dtype="f32", stream_layers=True)
    assert r["transfer_mb_per_token"] > 0 and r["transfer_ms_per_token"] > 0 and r["compute_ms_per_token"] > 0
    assert not r["transfer_overlapped"]  # on the CPU the copies are made in turn
    r = run_bench(llama_dir, prompt_tokens=8, gen_tokens=4, device="torch-cpu", dtype="f32", gpu_layers=2)
    assert 0 < r["transfer_mb_per_token"] < 0.01  # only the activations move: [1,1,D] twice a token
    assert "transfer_ms_per_token" not in run_bench(llama_dir, prompt_tokens=8, gen_tokens=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny training run (char tokenizer): a model the CLI can generate text with."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "t.txt").write_text("the cat sat on the mat. " * 40)
    assert main(["train", "--data", str(tmp / "t.txt"), "--out", str(tmp / "run"), "--steps", "2", "--layers", "3",
                 "--dim", "32", "--heads", "2", "--context", "16", "--batch", "2", "--no-progress", "-q",
                 "--threads", "1"]) == 0
    return tmp / "run"


def test_cli_device_flags(run_dir, capsys):
    capsys.readouterr()
    args = ["generate", "-m", str(run_dir), "the ", "-n", "12", "--temperature", "0", "--ignore-eos"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    for extra in (["--device", "torch-cpu", "--dtype", "f32"], ["--device", "torch-cpu", "--stream-layers", "--dtype", "f32"],
                  ["--device", "torch-cpu", "--gpu-layers", "2"]):
        assert main(args + extra) == 0
        out = capsys.readouterr()
        assert out.out == plain
        assert "blocks on torch-cpu" in out.err  # the placement is said


def test_serve_on_placed_blocks(run_dir):
    """The server's scheduler (chunked prefill, batched decode) on torch-cpu with streamed blocks: two
    requests, each the text the NumPy model generates alone."""
    from starlette.testclient import TestClient

    from scratchlm.serve.app import create_app

    ref = scratchlm.load(run_dir, progress=False)
    m = scratchlm.load(run_dir, device="torch-cpu", dtype="f32", stream_layers=True, progress=False)
    app = create_app(m, parallel=2)
    with TestClient(app) as client:
        for prompt in ("the ", "on t"):
            r = client.post("/v1/completions", json={"prompt": prompt, "temperature": 0, "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == ref.generate(prompt, temperature=0, max_tokens=8)
    assert m.stream.live == 0 and m.stream.copies_made == 2


@pytest.mark.parametrize("extra, message", [
    (["--gpu-layers", "2"], "need a torch device"),
    (["--device", "torch-cpu", "--gpu-layers", "2", "--stream-layers"], "not both"),
    (["--dtype", "bf16"], "needs a torch device"),
    (["--device", "tpu"], "unknown device"),
    (["--devices", "cpu,torch-cpu"], "torch devices"),
    (["--device", "torch-cpu", "--gpu-layers", "-1"], ">= 0"),
])
def test_cli_bad_placement_is_one_line(extra, message, q4_gguf, capsys):
    assert main(["generate", "-m", str(q4_gguf), "hi", "-n", "1"] + extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("scratchlm: error:") and message in err and err.count("\n") == 1


@pytest.mark.skipif(CUDA, reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["bench", "--device", "cuda", "--gen-tokens", "1", "--prompt-tokens", "1"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_devices_split_blocks_into_runs(llama_dir, reference):
    plan = devices.make_plan(5, devices="torch-cpu,torch-cpu")
    assert plan.homes == [devices.Device("torch", "cpu")] * 5 and plan.dtype == "f32"
    with pytest.raises(UnsupportedError, match="2 devices for 1 blocks"):
        devices.make_plan(1, devices="torch-cpu,torch-cpu")
    m = scratchlm.load(llama_dir, devices="torch-cpu,torch-cpu", progress=False)  # the one device twice: runs alike
    assert rel_err(m.logits(IDS), reference[0]) < 1e-5


# --- on a GPU ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype, tol", [("f32", 1e-4), ("bf16", 5e-2)])
def test_cuda_equals_numpy(dtype, tol, q4_gguf):
    ref = scratchlm.load(q4_gguf, dtype="f32", progress=False)
    m = scratchlm.load(q4_gguf, device="cuda", dtype=dtype, progress=False)
    assert m.tensors["layers.0.attention.wo.weight"].device.type == "cuda"
    assert rel_err(m.logits(IDS), ref.logits(IDS)) < tol  # TF32 may be on for f32 matmuls


@cuda
def test_cuda_stream_and_gpu_layers_equal_cuda(llama_dir):
    plain = scratchlm.load(llama_dir, device="cuda", dtype="f32", progress=False)
    ref = plain.logits(IDS)
    st = scratchlm.load(llama_dir, device="cuda", dtype="f32", stream_layers=True, progress=False)
    assert st.layers[0].wqkv.is_pinned() and st.layers[0].wqkv.device.type == "cpu"  # host store, page-locked
    assert rel_err(st.logits(IDS), ref) < 1e-5 and st.stream.copies_made == 2 and st.stream.live == 0
    st.stream.collect()
    assert st.stream.transfer_s > 0
    gl = scratchlm.load(llama_dir, device="cuda", dtype="f32", gpu_layers=2, progress=False)
    assert rel_err(gl.logits(IDS), ref) < 1e-4
    assert greedy(gl, IDS[:5], 6) == greedy(plain, IDS[:5], 6) == greedy(st, IDS[:5], 6)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_pipeline(llama_dir):
    plain = scratchlm.load(llama_dir, device="cuda:0", dtype="f32", progress=False)
    m = scratchlm.load(llama_dir, devices="cuda:0,cuda:1", dtype="f32", progress=False)
    assert [L.wqkv.device.index for L in m.layers] == [0, 0, 1, 1]
    assert rel_err(m.logits(IDS), plain.logits(IDS)) < 1e-5


# --- training on a torch device ------------------------------------------------------------------

def test_train_steps_on_torch_cpu_equal_numpy(tmp_path):
    """Three AdamW steps with forward and backward on torch-cpu give the NumPy run's losses and weights
    (float32 both; the sums run in other orders, so 1e-5 relative on the losses, 1e-4 on the weights)."""
    from scratchlm.training.trainer import TrainArgs, Trainer

    (tmp_path / "t.txt").write_text("a quick brown fox jumps over the lazy dog. " * 30)
    runs = {}
    for dev in ("cpu", "torch-cpu"):
        args = TrainArgs(data=[str(tmp_path / "t.txt")], out=str(tmp_path / dev), layers=2, dim=32, heads=4,
                         kv_heads=2, context=16, batch=4, steps=3, warmup=0, eval_every=100, save_every=100,
                         threads=1, device=dev, plot=False)
        t = Trainer.new(args, progress=False, verbose=False)
        runs[dev] = (t, [t.train_step()["loss"] for _ in range(3)])
    (np_t, np_losses), (th_t, th_losses) = runs["cpu"], runs["torch-cpu"]
    assert th_t.work is not th_t.model and isinstance(th_t.work.tensors["norm.weight"], torch.Tensor)
    np.testing.assert_allclose(th_losses, np_losses, rtol=1e-5)
    for name, w in np_t.model.weights.items():
        assert rel_err(th_t.model.weights[name], w) < 1e-4, name
        assert rel_err(ops.move(th_t.work.weights[name], w), th_t.model.weights[name]) == 0  # device copy = master


def test_finetune_lora_on_torch_cpu_equals_numpy(llama_dir):
    """LoRA's gradients with the base on torch-cpu (adapters on the host) equal the NumPy ones."""
    from scratchlm.training.lora import LoRA

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (2, 12)), rng.integers(0, 256, (2, 12))
    mask = (rng.random((2, 12)) < 0.7).astype(np.int64)
    got = []
    for dev in ("cpu", "torch-cpu"):
        m = scratchlm.load(llama_dir, device=dev, dtype="f32", progress=False)
        lora = LoRA(m.config, rank=4, alpha=8, dropout=0.0, seed=1).attach(m)
        fill = np.random.default_rng(5)  # B is zero at the start: the same values for both, so gradient flows
        for n in sorted(lora.params):
            if n.endswith("lora_B"):
                lora.params[n][...] = fill.standard_normal(lora.params[n].shape).astype(np.float32) * 0.1
        got.append(m.loss_and_grads(x, y, loss_mask=mask, wrt="adapters"))
    (l0, g0), (l1, g1) = got
    assert abs(l0 - l1) < 1e-5 * abs(l0)
    assert set(g0) == set(g1)
    for n in g0:
        assert isinstance(g1[n], np.ndarray) and rel_err(g1[n], g0[n]) < 1e-4, n
