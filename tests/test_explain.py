"""`scratchlm explain`: the recorded forward is the model's forward (exact logits, shapes per config,
intermediates equal to transformers' hidden states and attention maps), the recorder costs nothing when
off, both languages are complete, the HTML report parses and its images decode, bad input is one line."""

import base64
import html
import html.parser
import io
import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm import ops
from scratchlm.cli import main
from scratchlm.explain import MESSAGES, build, explain, record_forward, render_text
from scratchlm.explain.report import render_markdown
from scratchlm.model import RECORDED
from scratchlm.tokenizer import GPT2_PATTERN, PreTokenizer, Tokenizer
from tests.tiny_models import hf_reference, make_hf_gpt2, make_hf_llama

PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
EXPLAIN_DIR = Path(scratchlm.__file__).parent / "explain"


def byte_tokenizer() -> Tokenizer:
    """256 single-byte tokens: enough to feed text to a tiny random model."""
    return Tokenizer(tokens=[bytes([i]) for i in range(256)], special_tokens={},
                     pre_tokenizer=PreTokenizer([GPT2_PATTERN], name="gpt2"), name="bytes")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (our model with a byte tokenizer, the transformers reference)."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for name, path in (("llama", make_hf_llama(root / "llama", n_layers=3)),  # GQA: 4 heads, 2 kv heads
                       ("gpt2", make_hf_gpt2(root / "gpt2", n_layers=3))):
        model = scratchlm.load(path, progress=False)
        model.tokenizer = byte_tokenizer()
        out[name] = (model, hf_reference(path))
    return out


@pytest.fixture(scope="module")
def default_model():
    return scratchlm.load(progress=False)


def expected_shapes(cfg, T):
    """The shape of every recorded array for one sequence of T tokens, written from the config letters."""
    B, D, H, K, Hd, F, V = 1, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size
    S = T
    want = {"tokens": (B, T), "embedding": (B, T, D), "mask": (T, S), "norm": (B, T, D), "logits": (B, T, V)}
    if cfg.arch == "gpt2":
        want.update({"pos_embedding": (T, D), "embedding+pos": (B, T, D)})
    else:
        want.update({"rope.inv_freq": (Hd // 2,), "rope.cos": (T, Hd // 2), "rope.sin": (T, Hd // 2)})
    for i in range(cfg.n_layers):
        layer = {"attention_norm": (B, T, D), "q": (B, T, H, Hd), "k": (B, T, K, Hd), "v": (B, T, K, Hd),
                 "scores": (B, H, T, S), "probs": (B, H, T, S), "heads": (B, H, T, Hd), "attention_output": (B, T, D),
                 "residual_attention": (B, T, D), "ffn_norm": (B, T, D), "ffn_up": (B, T, F), "ffn_act": (B, T, F),
                 "ffn_down": (B, T, D), "residual_ffn": (B, T, D)}
        if cfg.arch == "llama":
            layer.update({"q_rope": (B, T, H, Hd), "k_rope": (B, T, K, Hd), "ffn_gate": (B, T, F), "ffn_sigmoid": (B, T, F)})
        else:
            layer["ffn_phi"] = (B, T, F)
        want.update({f"layers.{i}.{k}": v for k, v in layer.items()})
    return want


# --- the recording is the forward ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recorded_logits_equal_model_logits_and_shapes_match_config(tiny, arch):
    model, _ = tiny[arch]
    ids = list(np.random.default_rng(0).integers(0, 256, size=11))
    rec, logits = record_forward(model, ids, keep_all=True)
    assert np.array_equal(rec["logits"][0], model.logits(ids))  # bit for bit: recording changes nothing
    assert np.array_equal(logits, rec["logits"])
    want = expected_shapes(model.config, len(ids))
    assert set(rec.arrays) == set(want)
    assert {n: rec[n].shape for n in want} == want
    # every name the forward reports is a documented one
    documented = set(RECORDED["start"]) | set(RECORDED["end"])
    assert all(n in documented or n.split(".", 2)[2] in RECORDED["layer"] for n in rec.names)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_recorded_intermediates_match_transformers(tiny, arch):
    model, ref = tiny[arch]
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 256, size=9)]
    rec, _ = record_forward(model, ids, keep_all=True)
    with torch.no_grad():
        o = ref(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    hs = [h[0].numpy() for h in o.hidden_states]  # L+1 of [T,D]: the input, each layer's output (last one normed)
    L = model.config.n_layers
    first = rec["embedding+pos"] if arch == "gpt2" else rec["embedding"]
    np.testing.assert_allclose(first[0], hs[0], rtol=1e-5, atol=1e-5)
    for i in range(L - 1):
        np.testing.assert_allclose(rec.at(i, "residual_ffn")[0], hs[i + 1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rec["norm"][0], hs[L], rtol=1e-4, atol=1e-4)
    for i in range(L):
        np.testing.assert_allclose(rec.at(i, "probs"), o.attentions[i].numpy(), rtol=1e-4, atol=1e-5)


def test_recorder_off_adds_no_work(tiny, monkeypatch):
    model, _ = tiny["llama"]
    ids = np.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    seen = []
    real = ops.attention

    def spy(q, k, v, mask=None, record=None, record_scores=True):
        seen.append(record)
        return real(q, k, v, mask, record=record, record_scores=record_scores)

    monkeypatch.setattr(ops, "attention", spy)
    calls = []
    plain = model.forward(ids)
    assert seen and all(r is None for r in seen)  # no recording hook reaches the attention when off
    seen.clear()
    recorded = model.forward(ids, recorder=lambda name, a: calls.append(name))
    assert calls and all(r is not None for r in seen)
    assert np.array_equal(plain, recorded)


def test_logit_lens_agrees_with_transformers(tiny):
    model, ref = tiny["llama"]
    w = build(model, "hello there", layer=1, head=3, top=5)
    with torch.no_grad():
        o = ref(torch.tensor([w.ids]), output_hidden_states=True)
        L = model.config.n_layers
        # the reference lens: transformers' own final norm and head on each layer's output
        lens = [ref.lm_head(ref.model.norm(o.hidden_states[i + 1]))[0].argmax(-1).numpy() for i in range(L - 1)]
        hf_logits = o.logits[0, -1].double()
    assert all(np.array_equal(w.lens_ids[i], lens[i]) for i in range(L - 1))
    assert np.array_equal(w.lens_ids[L - 1], w.logits[0].argmax(-1))  # the last layer's lens is the output
    p = torch.softmax(hf_logits, -1).numpy()
    assert [i for i, _, _ in w.top_tokens] == list(np.argsort(-p)[:5])
    assert np.allclose([pr for _, _, pr in w.top_tokens], np.sort(p)[::-1][:5], atol=1e-5)


# --- the walkthrough -----------------------------------------------------------------------------

def test_walkthrough_steps_show_real_shapes(tiny):
    llama, _ = tiny["llama"]
    w = build(llama, "hi there", layer=2, head=3, top=3)
    keys = [s.key for s in w.steps]
    assert keys[:3] == ["model", "tokens", "embedding"] and keys[-1] == "top"
    assert {"rope", "mask", "scores", "softmax", "weighted", "wo", "ffn", "layers", "output"} <= set(keys)
    text = render_text(w)
    T = len(w.ids)
    assert f"q [B=1, T={T}, H=4, Hd=16]" in text and f"k [B=1, T={T}, K=2, Hd=16]" in text
    assert "G = H/K = 2" in text and "Query head 3 reads key/value head 1" in text
    assert f"[B=1, H=4, T={T}, S={T}]" in text and "SwiGLU" in text
    gpt2, _ = tiny["gpt2"]
    g = build(gpt2, "hi there", layer=0, head=0)
    gkeys = [s.key for s in g.steps]
    assert "positions" in gkeys and "rope" not in gkeys
    gtext = render_text(g)
    assert "LayerNorm" in gtext and "GELU" in gtext and "gelu(y·W1ᵀ + b1)" in gtext


def test_messages_have_both_languages_with_the_same_placeholders():
    fields = lambda s: {f for _, f, _, _ in string.Formatter().parse(s) if f}  # noqa: E731
    for key, m in MESSAGES.items():
        assert set(m) == {"en", "zh"}, key
        assert m["en"].strip() and m["zh"].strip(), key
        assert fields(m["en"]) == fields(m["zh"]), key
    cjk = [k for k, m in MESSAGES.items() if re.search(r"[\u4e00-\u9fff]", m["zh"])]
    assert len(cjk) >= len(MESSAGES) - 6  # only a few pure symbols/names (e.g. "id", "logit") stay as they are
    # every key the code asks for exists, and every message is used
    src = "\n".join(p.read_text(encoding="utf-8") for p in EXPLAIN_DIR.glob("*.py") if p.name != "messages.py")
    used = set(re.findall(r"""\b(?:t|msg)\(\s*["']([a-z0-9_]+)["']""", src))
    used |= set(re.findall(r"""["']((?:col|cfg|arch|kv|tied|untied|sec|cap)_[a-z0-9_]+)["']""", src))
    assert used - set(MESSAGES) == set()
    assert set(MESSAGES) - used == set()


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.links, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if a.get("href") or (tag in ("script", "link", "iframe")):
            self.links.append((tag, a))


def check_report(path: Path, n_images: int) -> str:
    from matplotlib.image import imread

    page = path.read_text(encoding="utf-8")
    p = _Page()
    p.feed(page)
    p.close()
    assert p.links == []  # nothing fetched from elsewhere: opens offline
    assert len(p.imgs) == n_images
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(io.BytesIO(png), format="png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return page


@pytest.mark.parametrize("arch, lang", [("llama", "en"), ("llama", "zh"), ("gpt2", "zh")])
def test_full_run_and_report(tiny, tmp_path, arch, lang):
    model, _ = tiny[arch]
    buf = io.StringIO()
    w = explain(model, "The cat sat on the mat.", layer=1, head=2, top=4, lang=lang, out=tmp_path / "r",
                kv_tokens=2, file=buf)
    text = buf.getvalue()
    for s in w.steps:
        assert s.title in text
    has_cjk = bool(re.search(r"[\u4e00-\u9fff]", text))
    assert has_cjk == (lang == "zh")
    page = check_report(tmp_path / "r" / "report.html", n_images=4)
    assert f'<html lang="{lang}">' in page
    assert all(html.escape(s.title) in page for s in w.steps)
    md = render_markdown(w, {"attention": "images/a.png"}, None)
    assert md.count("\n## ") == len(w.steps) + 1 and "![" in md


# --- the default model -----------------------------------------------------------------------------

@pytest.fixture
def fast_cli(default_model, monkeypatch):
    """The CLI on the already loaded default model, timing one KV-cache step instead of eight
    (the timing is shown, never asserted: this machine is shared)."""
    from scratchlm import cli
    from scratchlm.explain import report

    real = report.time_kv_cache
    monkeypatch.setattr(cli, "_load", lambda a: default_model if a.model is None else scratchlm.load(a.model))
    monkeypatch.setattr(report, "time_kv_cache", lambda model, ids, n_new=8, reps=2: real(model, ids, 1, 1))


def test_default_model_walkthrough(default_model, fast_cli, tmp_path, capsys):
    m = default_model
    rec, logits = record_forward(m, m.tokenizer.encode("Hello world, hello"), keep_all=True)
    T = rec["tokens"].shape[1]
    want = expected_shapes(m.config, T)
    assert {n: rec[n].shape for n in rec.arrays} == want
    assert np.array_equal(rec["logits"][0], m.logits(rec["tokens"][0]))

    code = main(["explain", PROMPT, "--layer", "2", "--head", "4", "--top", "5", "--lang", "zh",
                 "--out", str(tmp_path / "rep")])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "q [B=1, T=16, H=9, Hd=64]" in out and "k [B=1, T=16, K=3, Hd=64]" in out
    assert "0, 1, 2" in out and "G = H/K = 3" in out and "[B=1, T=16, F=1536]" in out
    assert "[D=576, V=49152]" in out and "全部 30 层汇总" in out
    check_report(tmp_path / "rep" / "report.html", n_images=4)


@pytest.mark.parametrize("args, needle", [
    (["explain", "hi", "--layer", "30"], "--layer 30 does not exist"),
    (["explain", "hi", "--head", "9"], "--head 9 does not exist"),
    (["explain", "hi", "--layer", "-1"], "--layer -1 does not exist"),
    (["explain", ""], "empty prompt"),
    (["explain", PROMPT, "--max-tokens", "10"], "more than --max-tokens 10"),
])
def test_bad_input_is_one_line(args, needle, fast_cli, capsys):
    code = main(args)
    _, err = capsys.readouterr()
    assert code == 1 and err.startswith("scratchlm: error: ") and err.count("\n") == 1 and needle in err


def test_unwritable_out_dir_is_one_line(tmp_path, fast_cli, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    for out in (f, f / "sub"):  # works even as root, where permission bits are not enforced
        code = main(["explain", "hi", "--out", str(out)])
        _, err = capsys.readouterr()
        assert code == 1 and err.startswith("scratchlm: error: cannot write the report") and err.count("\n") == 1
