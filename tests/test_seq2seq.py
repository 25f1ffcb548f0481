"""The encoder-decoder Transformer (scratchlm/seq2seq.py) against torch.nn.Transformer and torch autograd,
its decoding (greedy, beam search), and its training run (seq2seq_train.py: TSV data, exact resume, CLI).

The references run in float64, as our model does here: the comparison then checks the math (masks, norm
placement, the hand-written backward) rather than float32 rounding, which over a 2+2-layer model and
a softmax is itself ~1e-6 relative. One float32 forward is checked too, at the same 1e-5.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from scratchlm import ops  # noqa: E402
from scratchlm.seq2seq import (Seq2SeqConfig, beam_search, forward, greedy_decode, init_weights,  # noqa: E402
                               loss_and_grads, out_table, sequence_logprob, src_table, tgt_table)

D, H, F, V = 16, 4, 24, 11


def _cfg(norm_first=False, shared=True, **kw):
    return Seq2SeqConfig(dim=D, n_heads=H, n_enc_layers=2, n_dec_layers=2, ffn_dim=F, vocab_size=V, max_seq_len=12,
                         norm_first=norm_first, shared_embeddings=shared, tie_output=shared, **kw)


def _weights(cfg, dtype=np.float64, seed=1):
    """Our initialisation, with norms and biases moved off 1 and 0 so that they matter."""
    w = init_weights(cfg, seed, dtype)
    rng = np.random.default_rng(seed)
    for n in w:
        if "bias" in n or "norm" in n:
            w[n] = (w[n] + rng.standard_normal(w[n].shape) * 0.1).astype(dtype)
    return w


# a padded batch: the second source has 2 padding positions, the second target 2
SRC = np.array([[3, 4, 5, 6, 7], [5, 6, 7, 0, 0]])
TGT_IN = np.array([[1, 3, 4, 5], [1, 8, 0, 0]])
TGT_OUT = np.array([[3, 4, 5, 2], [8, 2, 0, 0]])


def _torch_logits(cfg, w, dtype=torch.float64):
    """The same model in torch: nn.Transformer (dropout 0, train mode so no fast path drops padded rows)
    loaded with our weights, the embeddings, sinusoidal encoding and output projection around it."""
    tr = torch.nn.Transformer(d_model=D, nhead=H, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=F,
                              dropout=0.0, batch_first=True, norm_first=cfg.norm_first).to(dtype)
    tr.load_state_dict({k: torch.tensor(v, dtype=dtype) for k, v in w.items() if k.startswith(("encoder", "decoder"))},
                       strict=True)
    tr.train()
    emb = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in w.items()
           if not k.startswith(("encoder", "decoder"))}
    S, T = SRC.shape[1], TGT_IN.shape[1]
    pe = torch.tensor(ops.sinusoidal_encoding(max(S, T), D, np.float64), dtype=dtype)
    src_e = emb[src_table(cfg)][torch.tensor(SRC)] * math.sqrt(D) + pe[:S]
    tgt_e = emb[tgt_table(cfg)][torch.tensor(TGT_IN)] * math.sqrt(D) + pe[:T]
    src_pad, tgt_pad = torch.tensor(SRC == 0), torch.tensor(TGT_IN == 0)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype)
    out = tr(src_e, tgt_e, tgt_mask=causal, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
             memory_key_padding_mask=src_pad)
    return out @ emb[out_table(cfg)].T, tr, emb


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = [(nf, sh) for nf in (False, True) for sh in (True, False)]
IDS = [f"{'pre' if nf else 'post'}LN-{'shared' if sh else 'separate'}" for nf, sh in CASES]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("norm_first,shared", CASES, ids=IDS)
def test_forward_matches_torch_transformer(norm_first, shared):
    cfg = _cfg(norm_first, shared)
    w = _weights(cfg)
    ours = forward(w, cfg, SRC, TGT_IN)  # padding masks from pad_id, causal mask inside
    ref, _, _ = _torch_logits(cfg, w)
    assert ours.shape == (2, 4, V)
    assert _rel(ours, ref.detach().numpy()) < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_forward_float32_matches_torch():
    cfg = _cfg()
    w = _weights(cfg, np.float32)
    ours = forward(w, cfg, SRC, TGT_IN)
    assert ours.dtype == np.float32
    ref, _, _ = _torch_logits(cfg, {k: v.astype(np.float64) for k, v in w.items()})
    assert _rel(ours, ref.detach().numpy()) < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("norm_first,shared", CASES, ids=IDS)
def test_gradients_match_torch_autograd(norm_first, shared):
    cfg = _cfg(norm_first, shared)
    w = _weights(cfg)
    loss, grads = loss_and_grads(w, cfg, SRC, TGT_IN, TGT_OUT)
    logits, tr, emb = _torch_logits(cfg, w)
    keep = torch.tensor(TGT_OUT != 0)  # padded targets are not scored
    ref_loss = torch.nn.functional.cross_entropy(logits[keep], torch.tensor(TGT_OUT)[keep])
    ref_loss.backward()
    ref = {k: p.grad.numpy() for k, p in tr.named_parameters()} | {k: p.grad.numpy() for k, p in emb.items()}
    assert abs(loss - ref_loss.item()) < 1e-10
    assert set(grads) == set(ref) == set(w)
    for name, g in ref.items():
        assert grads[name].shape == g.shape, name
        assert _rel(grads[name], g) < 1e-4, name


def test_padding_does_not_change_the_real_positions():
    """A padded sequence in a batch gives the same logits on its real positions as the sequence alone:
    the padding masks keep every attention (encoder, decoder self and cross) off the pad positions."""
    cfg = _cfg()
    w = _weights(cfg)
    batch = forward(w, cfg, SRC, TGT_IN)  # [2,4,V]
    alone = forward(w, cfg, SRC[1:, :3], TGT_IN[1:, :2])  # [1,2,V]
    np.testing.assert_allclose(batch[1, :2], alone[0], rtol=1e-12, atol=1e-12)
    # and a later target token never changes an earlier position's logits (the causal mask)
    changed = TGT_IN.copy()
    changed[0, 3] = 9
    np.testing.assert_allclose(forward(w, cfg, SRC, changed)[0, :3], batch[0, :3], rtol=1e-12, atol=1e-12)


def test_sinusoidal_encoding_is_the_papers_formula():
    pe = ops.sinusoidal_encoding(7, 8, np.float64)
    for t, i in itertools.product(range(7), range(4)):
        angle = t / 10000 ** (2 * i / 8)
        assert pe[t, 2 * i] == pytest.approx(math.sin(angle), abs=1e-15)
        assert pe[t, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-15)
    with pytest.raises(ValueError):
        ops.sinusoidal_encoding(4, 7)


# --- decoding ---------------------------------------------------------------------------------------

def _tiny(seed, vocab=5):
    """A random model over a tiny vocabulary (pad 0, bos 1, eos 2, then tokens), sharpened logits."""
    cfg = Seq2SeqConfig(dim=8, n_heads=2, n_enc_layers=1, n_dec_layers=1, ffn_dim=16, vocab_size=vocab, max_seq_len=8)
    w = init_weights(cfg, seed, np.float64)
    w["embed.weight"] *= 6.0  # peakier distributions: some of them make greedy choose badly
    return cfg, w


def test_beam_width_one_is_greedy_and_scores_are_true_log_probs():
    cfg, w = _tiny(0, vocab=9)
    src = [3, 4, 5, 6]
    for max_len in (3, 6):
        greedy = greedy_decode(w, cfg, src, max_len)
        (one, score1), = beam_search(w, cfg, src, beam=1, max_len=max_len)
        assert one == greedy
        for hyp, score in beam_search(w, cfg, src, beam=4, max_len=max_len):
            # a hypothesis shorter than max_len ended with EOS, and its score counts it
            ref = sequence_logprob(w, cfg, src, hyp, eos=len(hyp) < max_len)
            assert score == pytest.approx(ref, abs=1e-9)


def test_wide_beam_finds_the_best_sequence_where_greedy_does_not():
    """With a beam wider than every prefix the search is exhaustive: it must return the best of all
    sequences, found here by brute force. Among these random models greedy misses it at least once."""
    max_len, greedy_worse = 3, 0
    for seed in range(8):
        cfg, w = _tiny(seed)
        src = [3, 4, 3]
        toks = [t for t in range(cfg.vocab_size) if t not in (cfg.pad_id, cfg.bos_id, cfg.eos_id)]
        cands = [(list(s), True) for k in range(max_len) for s in itertools.product(toks, repeat=k)]
        cands += [(list(s), False) for s in itertools.product(toks, repeat=max_len)]  # cut without EOS
        scores = [sequence_logprob(w, cfg, src, s, eos=e) for s, e in cands]
        best = int(np.argmax(scores))
        hyp, score = beam_search(w, cfg, src, beam=64, max_len=max_len)[0]
        assert hyp == cands[best][0]
        assert score == pytest.approx(scores[best], abs=1e-9)
        g = greedy_decode(w, cfg, src, max_len)
        g_score = sequence_logprob(w, cfg, src, g, eos=len(g) < max_len)
        assert g_score <= score + 1e-9
        greedy_worse += g_score < score - 1e-6
    assert greedy_worse >= 1


# --- training: data, exact resume, CLI ------------------------------------------------------------

def _pairs_file(tmp_path, n=120):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n):
        word = "".join(rng.choice(list("abcdef"), size=int(rng.integers(2, 7))))
        lines.append(f"{word}\t{word[::-1].upper()}")  # reverse and upper-case
    p = tmp_path / "pairs.tsv"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def _args(tmp_path, data, out, **kw):
    from scratchlm.training.trainer import TrainArgs

    base = dict(data=[str(data)], out=str(out), arch="seq2seq", layers=1, dim=16, heads=2, context=10, batch=8,
                steps=6, lr=3e-3, warmup=2, eval_every=3, eval_batches=2, save_every=3, plot=False, threads=1)
    base.update(kw)
    return TrainArgs(**base)


def test_resume_is_bitwise_exact(tmp_path):
    """6 steps in one go == 3 steps, a checkpoint, the trainer dropped, a resume from the run directory and
    3 more: the same weights and optimizer moments bit for bit (the sampler's RNG, AdamW's moments and
    step count all come back from the checkpoint, and every operation is deterministic), post- and pre-LN."""
    from safetensors.numpy import load_file

    from scratchlm.training import checkpoint as ck
    from scratchlm.training.seq2seq_train import Seq2SeqTrainer

    data = _pairs_file(tmp_path)
    for pre_ln in (False, True):
        a = Seq2SeqTrainer.new(_args(tmp_path, data, tmp_path / f"a{pre_ln}", pre_ln=pre_ln), progress=False, verbose=False)
        a.train()
        b = Seq2SeqTrainer.new(_args(tmp_path, data, tmp_path / f"b{pre_ln}", pre_ln=pre_ln), progress=False, verbose=False)
        for _ in range(3):  # the first half of the same 6-step run, then it stops after a checkpoint
            b.train_step()
        b.save()
        b.close_log()
        b._lock.close()
        del b
        b = Seq2SeqTrainer.resume(tmp_path / f"b{pre_ln}", progress=False, verbose=False)
        assert b.step == 3
        b.train()
        ca, cb = ck.latest_checkpoint(tmp_path / f"a{pre_ln}"), ck.latest_checkpoint(tmp_path / f"b{pre_ln}")
        assert ca.name == cb.name == "step-0000006"
        for f in ("model.safetensors", "optimizer.safetensors"):
            ta, tb = load_file(str(ca / f)), load_file(str(cb / f))
            assert ta.keys() == tb.keys()
            for n in ta:
                assert np.array_equal(ta[n], tb[n]), (f, n)  # bit for bit, not approximately
        la = [r["loss"] for r in a.history if "loss" in r]
        lb = [r["loss"] for r in b.history if "loss" in r]
        assert la[3:] == lb  # the resumed steps 4..6 saw the same batches


def test_training_learns_and_cli_decodes(tmp_path, capsys):
    """The whole pipeline through the CLI: train a tiny model on reversed words, then generate (greedy and
    beam) and explain from the run directory."""
    from scratchlm.cli import main

    data = _pairs_file(tmp_path, 200)
    run = tmp_path / "run"
    rc = main(["train", "--arch", "seq2seq", "--data", str(data), "--out", str(run), "--layers", "1", "--dim", "32",
               "--heads", "2", "--context", "10", "--batch", "16", "--steps", "60", "--lr", "5e-3", "--eval-every", "60",
               "--save-every", "60", "--no-progress", "-q"])
    assert rc == 0
    import json
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5  # it learned something
    assert evals[-1]["val_loss"] < next(r for r in log if "bigram_loss" in r)["bigram_loss"]  # from the source
    assert (run / "loss.png").is_file()
    capsys.readouterr()
    assert main(["generate", "-m", str(run), "abc"]) == 0
    out = capsys.readouterr().out.strip()
    assert out and set(out) <= set("ABCDEF")
    assert main(["generate", "-m", str(run), "abc", "--beam", "3"]) == 0
    assert capsys.readouterr().out.strip()

    # explain walks the same model: its recorded forward is the model's, in both languages
    from scratchlm.explain.seq2seq import build
    from scratchlm.training.seq2seq_train import load_run
    model = load_run(run)
    w = build(model, "abc", layer=0, head=1)
    assert w.target_ids[1:] == greedy_decode(model.weights, model.config, model.tokenizer.encode("abc"))
    cross = w.rec["decoder.layers.0.multihead_attn.probs"]  # [1,H,T,S]
    assert cross.shape == (1, 2, len(w.target_ids), 3)
    np.testing.assert_allclose(cross.sum(-1), 1.0, rtol=1e-5)
    ref = model.forward(np.asarray([w.ids]), np.asarray([w.target_ids]))
    np.testing.assert_array_equal(w.logits, ref)
    for lang, title in (("en", "cross-attention to the source"), ("zh", "交叉注意力")):
        assert main(["explain", "-m", str(run), "abc", "--lang", lang, "--out", str(tmp_path / lang)]) == 0
        text = capsys.readouterr().out
        assert title in text and "8/8" in text
        assert (tmp_path / lang / "cross_attention.png").stat().st_size > 1000
    assert main(["explain", "-m", str(run), "abc", "--layer", "3"]) == 1
    assert "--layer 3 does not exist" in capsys.readouterr().err
    assert main(["info", "-m", str(run)]) == 1  # the decoder-only commands say what a seq2seq run is for
    assert "an encoder-decoder (seq2seq) run" in capsys.readouterr().err


def test_tsv_line_without_tab_is_a_one_line_error(tmp_path, capsys):
    from scratchlm.cli import main

    bad = tmp_path / "bad.tsv"
    bad.write_text("abc\tCBA\nno tab here\n", encoding="utf-8")
    rc = main(["train", "--arch", "seq2seq", "--data", str(bad), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "bad.tsv:2: no tab between source and target" in err
    assert "Traceback" not in err
