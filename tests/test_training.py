"""Training: AdamW / schedule / clipping against torch, data pipeline, baselines, a short run that
learns, gradient accumulation, the stdlib demo, bad inputs of `scratchlm train`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import scratchlm
from scratchlm import cli
from scratchlm.config import ModelConfig
from scratchlm.model import Model
from scratchlm.training import data as D
from scratchlm.training.optim import AdamW, clip_grad_norm, decays, global_norm, lr_at
from scratchlm.training.trainer import TrainArgs, Trainer, accumulate_grads, init_weights

torch = pytest.importorskip("torch")


def _params(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"tok_embeddings.weight": (11, 6), "layers.0.attention.wq.weight": (6, 6),
              "layers.0.attention_norm.weight": (6,), "layers.0.attention.wq.bias": (6,), "norm.weight": (6,),
              "layers.0.feed_forward.w1.weight": (10, 6)}
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


# --- optimizer ----------------------------------------------------------------------------------


def test_decay_groups():
    assert decays("layers.3.attention.wq.weight", (8, 8))
    assert decays("tok_embeddings.weight", (10, 8))
    assert not decays("layers.3.attention_norm.weight", (8,))
    assert not decays("norm.weight", (8,))
    assert not decays("layers.0.attention.wq.bias", (8,))


@pytest.mark.parametrize("wd,betas", [(0.1, (0.9, 0.95)), (0.0, (0.8, 0.999)), (0.5, (0.9, 0.99))])
def test_adamw_matches_torch(wd, betas):
    params = _params()
    ref = {n: torch.tensor(p.copy(), requires_grad=True) for n, p in params.items()}
    opt = AdamW(params, betas=betas, eps=1e-8, weight_decay=wd)
    groups = [{"params": [ref[n] for n in ref if decays(n, params[n].shape)], "weight_decay": wd},
              {"params": [ref[n] for n in ref if not decays(n, params[n].shape)], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=1.0, betas=betas, eps=1e-8, foreach=False)
    rng = np.random.default_rng(1)
    for step in range(12):
        lr = 1e-2 * (1 + step % 3)
        grads = {n: (rng.standard_normal(p.shape) * 10 ** rng.uniform(-3, 1)).astype(np.float32) for n, p in params.items()}
        for n, t in ref.items():
            t.grad = torch.tensor(grads[n])
        for g in topt.param_groups:
            g["lr"] = lr
        topt.step()
        opt.step(grads, lr)
    for n, p in params.items():
        np.testing.assert_allclose(p, ref[n].detach().numpy(), rtol=1e-6, atol=1e-7, err_msg=n)
    for n in params:  # the moments too (what a checkpoint saves); m is a sum of terms of both signs,
        st = topt.state[ref[n]]  # so an entry near 0 is compared relative to the largest entry
        m_ref, v_ref = st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()
        np.testing.assert_allclose(opt.m[n], m_ref, rtol=1e-6, atol=1e-6 * np.abs(m_ref).max())
        np.testing.assert_allclose(opt.v[n], v_ref, rtol=1e-6)


def test_adamw_updates_fused_views_in_place():
    cfg = ModelConfig(arch="llama", dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=20, ffn_dim=32,
                      max_seq_len=8, tie_embeddings=True)
    model = Model(cfg, init_weights(cfg, 0))
    before = model.layers[0].wqkv.copy()
    ids = np.arange(16).reshape(2, 8) % 20
    loss, grads = model.loss_and_grads(ids, (ids + 1) % 20)
    AdamW(model.weights).step(grads, 1e-2)
    # the fused matrix the forward uses moved, and the canonical entries are still views of it
    assert not np.array_equal(model.layers[0].wqkv, before)
    assert np.shares_memory(model.weights["layers.0.attention.wq.weight"], model.layers[0].wqkv)
    assert model.loss_and_grads(ids, (ids + 1) % 20)[0] < loss


def test_schedule_hand_formula():
    max_lr, min_lr, warm, total = 3e-3, 3e-4, 10, 110
    for s in range(0, 130):
        if s < warm:
            want = max_lr * (s + 1) / warm
        elif s >= total:
            want = min_lr
        else:
            want = min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * (s - warm) / (total - warm))) / 2
        assert lr_at(s, max_lr, warm, total, min_lr) == pytest.approx(want, rel=1e-12)
    assert lr_at(warm - 1, max_lr, warm, total, min_lr) == pytest.approx(max_lr)
    assert lr_at(warm, max_lr, warm, total, min_lr) == pytest.approx(max_lr)
    assert lr_at(60, max_lr, warm, total, min_lr) == pytest.approx((max_lr + min_lr) / 2)
    assert lr_at(0, 1.0, 0, 10, 0.0) == pytest.approx(1.0)  # no warm-up: starts at the peak


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_matches_torch(max_norm):
    grads = _params(3)
    ts = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(ts, grads.values()):
        t.grad = torch.tensor(g.copy())
    want_norm = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert norm == pytest.approx(float(want_norm), rel=1e-6)
    for t, g in zip(ts, grads.values()):
        np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-8)
    assert global_norm(grads) <= max_norm * (1 + 1e-5)


def test_accumulation_equals_one_big_batch():
    cfg = ModelConfig(arch="gpt2", dim=16, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=23, ffn_dim=64,
                      max_seq_len=8, tie_embeddings=True)
    model = Model(cfg, init_weights(cfg, 1))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 23, (6, 8)), rng.integers(0, 23, (6, 8))
    loss_big, g_big = model.loss_and_grads(x, y)
    g_big = {n: v.copy() for n, v in g_big.items()}
    loss_acc, g_acc = accumulate_grads(model, [(x[:2], y[:2]), (x[2:4], y[2:4]), (x[4:], y[4:])])
    assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    for n in g_big:
        np.testing.assert_allclose(g_acc[n], g_big[n], rtol=1e-4, atol=1e-7, err_msg=n)


# --- data ----------------------------------------------------------------------------------------


def test_tokens_file_split_and_batches(tmp_path):
    ids = np.arange(1000) % 300
    data = D.write_tokens(ids, tmp_path, vocab_size=300, tokenizer_name="t", sources=[{"path": "x", "bytes": 1}])
    meta = json.loads((tmp_path / "tokens.json").read_text())
    assert meta["dtype"] == "uint16" and meta["count"] == 1000 and meta["vocab_size"] == 300
    assert (tmp_path / "tokens.bin").stat().st_size == 2000
    assert isinstance(data.tokens, np.memmap)
    np.testing.assert_array_equal(data.train, ids[:900])  # the last 10% is validation
    np.testing.assert_array_equal(data.val, ids[900:])

    a, b = D.BatchSampler(data.train, 4, 16, seed=5), D.BatchSampler(data.train, 4, 16, seed=5)
    x1, y1 = a.next()
    x2, y2 = b.next()
    np.testing.assert_array_equal(x1, x2)
    assert x1.shape == y1.shape == (4, 16) and x1.dtype == np.int64
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    np.testing.assert_array_equal((x1 + 1) % 300, y1)  # (in this corpus the next id is id+1)
    assert not np.array_equal(D.BatchSampler(data.train, 4, 16, seed=6).next()[0], x1)
    # the saved state continues the same stream
    st = json.loads(json.dumps(a.state()))
    want = [a.next()[0] for _ in range(3)]
    c = D.BatchSampler(data.train, 4, 16, seed=999)
    c.set_state(st)
    for w in want:
        np.testing.assert_array_equal(c.next()[0], w)
    # every window lies inside the split: the last start is n - T - 1
    xs = np.concatenate([D.get_batch(data.val, 50, 99, np.random.default_rng(i))[1] for i in range(4)])
    assert xs.max() < 300 and data.val.size == 100


def test_uint32_for_big_vocab(tmp_path):
    data = D.write_tokens([0, 70000, 5, 100000], tmp_path, vocab_size=128256, tokenizer_name="t", sources=[])
    assert data.tokens.dtype == np.uint32
    np.testing.assert_array_equal(data.tokens, [0, 70000, 5, 100000])


def test_bigram_and_unigram_baselines_by_hand():
    rng = np.random.default_rng(0)
    V = 7
    train, val = rng.integers(0, V, 500), rng.integers(0, V, 80)
    counts = np.zeros((V, V))
    for a, b in zip(train[:-1], train[1:]):
        counts[a, b] += 1
    p = (counts + 0.1) / (counts.sum(1, keepdims=True) + 0.1 * V)
    want = -np.mean([math.log(p[a, b]) for a, b in zip(val[:-1], val[1:])])
    assert D.bigram_loss(train, val, V) == pytest.approx(want, rel=1e-9)
    uni = (np.bincount(train, minlength=V) + 1) / (len(train) + V)
    assert D.unigram_loss(train, val, V) == pytest.approx(-np.mean(np.log(uni[val])), rel=1e-9)


# --- training runs -----------------------------------------------------------------------------


def _tiny_args(tmp_path, corpus, **kw):
    a = dict(data=[str(corpus)], out=str(tmp_path / "run"), layers=2, dim=32, heads=4, kv_heads=2, context=32,
             batch=8, steps=150, lr=1e-2, eval_every=50, save_every=50, eval_batches=2, sample_tokens=20, plot=False)
    a.update(kw)
    return TrainArgs(**a)


def test_short_run_beats_bigram_baseline(tmp_path):
    # a corpus with structure a bigram cannot see: words, each followed by a fixed other word
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    nxt = {w: words[(i + 1) % len(words)] for i, w in enumerate(words)}
    w, out = "alpha", []
    for _ in range(900):
        out.append(w)
        w = nxt[w] if rng.random() < 0.9 else words[rng.integers(len(words))]
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(out))
    t = Trainer.new(_tiny_args(tmp_path, corpus), progress=False, verbose=False)
    r = t.train()
    assert r["bigram_loss"] < r["unigram_loss"] < r["uniform_loss"]
    assert r["val_loss"] < 0.7 * r["bigram_loss"], r  # far below the bigram's ~1.3 nats
    assert r["train_loss"] < 0.7 * r["bigram_loss"]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in log if "loss" in x]
    assert steps == list(range(1, 151))
    assert any("sample" in x for x in log) and sum("val_loss" in x for x in log) == 4  # steps 0, 50, 100, 150
    # the run loads like any other model, and computes what the trainer's model computes
    m = scratchlm.load(tmp_path / "run")
    assert m.info["format"] == "run" and m.info["step"] == 150
    ids = t.data.val[:32].astype(np.int64)
    np.testing.assert_array_equal(m.logits(ids), t.model.logits(ids))
    assert isinstance(m.generate("alpha", max_tokens=10, temperature=0), str)


def test_stdlib_demo_short(tmp_path):
    """A very short version of the documented demo: a char model of Python's own standard library."""
    corpus = D.stdlib_corpus(tmp_path / "stdlib.txt", files=("textwrap.py", "bisect.py", "heapq.py"))
    t = Trainer.new(_tiny_args(tmp_path, corpus, steps=60, eval_every=60, save_every=60, context=64, lr=5e-3,
                               plot=True), progress=False, verbose=False)
    r = t.train()
    assert r["val_loss"] < r["unigram_loss"] < r["uniform_loss"]
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample = next(x["sample"] for x in t.history if "sample" in x)
    assert isinstance(sample, str) and len(sample) > 20


def test_gpt2_arch_runs(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello world, this is a small text. " * 40)
    t = Trainer.new(_tiny_args(tmp_path, corpus, arch="gpt2", kv_heads=0, steps=30, eval_every=30, save_every=30),
                    progress=False, verbose=False)
    r = t.train()
    assert r["val_loss"] < r["unigram_loss"]
    assert scratchlm.load(tmp_path / "run").config.arch == "gpt2"


# --- bad input ------------------------------------------------------------------------------------


def _cli_error(capsys, argv):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error: "), err
    return lines[0]


def test_bad_inputs(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("some text that is long enough to train on, " * 20)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    base = ["train", "--layers", "1", "--dim", "16", "--heads", "2", "--steps", "2", "--context", "16", "--no-progress"]
    assert "no such file" in _cli_error(capsys, base + ["--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o1")])
    assert "empty" in _cli_error(capsys, base + ["--data", str(empty), "--out", str(tmp_path / "o2")])
    msg = _cli_error(capsys, base[:-3] + ["--context", "5000", "--no-progress", "--data", str(good), "--out", str(tmp_path / "o3")])
    assert "context" in msg
    assert "unknown tokenizer" in _cli_error(capsys, base + ["--data", str(good), "--out", str(tmp_path / "o4"),
                                                              "--tokenizer", "wordpiece"])
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "not writable" in _cli_error(capsys, base + ["--data", str(good), "--out", str(blocker / "run")])
    assert "not a directory" in _cli_error(capsys, base + ["--data", str(good), "--out", str(blocker)])
    assert "multiple" in _cli_error(capsys, base + ["--data", str(good), "--out", str(tmp_path / "o5"), "--dim", "15"])
    assert "--data" in _cli_error(capsys, ["train", "--out", str(tmp_path / "o6")])
    assert "not a training run" in _cli_error(capsys, ["train", "--resume", str(tmp_path)])
    # a good run, then the same --out again
    assert cli.main(base + ["--data", str(good), "--out", str(tmp_path / "ok"), "-q"]) == 0
    capsys.readouterr()
    assert "already holds a training run" in _cli_error(capsys, base + ["--data", str(good), "--out", str(tmp_path / "ok")])


def test_bpe_and_pretrained_tokenizers(tmp_path, llama3_tokenizer_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log. " * 30)
    t = Trainer.new(_tiny_args(tmp_path, corpus, tokenizer="bpe:300", steps=3, eval_every=3, save_every=3,
                               context=16), progress=False, verbose=False)
    t.train()
    m = scratchlm.load(tmp_path / "run")
    assert m.config.vocab_size == m.tokenizer.vocab_size == t.model.tokenizer.vocab_size
    assert m.tokenizer.encode("the cat") == t.model.tokenizer.encode("the cat")
    # an existing model's tokenizer: the Llama 3 vocabulary needs uint32 token files
    t = Trainer.new(_tiny_args(tmp_path, corpus, out=str(tmp_path / "run3"), tokenizer=str(llama3_tokenizer_path),
                               layers=1, dim=16, heads=2, kv_heads=0, steps=2, eval_every=2, save_every=2, context=8,
                               batch=2, eval_batches=1), progress=False, verbose=False)
    t.train()
    assert t.data.tokens.dtype == np.uint32 and t.cfg.vocab_size >= 128256
    np.testing.assert_array_equal(t.data.tokens[:6], scratchlm.load_tokenizer(llama3_tokenizer_path).encode(corpus.read_text())[:6])
