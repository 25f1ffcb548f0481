"""Perplexity: both window rules against transformers' logits on tiny random models, and the CLI verb.

The reference side rewrites each rule from its source (llama.cpp's perplexity.cpp, the Hugging Face
perplexity guide's loop with labels=-100) in torch, over transformers' own logits and loss.
"""

import json
import math
import types

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm.cli import main
from tests.tiny_models import hf_reference, make_hf_gpt2, make_hf_llama

BOS = 1


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(our model, the transformers reference) of one tiny random network."""
    tmp = tmp_path_factory.mktemp(request.param)
    path = make_hf_llama(tmp / "m", vocab=256) if request.param == "llama" else make_hf_gpt2(tmp / "m", vocab=256)
    return scratchlm.load(path), hf_reference(path)


def ids_of(n, seed=0):
    return np.random.default_rng(seed).integers(3, 256, size=n).tolist()


def llamacpp_reference(hf, ids, ctx, bos):
    """llama-perplexity: windows [i*ctx, (i+1)*ctx), first token -> BOS, logits first..ctx-2 predict the next."""
    first, v = ctx // 2, []
    for i in range(len(ids) // ctx):
        w = list(ids[i * ctx:(i + 1) * ctx])
        inp = ([bos] + w[1:]) if bos is not None else w
        with torch.no_grad():
            logits = hf(torch.tensor([inp])).logits[0].double()  # [ctx,V]
        logp = torch.log_softmax(logits, dim=-1)
        for j in range(first, ctx - 1):
            v.append(-float(logp[j, w[j + 1]]))
    v = np.array(v)
    nll, nll2 = v.mean(), (v * v).mean()
    ppl = math.exp(nll)
    return ppl, math.sqrt((nll2 - nll * nll) / (len(v) - 1)) * ppl, len(v)


def hf_guide_reference(hf, ids, ctx, stride):
    """The guide's loop, counting each window's scored tokens exactly (labels that survive the shift)."""
    enc = torch.tensor([ids])
    seq_len, prev_end, nll_sum, n_tokens = enc.size(1), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + ctx, seq_len)
        trg_len = end - prev_end
        input_ids = enc[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("bos", [False, True])
def test_llamacpp_rule_matches_transformers(pair, batch, bos):
    ours, hf = pair
    ours.tokenizer = types.SimpleNamespace(bos_id=BOS, add_bos=bos) if bos else None
    ids = ids_of(7 * 24 + 5)  # 7 windows and a dropped tail
    r = scratchlm.perplexity(ours, ids, ctx=24, batch=batch)
    ppl, err, n = llamacpp_reference(hf, ids, 24, BOS if bos else None)
    assert r.tokens == n == 7 * (24 - 1 - 12)
    assert r.ppl == pytest.approx(ppl, rel=1e-5) and r.ppl_stderr == pytest.approx(err, rel=1e-4)
    assert r.nll == pytest.approx(math.log(r.ppl))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("ctx,stride,n", [(32, 8, 150), (32, 32, 100), (20, 7, 20), (16, 5, 10)])
def test_sliding_window_rule_matches_transformers(pair, batch, ctx, stride, n):
    ours, hf = pair
    ours.tokenizer = None
    ids = ids_of(n, seed=1)
    r = scratchlm.perplexity(ours, ids, ctx=ctx, stride=stride, batch=batch)
    ppl, count = hf_guide_reference(hf, ids, ctx, stride)
    assert r.tokens == count
    assert r.ppl == pytest.approx(ppl, rel=1e-5)
    if stride < ctx:
        assert r.tokens == n - 1  # every token after the first, once


def test_bad_arguments(pair):
    ours, _ = pair
    ours.tokenizer = None
    ids = ids_of(64)
    with pytest.raises(ValueError, match="shorter than one window"):
        scratchlm.perplexity(ours, ids[:10], ctx=16)
    with pytest.raises(ValueError, match="larger than the model's context"):
        scratchlm.perplexity(ours, ids, ctx=100_000)
    for s in (0, 17):
        with pytest.raises(ValueError, match="stride"):
            scratchlm.perplexity(ours, ids, ctx=16, stride=s)
    with pytest.raises(ValueError, match="vocabulary"):
        scratchlm.perplexity(ours, ids[:-1] + [10_000], ctx=16)


TEXT = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step. "
        "All that glitters is not gold. Where there is a will, there is a way. Knowledge is power, and time is "
        "money. The early bird catches the worm, but the second mouse gets the cheese.\n") * 2


def test_cli_json_on_the_default_model(tmp_path, capsys):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert main(["perplexity", str(f), "--ctx", "64", "--batch", "2", "--json"]) == 0
    out, _ = capsys.readouterr()
    assert out.count("\n") == 1
    r = json.loads(out)
    assert set(r) == {"ppl", "ppl_stderr", "tokens"} and math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert r["tokens"] > 0 and r["tokens"] % (64 - 1 - 32) == 0
    assert main(["perplexity", str(f), "--ctx", "64", "--stride", "32"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("perplexity: ") and " ± " in out and out.rstrip().endswith(" tokens")


@pytest.mark.parametrize("extra,what", [
    (["--ctx", "512"], "shorter than one window of ctx=512"),
    (["--ctx", "100000"], "larger than the model's context"),
    (["--ctx", "64", "--stride", "65"], "stride"),
    (["--ctx", "64", "--stride", "0"], "positive integer"),
    (["--ctx", "64", "--batch", "0"], "positive integer"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, extra, what):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    try:
        code = main(["perplexity", str(f), *extra])
    except SystemExit as e:  # argparse's bad arguments exit through _Parser.error
        code = e.code
    out, err = capsys.readouterr()
    assert code == 1 and err.startswith("scratchlm: error: ") and err.count("\n") == 1 and what in err, err


def test_cli_missing_file_is_one_line(capsys):
    code = main(["perplexity", "/no/such/file.txt"])
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("scratchlm: error: ") and err.count("\n") == 1
    assert "/no/such/file.txt: no such file" in err, err


def test_cli_binary_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "model.gguf"  # a model given where the text goes
    f.write_bytes(b"GGUF\x03\x00\x00\x00\xff\xfe" + bytes(range(256)))
    code = main(["perplexity", str(f)])
    _, err = capsys.readouterr()
    assert code == 1 and err.count("\n") == 1 and "not UTF-8 text" in err, err
