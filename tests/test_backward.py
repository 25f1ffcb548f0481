"""The hand-written backward pass against torch autograd.

Whole model: loss and every gradient of `Model.loss_and_grads` against autograd through the Hugging Face
model (loss computed here from HF logits on [B,T] targets, gradients mapped to Meta names by hand, q/k
rows permuted) on tiny random Llama (GQA, MQA, llama3 rope scaling, tied and untied) and GPT-2 models.
Each op: its backward against autograd of the same op written in torch. Finite differences in float64
for a few weights of each model.
"""

import numpy as np
import pytest
import torch

from scratchlm import ops
from scratchlm.errors import PromptError
from scratchlm.model import Model

transformers = pytest.importorskip("transformers")
from tests.test_model import gpt2_to_canonical, llama_to_canonical, tiny_gpt2, tiny_llama  # noqa: E402

TOL = 1e-4  # max abs diff / max abs reference, the bar


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def t64(a, grad=True):
    return torch.tensor(np.asarray(a, dtype=np.float64), requires_grad=grad)


# --- whole model against HF + autograd --------------------------------------------------------------

def randomize(m, seed):
    """Spread the HF weights beyond transformers' init (norm gains != 1, biases != 0) so that a
    misplaced gradient of a norm or bias shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


CASES = {
    "llama-gqa-scaled-untied": dict(arch="llama", tied=False, scaling=True, K=2),
    "llama-gqa-scaled-tied": dict(arch="llama", tied=True, scaling=True, K=2),
    "llama-mqa-plain-untied": dict(arch="llama", tied=False, scaling=False, K=1),
    "gpt2": dict(arch="gpt2"),
}


def build(case, seed=0, dtype=np.float32):
    """(HF model with spread random weights, our Model with the same weights mapped by hand)."""
    c = CASES[case]
    if c["arch"] == "llama":
        m, cfg, _ = tiny_llama(tied=c["tied"], scaling=c["scaling"], K=c["K"], seed=seed)
        to_canonical = llama_to_canonical
    else:
        m, cfg, _ = tiny_gpt2(seed=seed)
        to_canonical = gpt2_to_canonical
    randomize(m, seed + 1)
    W = to_canonical({k: v.numpy() for k, v in m.state_dict().items()}, cfg)
    return m, Model(cfg, {k: np.ascontiguousarray(v, dtype=dtype) for k, v in W.items()}), to_canonical


def batch(cfg, B=2, T=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


@pytest.mark.parametrize("case", list(CASES) + ["llama-gqa-scaled-untied/blocked", "gpt2/blocked"])
def test_loss_and_every_gradient_match_torch_autograd(case):
    case, _, blocked = case.partition("/")
    m, model, to_canonical = build(case)
    if blocked:  # causal attention block by block (ops.causal_attention), the last block partial: 24 = 7+7+7+3
        model.attention_block = 7
    cfg = model.config
    ids, tgt = batch(cfg, B=2, T=24)
    loss, grads = model.loss_and_grads(ids, tgt)

    m.zero_grad()
    logits = m(torch.tensor(ids)).logits  # [B,T,V]; the loss is ours, not HF's shifted one
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.tensor(tgt).reshape(-1))
    ref_loss.backward()
    ref = to_canonical({n: p.grad.numpy() for n, p in m.named_parameters()}, cfg)

    assert isinstance(loss, float)
    assert abs(loss - ref_loss.item()) <= TOL * abs(ref_loss.item())
    assert list(grads) == list(model.weights)  # keyed exactly like the weights, same order
    for name, g in grads.items():
        assert g.shape == model.weights[name].shape and g.dtype == np.float32, name
        if name.endswith("attention.wk.bias"):
            # a key bias adds q.b to every score of a query row, which softmax ignores: its true gradient
            # is 0 and both sides hold rounding noise only
            scale = np.max(np.abs(ref[name.replace("wk", "wq")]))
            assert np.max(np.abs(g)) < 1e-6 * scale and np.max(np.abs(ref[name])) < 1e-6 * scale, name
            continue
        assert np.max(np.abs(ref[name])) > 0, name  # every weight is exercised by this batch
        assert rel_err(g, ref[name]) < TOL, (name, rel_err(g, ref[name]))


def test_gradients_of_a_longer_batch_with_repeated_tokens():
    """Few distinct ids: the embedding scatter-add must add up repeated rows (and the tied head's use)."""
    m, model, to_canonical = build("llama-gqa-scaled-tied", seed=3)
    cfg = model.config
    rng = np.random.default_rng(5)
    ids, tgt = rng.integers(0, 7, (3, 40)), rng.integers(0, cfg.vocab_size, (3, 40))
    loss, grads = model.loss_and_grads(ids, tgt)
    m.zero_grad()
    logits = m(torch.tensor(ids)).logits
    torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.tensor(tgt).reshape(-1)).backward()
    ref = to_canonical({n: p.grad.numpy() for n, p in m.named_parameters()}, cfg)
    for name in ("tok_embeddings.weight", "layers.0.attention.wk.weight", "layers.1.attention.wq.weight"):
        assert rel_err(grads[name], ref[name]) < TOL, name


def test_uint16_ids_from_a_token_file_work_like_int64():
    """The data pipeline hands out windows of a uint16/uint32 memmap: no int64 copy needed by the caller."""
    _, model, _ = build("gpt2", seed=4)
    ids, tgt = batch(model.config, B=2, T=12, seed=2)
    loss, grads = model.loss_and_grads(ids, tgt)
    loss16, grads16 = model.loss_and_grads(ids.astype(np.uint16), tgt.astype(np.uint32))
    assert loss16 == loss
    for name in grads:
        np.testing.assert_array_equal(grads16[name], grads[name])


@pytest.mark.parametrize("case", ["llama-gqa-scaled-untied", "gpt2"])
def test_finite_differences_float64(case):
    """Central differences on a float64 copy of the model for a few entries of several weights."""
    _, model, _ = build(case, seed=2, dtype=np.float64)
    cfg = model.config
    ids, tgt = batch(cfg, B=2, T=10, seed=4)
    _, grads = model.loss_and_grads(ids, tgt)
    names = ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
             "layers.1.attention.wv.weight", "layers.1.attention.wo.weight", "layers.0.feed_forward.w1.weight",
             "layers.1.feed_forward.w2.weight", "layers.0.attention_norm.weight", "norm.weight"]
    names += (["pos_embeddings.weight", "layers.0.attention.wk.bias", "layers.1.ffn_norm.bias"] if cfg.arch == "gpt2"
              else ["layers.1.feed_forward.w3.weight", "output.weight"])
    rng = np.random.default_rng(0)
    h = 1e-6
    for name in names:
        w, g = model.weights[name], grads[name]
        flat = np.argsort(-np.abs(g), axis=None)[:2]  # the two largest entries, plus one at random
        for idx in [np.unravel_index(f, g.shape) for f in flat] + [tuple(rng.integers(0, s) for s in g.shape)]:
            old = w[idx]
            w[idx] = old + h  # writes through the fused views: the forward sees it
            lp = model.loss_and_grads(ids, tgt)[0]
            w[idx] = old - h
            lm = model.loss_and_grads(ids, tgt)[0]
            w[idx] = old
            fd = (lp - lm) / (2 * h)
            assert abs(fd - g[idx]) <= 1e-6 * max(abs(fd), 1e-3), (name, idx, fd, g[idx])


def test_torch_backend_gives_the_same_gradients():
    _, model, _ = build("llama-gqa-scaled-tied", seed=1)
    tmodel = Model(model.config, {k: torch.from_numpy(v.copy()) for k, v in model.weights.items()})
    ids, tgt = batch(model.config, B=2, T=16, seed=1)
    loss, grads = model.loss_and_grads(ids, tgt)
    tloss, tgrads = tmodel.loss_and_grads(torch.tensor(ids), torch.tensor(tgt))
    assert abs(loss - tloss) <= 1e-5 * abs(loss)
    for name, g in grads.items():
        assert isinstance(tgrads[name], torch.Tensor) and tgrads[name].dtype == torch.float32
        assert rel_err(tgrads[name].numpy(), g) < 1e-5, name


@pytest.mark.parametrize("bad, target, msg", [
    (np.zeros((5,), dtype=np.int64), None, "shape"),
    (np.zeros((2, 3), dtype=np.float32), None, "integer"),
    (np.full((2, 3), 300), None, "outside"),
    (np.full((2, 3), -1), None, "outside"),
    (np.zeros((2, 3), dtype=np.int64), np.zeros((2, 4), dtype=np.int64), "expected"),
    (np.zeros((1, 200), dtype=np.int64), None, "context"),
])
def test_bad_ids_give_one_line_errors(bad, target, msg):
    _, model, _ = build("llama-mqa-plain-untied")
    with pytest.raises(PromptError, match=msg):
        model.loss_and_grads(bad, np.zeros(bad.shape, dtype=np.int64) if target is None else target)


# --- each op against autograd of the same op, float64 -------------------------------------------------

def check(ours, ref_tensors, tol=1e-10):
    for a, t in zip(ours, ref_tensors):
        assert a.shape == tuple(t.shape)
        assert rel_err(a, t.detach().numpy()) < tol


def test_rms_norm_backward():
    rng = np.random.default_rng(0)
    x, w, dy = rng.normal(size=(2, 5, 8)) * 3, rng.normal(size=8), rng.normal(size=(2, 5, 8))
    tx, tw = t64(x), t64(w)
    (tx * torch.rsqrt((tx * tx).mean(-1, keepdim=True) + 1e-5) * tw).backward(torch.tensor(dy))
    check(ops.rms_norm_backward(dy, x, w, 1e-5), (tx.grad, tw.grad))


def test_layer_norm_backward():
    rng = np.random.default_rng(1)
    x, w, b, dy = rng.normal(size=(2, 5, 8)) + 1, rng.normal(size=8), rng.normal(size=8), rng.normal(size=(2, 5, 8))
    tx, tw, tb = t64(x), t64(w), t64(b)
    torch.nn.functional.layer_norm(tx, (8,), tw, tb, 1e-5).backward(torch.tensor(dy))
    check(ops.layer_norm_backward(dy, x, w, 1e-5), (tx.grad, tw.grad, tb.grad))


def test_activation_backwards():
    rng = np.random.default_rng(2)
    x, u, dy = rng.normal(size=(3, 7)) * 4, rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    check([ops.sigmoid(x)], [torch.sigmoid(torch.tensor(x))])
    tx, tu = t64(x), t64(u)
    ref = torch.nn.functional.silu(tx) * tu
    check([ops.swiglu(x, u), ops.swiglu(x, u, ops.sigmoid(x))], [ref, ref])
    ref.backward(torch.tensor(dy))
    check(ops.swiglu_backward(dy, x, u), (tx.grad, tu.grad))
    check(ops.swiglu_backward(dy, x, u, ops.sigmoid(x)), (tx.grad, tu.grad))  # the forward's sigmoid reused
    tx = t64(x)
    torch.nn.functional.gelu(tx, approximate="tanh").backward(torch.tensor(dy))
    ref = torch.nn.functional.gelu(torch.tensor(x), approximate="tanh")
    check([ops.gelu_tanh(x), ops.gelu_tanh(x, ops.gelu_tanh_phi(x))], [ref, ref])
    tx = t64(x)
    torch.nn.functional.gelu(tx, approximate="tanh").backward(torch.tensor(dy))
    check([ops.gelu_tanh_backward(dy, x)], [tx.grad])
    check([ops.gelu_tanh_backward(dy, x, ops.gelu_tanh_phi(x))], [tx.grad])  # the forward's phi reused
    tx = t64(x)
    torch.softmax(tx, -1).backward(torch.tensor(dy))
    check([ops.softmax_backward(dy, ops.softmax(x))], [tx.grad])


def test_cross_entropy_and_backward():
    rng = np.random.default_rng(3)
    logits, tgt = rng.normal(size=(2, 6, 11)) * 5, rng.integers(0, 11, (2, 6))
    tl = t64(logits)
    loss = torch.nn.functional.cross_entropy(tl.reshape(-1, 11), torch.tensor(tgt).reshape(-1))
    loss.backward()
    assert abs(float(ops.cross_entropy(logits, tgt)) - loss.item()) < 1e-12
    check([ops.cross_entropy_backward(logits, tgt)], [tl.grad])
    logp = ops.log_softmax(logits)  # the shared-softmax path the model's backward takes
    assert abs(float(ops.cross_entropy(logits, tgt, logp=logp)) - loss.item()) < 1e-12
    check([ops.cross_entropy_backward(logits, tgt, logp=logp)], [tl.grad])
    # huge logits: no overflow, and the loss is finite
    big = logits * 1e4
    assert np.isfinite(float(ops.cross_entropy(big, tgt)))
    assert np.all(np.isfinite(ops.cross_entropy_backward(big, tgt)))


def test_rope_backward():
    rng = np.random.default_rng(4)
    B, T, N, Hd = 2, 9, 3, 8
    x, dy = rng.normal(size=(B, T, N, Hd)), rng.normal(size=(B, T, N, Hd))
    cos, sin = ops.rope_cos_sin(ops.rope_inv_freq(Hd, 10000.0), 3, T)
    tx = t64(x)
    # torch reference: complex rotation of the interleaved pairs (Meta's formulation)
    z = torch.view_as_complex(tx.reshape(B, T, N, Hd // 2, 2).contiguous())
    rot = torch.polar(torch.ones(T, Hd // 2, dtype=torch.float64), torch.atan2(torch.tensor(sin, dtype=torch.float64),
                                                                           torch.tensor(cos, dtype=torch.float64)))
    torch.view_as_real(z * rot[:, None, :]).reshape(B, T, N, Hd).backward(torch.tensor(dy))
    check([ops.rope_backward(dy, cos.astype(np.float64), sin.astype(np.float64))], [tx.grad], tol=1e-6)


def test_rope_complex_fast_path_equals_the_real_form():
    """ops.rope views NumPy pairs as complex numbers; the real form (other namespaces, or a last axis
    that is not contiguous) must give the same rotation, in float32 and float64."""
    rng = np.random.default_rng(5)
    B, T, N, Hd = 2, 7, 5, 16
    cos, sin = ops.rope_cos_sin(ops.rope_inv_freq(Hd, 500000.0), 11, T)
    for dtype, tol in ((np.float32, 1e-6), (np.float64, 1e-12)):
        big = rng.normal(size=(B, T, N + 2, Hd)).astype(dtype)
        x = big[:, :, 1:N + 1]  # a slice over heads, like q/k inside the fused qkv: still complex-viewable
        fast = ops.rope(x, cos.astype(dtype), sin.astype(dtype))
        real = ops.rope(torch.tensor(x), torch.tensor(cos.astype(dtype)), torch.tensor(sin.astype(dtype))).numpy()
        strided = ops.rope(np.repeat(x, 2, axis=-1)[..., ::2], cos.astype(dtype), sin.astype(dtype))  # real path
        assert fast.dtype == dtype and fast.shape == x.shape
        assert np.max(np.abs(fast - real)) <= tol * np.max(np.abs(real))
        assert np.max(np.abs(strided - real)) <= tol * np.max(np.abs(real))


@pytest.mark.parametrize("H, K", [(4, 4), (4, 2), (6, 1)])
def test_attention_backward(H, K):
    rng = np.random.default_rng(5)
    B, T, Hd = 2, 7, 8
    q, k, v = rng.normal(size=(B, H, T, Hd)), rng.normal(size=(B, K, T, Hd)), rng.normal(size=(B, K, T, Hd))
    dout = rng.normal(size=(B, H, T, Hd))
    saved = {}
    ops.attention(q, k, v, ops.causal_mask(T, T), record=lambda n, a: saved.__setitem__(n, a))
    tq, tk, tv = t64(q), t64(k), t64(v)
    G = H // K
    kk, vv = tk.repeat_interleave(G, dim=1), tv.repeat_interleave(G, dim=1)  # query head h reads kv head h // G
    s = tq @ kk.transpose(-1, -2) / np.sqrt(Hd) + torch.tensor(ops.causal_mask(T, T), dtype=torch.float64)
    (torch.softmax(s, -1) @ vv).backward(torch.tensor(dout))
    check(ops.attention_backward(dout, q, k, v, saved["probs"]), (tq.grad, tk.grad, tv.grad))


@pytest.mark.parametrize("H, K, T, block", [(4, 4, 9, 4), (4, 2, 16, 8), (6, 1, 5, 2), (4, 2, 6, 6)])
@pytest.mark.parametrize("size", [1.0, 12.0, 0.0])  # 12: scores up to ~1000, exp overflows without the max
def test_blocked_causal_attention_equals_the_masked_one(H, K, T, block, size, monkeypatch):
    rng = np.random.default_rng(7)
    B, Hd = 2, 8
    q, k, v = rng.normal(size=(B, H, T, Hd)), rng.normal(size=(B, K, T, Hd)), rng.normal(size=(B, K, T, Hd))
    q, k = q * (size or 1.0), k * (size or 1.0)
    if size == 0.0:  # scores below -100 everywhere: row sums under 1e-30 without the max
        q[..., 0], k[..., 0] = 20.0, -20.0
    dout = rng.normal(size=(B, H, T, Hd))
    saved = {}
    ref = ops.attention(q, k, v, ops.causal_mask(T, T), record=lambda n, a: saved.__setitem__(n, a))
    maxes = []  # the row max is taken only where the plain exp would leave float range
    monkeypatch.setattr(ops, "_subtract_row_max", lambda s, f=ops._subtract_row_max: maxes.append(1) or f(s))
    out, blocks = ops.causal_attention(q, k, v, block)
    assert len(blocks) == -(-T // block)
    assert bool(maxes) == (size != 1.0)
    check([out], [torch.tensor(ref)], tol=1e-12)
    check(ops.causal_attention_backward(dout, q, k, v, out, blocks, block),
          [torch.tensor(g) for g in ops.attention_backward(dout, q, k, v, saved["probs"])], tol=1e-12)
    assert np.isfinite(out).all()


def test_linear_and_embedding_backward(monkeypatch):
    rng = np.random.default_rng(6)
    x, w, b, dy = rng.normal(size=(2, 5, 4)), rng.normal(size=(3, 4)), rng.normal(size=3), rng.normal(size=(2, 5, 3))
    tx, tw, tb = t64(x), t64(w), t64(b)
    torch.nn.functional.linear(tx, tw, tb).backward(torch.tensor(dy))
    np.testing.assert_allclose(ops.linear(x, w, b), torch.nn.functional.linear(tx, tw, tb).detach().numpy())
    check(ops.linear_backward(dy, x, w, bias=True), (tx.grad, tw.grad, tb.grad))

    table, ids, dy = rng.normal(size=(10, 4)), np.array([[1, 3, 3], [9, 1, 1]]), rng.normal(size=(2, 3, 4))
    tt = t64(table)
    torch.nn.functional.embedding(torch.tensor(ids), tt).backward(torch.tensor(dy))
    np.testing.assert_array_equal(ops.embedding(table, ids), table[ids])
    check([ops.embedding_backward(dy, ids, 10)], [tt.grad])
    base = rng.normal(size=(10, 4))
    check([ops.embedding_backward(dy, ids, 10, out=base.copy())], [tt.grad + torch.tensor(base)])
    tg = ops.embedding_backward(torch.tensor(dy), torch.tensor(ids), 10)  # torch: index_add_
    check([tg.numpy()], [tt.grad])
    # any other namespace: the one-hot matmul fallback (forced here on NumPy arrays)
    monkeypatch.setattr(ops, "is_numpy_array", lambda a: False)
    monkeypatch.setattr(ops, "is_torch_array", lambda a: False)
    check([ops.embedding_backward(dy, ids, 10)], [tt.grad])
