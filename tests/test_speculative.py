"""Speculative decoding (scratchlm/speculative.py): greedy output identical to plain decoding on the default
model, with a draft model and with prompt lookup; sampled output keeps the target's distribution (a
chi-square test on a tiny random model, which a deliberately wrong rule fails); bad input."""

import copy
import itertools
import math
from collections import Counter

import numpy as np
import pytest

import scratchlm
from scratchlm import cli
from scratchlm import speculative as S
from scratchlm.config import ModelConfig, expected_shapes
from scratchlm.errors import DraftModelError
from scratchlm.model import Model
from scratchlm.sampling import Sampler, SamplingParams

PARAGRAPH = ("Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
             "in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in "
             "a great civil war, testing whether that nation, or any nation so conceived and so dedicated, can "
             "long endure.")


@pytest.fixture(scope="module")
def model():
    return scratchlm.load(progress=False)


@pytest.fixture(scope="module")
def draft_path(tmp_path_factory, default_model_path):
    """The default model requantized to Q4_0: the same vocabulary, close but imperfect agreement."""
    from scratchlm.formats.export import quantize_model
    return quantize_model(default_model_path, tmp_path_factory.mktemp("draft") / "q4_0.gguf", "Q4_0", progress=False)[0]


@pytest.fixture(scope="module")
def draft(draft_path):
    return scratchlm.load(draft_path, progress=False)


# (how the prompt is run, the prompt, options): a chat answer that ends on <|im_end|>, a summary, a
# repetitive continuation (lookup accepts a lot), byte tokens of Chinese text, a repetition penalty
CASES = {
    "chat_eos": ("chat", "Say hello.", dict(max_tokens=200)),
    "summary": ("chat", "Summarise this text:\n\n" + PARAGRAPH, dict(max_tokens=40)),
    "days": ("generate", "The days of the week are Monday, Tuesday,", dict(max_tokens=30, ignore_eos=True)),
    "chinese": ("generate", "用中文写一首关于月亮的诗：", dict(max_tokens=20, ignore_eos=True)),
    "penalty": ("generate", "The days of the week are Monday, Tuesday,",
                dict(max_tokens=24, ignore_eos=True, repetition_penalty=1.3)),
}


def _run(model, case, **kw):
    how, prompt, opts = CASES[case]
    opts = dict(opts, temperature=0, stream=True, **kw)
    s = model.chat([{"role": "user", "content": prompt}], **opts) if how == "chat" else model.generate(prompt, **opts)
    text = "".join(s)
    return text, list(s.token_ids), s.finish_reason, s.speculative


@pytest.fixture(scope="module")
def plain(model):
    return {case: _run(model, case) for case in CASES}


SPEC = {"draft4": {"draft_tokens": 4}, "lookup2_k7": {"lookup": 2, "draft_tokens": 7}}


@pytest.mark.parametrize("spec", list(SPEC))
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_is_identical_to_plain_decoding(model, draft, plain, case, spec):
    kw = dict(SPEC[spec], draft=draft) if spec.startswith("draft") else SPEC[spec]
    text, ids, reason, stats = _run(model, case, **kw)
    assert (text, ids, reason) == plain[case][:3]
    assert stats["accepted"] <= stats["drafted"]
    if case == "chat_eos":
        assert reason == "eos"


def test_draft_is_both_accepted_and_rejected(model, draft):
    """The Q4_0 draft agrees often but not always: both branches (and the caches' rollback) are exercised."""
    _, _, _, stats = _run(model, "summary", draft=draft)
    assert 0 < stats["accepted"] < stats["drafted"]
    _, _, _, stats = _run(model, "days", lookup=2)
    assert stats["accepted"] > 0.5 * stats["drafted"] > 0


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_max_tokens_limit(model, draft, plain, n):
    """Rounds that could overshoot -n stop exactly at n, with plain decoding's first n tokens."""
    for kw in ({"lookup": 2, "draft_tokens": 7}, {"draft": draft, "draft_tokens": 5}):
        _, ids, reason, _ = _run(model, "days", max_tokens=n, **kw)
        assert ids == plain["days"][1][:n] and reason == "length"


def test_stop_string(model, draft, plain):
    full = plain["days"][0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    for kw in ({"lookup": 2}, {"draft": draft}):
        text, _, reason, _ = _run(model, "days", stop=[stop], **kw)
        assert text == full[:full.index(stop)] and reason == "stop"


def test_end_of_the_context_window(model, draft):
    """The default model with its context cut to 40 tokens: speculative rounds never write past it."""
    small = copy.copy(model)
    small.config = ModelConfig.from_dict(dict(model.config.to_dict(), max_seq_len=40))
    prompt = "one two three four five six seven eight nine ten"
    n = len(small.tokenizer.encode(prompt))
    ref = small.generate(prompt, max_tokens=100, temperature=0, ignore_eos=True, stream=True)
    "".join(ref)
    assert ref.finish_reason == "context" and n + len(ref.token_ids) == 40
    for kw in ({"lookup": 1, "draft_tokens": 7}, {"draft": draft, "draft_tokens": 7}):
        s = small.generate(prompt, max_tokens=100, temperature=0, ignore_eos=True, stream=True, **kw)
        "".join(s)
        assert s.token_ids == ref.token_ids and s.finish_reason == "context"


def test_sampling_with_a_draft_is_seeded(model, draft):
    a = model.generate("Once upon a time", max_tokens=16, temperature=0.8, seed=5, ignore_eos=True, draft=draft)
    assert a == model.generate("Once upon a time", max_tokens=16, temperature=0.8, seed=5, ignore_eos=True,
                               draft=draft)


# --- the distribution of sampled output ------------------------------------------------------------------

def _tiny(seed: int, V: int = 8) -> Model:
    """A random one-layer Llama over V tokens (float32 weights)."""
    cfg = ModelConfig(arch="llama", dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=V, ffn_dim=32,
                      max_seq_len=64, norm_eps=1e-5, tie_embeddings=True)
    rng = np.random.default_rng(seed)
    W = {n: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.6 * rng.standard_normal(s)).astype(np.float32)
         for n, s in expected_shapes(cfg).items()}
    return Model(cfg, W)


TARGET, DRAFT = _tiny(1), _tiny(2)
# every filter on, and a repetition penalty, so p depends on the history the rule must keep right
PARAMS = SamplingParams(temperature=1.2, top_k=5, top_p=0.97, min_p=0.02, repetition_penalty=1.3)
PROMPT = [3, 1, 4, 1, 5]


def _exact_joint() -> dict:
    """P(first three tokens) of plain sampling with PARAMS: the product of the target's filtered distributions."""
    ref = Sampler(PARAMS)

    def probs_after(seq):
        return ref.probs(TARGET.logits(seq)[-1], seq, seq[len(PROMPT):])

    joint, p1 = {}, probs_after(PROMPT)
    for a in np.flatnonzero(p1):
        p2 = probs_after(PROMPT + [int(a)])
        for b in np.flatnonzero(p2):
            p3 = probs_after(PROMPT + [int(a), int(b)])
            for c in np.flatnonzero(p3):
                joint[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]
    return joint


def _draws(make_drafter, N: int, seed: int, stats: dict) -> Counter:
    """First three tokens of N speculative generations (3 drafts per round: they span a whole round)."""
    sampler = Sampler(PARAMS, seed=seed)
    counts = Counter()
    for _ in range(N):
        st: dict = {}
        g = S.speculative_tokens(TARGET, PROMPT, TARGET.new_cache(20), sampler, make_drafter(), 3, 10, st)
        counts[tuple(itertools.islice(g, 3))] += 1
        for k, v in st.items():
            stats[k] = stats.get(k, 0) + v
    return counts


def _chi_square(counts: Counter, joint: dict, N: int):
    """Pearson's statistic over the cells expecting >= 5 draws (the rest pooled in one cell), and the 1 - 1e-4
    quantile of chi-square with its degrees of freedom (Wilson-Hilferty's approximation, within 1% here).
    A correct sampler exceeds it with probability 1e-4; the seed is fixed, so the test is deterministic."""
    assert set(counts) <= set(joint)  # never a sequence plain sampling cannot produce
    stat, cells, pool_e, pool_o = 0.0, 0, 0.0, 0
    for key, p in joint.items():
        e = N * p
        if e >= 5:
            stat += (counts[key] - e) ** 2 / e
            cells += 1
        else:
            pool_e, pool_o = pool_e + e, pool_o + counts[key]
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / pool_e
        cells += 1
    df = cells - 1
    z = 3.719  # standard normal quantile of 1 - 1e-4
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _wrong_judge(p, q, d, sampler):
    """A plausible bug: accept as the rule does, but on rejection draw from p instead of the residual."""
    if sampler.rng.random() * (1.0 if q is None else float(q[d])) < p[d]:
        return None
    return sampler.draw(p)


DRAFTERS = {"draft_model": lambda: S.ModelDrafter(DRAFT, 20), "lookup": lambda: S.LookupDrafter(1)}


@pytest.mark.parametrize("drafter", list(DRAFTERS))
def test_sampling_keeps_the_target_distribution(drafter, monkeypatch):
    joint = _exact_joint()
    N = 1500
    stats: dict = {}
    stat, bound = _chi_square(_draws(DRAFTERS[drafter], N, 0, stats), joint, N)
    assert stat < bound
    assert 0 < stats["accepted"] < stats["drafted"]  # both branches of the rule ran
    # the test can fail: the wrong rule's output is far outside the bound with half the draws
    monkeypatch.setattr(S, "judge", _wrong_judge)
    stat_wrong, bound_wrong = _chi_square(_draws(DRAFTERS[drafter], N // 2, 1, {}), joint, N // 2)
    assert stat_wrong > bound_wrong


def test_judge_residual_for_a_deterministic_draft():
    """A lookup draft d is accepted with probability p(d); a rejection never answers d."""
    p = np.array([0.5, 0.3, 0.2])
    sampler = Sampler(SamplingParams(), seed=0)
    out = [S.judge(p, None, 1, sampler) for _ in range(4000)]
    accepted = sum(o is None for o in out) / len(out)
    assert abs(accepted - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)
    assert 1 not in out


# --- bad input ------------------------------------------------------------------------------------

def test_draft_with_another_vocabulary(model):
    with pytest.raises(DraftModelError, match="vocabulary"):
        model.generate("hi", max_tokens=2, draft=_tiny(3))


@pytest.mark.parametrize("kw,match", [({"lookup": 2, "draft_tokens": 0}, "draft_tokens"),
                                      ({"lookup": 2, "draft_tokens": 8}, "draft_tokens"),
                                      ({"draft_tokens": 3}, "needs a draft"),
                                      ({"lookup": 0}, "lookup"),
                                      ({"lookup": 2, "draft": "x"}, "not both")])
def test_bad_options(model, kw, match):
    with pytest.raises(ValueError, match=match):
        model.generate("hi", max_tokens=2, **kw)


def test_cli_draft_with_another_vocabulary(tmp_path, capsys):
    from tests.tiny_models import make_hf_llama
    path = make_hf_llama(tmp_path / "tiny")  # 256 tokens, not SmolLM2's 49152
    capsys.readouterr()  # transformers' own progress lines
    assert cli.main(["generate", "--draft", str(path), "hi", "-n", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("scratchlm: error:") and "vocabulary" in err and "\n" not in err


def _exit_code(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as e:  # argparse's errors (one line too: cli._Parser)
        return e.code


@pytest.mark.parametrize("argv", [["generate", "--draft-tokens", "3", "hi"],
                                  ["generate", "--lookup", "2", "--draft-tokens", "9", "hi"],
                                  ["generate", "--lookup", "2", "--draft", "x.gguf", "hi"],
                                  ["chat", "--lookup", "0"]])
def test_cli_bad_speculative_flags(argv, capsys):
    assert _exit_code(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("scratchlm: error:") and "\n" not in err


def test_cli_bench_reports_speculative_figures(capsys):
    import json
    assert cli.main(["bench", "--lookup", "2", "--prompt-tokens", "48", "--gen-tokens", "12", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["identical"] is True and 0 <= r["acceptance"] <= 1 and r["speedup"] > 0
