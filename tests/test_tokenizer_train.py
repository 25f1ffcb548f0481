"""Tokenizer training: our BPE trainer against a naive reference written here, Hugging Face tokenizers on
the saved tokenizer.json, tiktoken on a saved Llama 3 vocabulary, and the character tokenizer."""

from __future__ import annotations

import json
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

import scratchlm
from scratchlm.errors import FormatError, TokenizerError
from scratchlm.tokenizer import GPT2_PATTERN, LLAMA3_PATTERN, Tokenizer
from scratchlm.tokenizer.bpe import merges_from_ranks
from scratchlm.tokenizer.char import CharTokenizer
from scratchlm.tokenizer.train import train_bpe, train_char_tokenizer

hf_tokenizers = pytest.importorskip("tokenizers")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
CODE = "".join((STDLIB / n).read_text(encoding="utf-8") for n in ("textwrap.py", "bisect.py", "heapq.py"))
HELD_OUT = (STDLIB / "fnmatch.py").read_text(encoding="utf-8")
PROSE = ("The quick brown fox jumps over the lazy dog. Ça coûte 12,50 € — naïve café, 東京タワー, "
         "emoji 😀🎉 and tabs\tand\r\nnewlines!  Don't stop; it's 2024-06-01.\n\n") * 3


# ---- a naive reference trainer: recount every pair after every merge ----------------------------


def reference_bpe(text: str, n_tokens: int, pattern: str, specials=()) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Straightforward BPE training (minbpe-style, on pieces with counts), with the documented rules:
    highest count wins, ties go to the smallest (left id, right id); a merge whose bytes are already a
    token reuses that id; stop at n_tokens ordinary tokens or when no pair is left."""
    if specials:
        text = "".join(regex.split("|".join(regex.escape(s) for s in specials), text))  # drop them
    pieces = Counter(regex.findall(pattern, text))
    words = {tuple(p.encode("utf-8")): n for p, n in pieces.items()}
    tokens = [bytes([i]) for i in range(256)]
    merges = []
    while len(tokens) < n_tokens:
        stats: Counter = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                stats[pair] += n
        if not stats:
            break
        best = max(stats.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
        new_bytes = tokens[best[0]] + tokens[best[1]]
        if new_bytes in tokens:
            new = tokens.index(new_bytes)
        else:
            new = len(tokens)
            tokens.append(new_bytes)
        merges.append(best)
        merged: Counter = Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return tokens, merges


def learned(tok: Tokenizer) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    ordinary = [b for b in tok.ordinary_tokens() if b is not None]
    return ordinary, tok.merge_list()


@pytest.mark.parametrize("text,vocab,pattern", [
    (CODE[:20000], 400, LLAMA3_PATTERN),
    (CODE[:20000], 400, GPT2_PATTERN),
    (PROSE, 330, LLAMA3_PATTERN),
    ("aaaaaaaaaa aaaa aaa aa a abababab ababa " * 5, 270, LLAMA3_PATTERN),  # overlapping pairs, repeated bytes
])
def test_merges_equal_naive_reference(text, vocab, pattern):
    tok = train_bpe(text, vocab, special_tokens=["<|endoftext|>"], pattern=pattern)
    ref_tokens, ref_merges = reference_bpe(text, vocab - 1, pattern)
    tokens, merges = learned(tok)
    assert tokens == ref_tokens
    assert merges == [(ref_tokens[a], ref_tokens[b]) for a, b in ref_merges]


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="ab c\néé1", min_size=1, max_size=80), st.integers(257, 300))
def test_merges_equal_reference_random_text(text, vocab):
    """Small alphabets force ties, overlaps ("aaa"), repeated merge results and early exhaustion."""
    tok = train_bpe(text, vocab, special_tokens=["<|endoftext|>"])
    ref_tokens, ref_merges = reference_bpe(text, vocab - 1, LLAMA3_PATTERN)
    assert learned(tok) == (ref_tokens, [(ref_tokens[a], ref_tokens[b]) for a, b in ref_merges])
    assert tok.decode(tok.encode(text)) == text


def test_repeated_merge_result_reuses_the_token():
    # (ab, c) and (a, bc) both spell "abc": the vocabulary holds it once, both merges are recorded.
    text = "abc " * 3 + "xbc " * 5 + "ab" * 1
    tok = train_bpe(text, 300, special_tokens=[])
    tokens, merges = learned(tok)
    assert len(tokens) == len(set(tokens))
    ref_tokens, ref_merges = reference_bpe(text, 300, LLAMA3_PATTERN)
    assert merges == [(ref_tokens[a], ref_tokens[b]) for a, b in ref_merges]


# ---- the trained tokenizer in use -----------------------------------------------------------------


@pytest.fixture(scope="module")
def code_tok():
    return train_bpe(CODE, 600)


@pytest.mark.parametrize("text", [HELD_OUT, PROSE, "", " ", "\n\n\n", "x" * 3000, "ÿ\x00\x7f\u2028 \U0010ffff"])
def test_round_trip(code_tok, text):
    assert code_tok.decode(code_tok.encode(text)) == text


def test_vocab_layout_and_specials(code_tok):
    assert code_tok.vocab_size == 600
    assert [code_tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
    assert code_tok.special_tokens == {"<|endoftext|>": 599}
    assert code_tok.eos_ids == [599] and code_tok.eos_token == "<|endoftext|>"
    assert code_tok.bos_id is None and not code_tok.add_bos
    # special text is plain text unless allowed; allowed, it is one id
    assert 599 not in code_tok.encode("a<|endoftext|>b")
    assert code_tok.encode("a<|endoftext|>b", allowed_special="all") == [*code_tok.encode("a"), 599, *code_tok.encode("b")]
    assert code_tok.decode([599]) == "<|endoftext|>"


def test_special_tokens_never_merge():
    text = "<|endoftext|>".join(["def f(x):\n    return x + 1\n"] * 50)
    tok = train_bpe(text, 320, special_tokens=["<|endoftext|>", "<|pad|>"])
    tokens, _ = learned(tok)
    assert not any(b"<|" in t or b"|>" in t or b"endoftext" in t for t in tokens)
    n = len(tokens)  # this small corpus runs out of pairs before 318 tokens: specials follow the last one
    assert n < 318 and tok.special_tokens == {"<|endoftext|>": n, "<|pad|>": n + 1} and tok.vocab_size == n + 2
    # the reference sees the text with the specials removed: the same merges
    ref_tokens, _ = reference_bpe(text, 318, LLAMA3_PATTERN, specials=["<|endoftext|>"])
    assert tokens == ref_tokens


@pytest.mark.parametrize("pattern", [LLAMA3_PATTERN, GPT2_PATTERN])
def test_saved_tokenizer_json_matches_hf_tokenizers(tmp_path, pattern):
    tok = train_bpe(CODE, 700, pattern=pattern)
    tok.save(tmp_path / "tokenizer.json")
    hf = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in (HELD_OUT, PROSE, "  x\n\n  y  ", "1234567 ''s 's"):
        assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
        assert hf.decode(tok.encode(text)) == text
    # HF always matches added tokens in text; ours does when they are allowed
    text = "x = 1<|endoftext|>y = 2"
    assert hf.encode(text).ids == tok.encode(text, allowed_special="all")
    # and scratchlm.load_tokenizer reads it back to the same tokenizer
    back = scratchlm.load_tokenizer(tmp_path / "tokenizer.json")
    assert back.encode(HELD_OUT) == tok.encode(HELD_OUT)
    assert (back.vocab_size, back.special_tokens, back.eos_ids, back.name) == \
        (tok.vocab_size, tok.special_tokens, tok.eos_ids, tok.name)


def test_bad_arguments():
    with pytest.raises(TokenizerError, match="vocab_size"):
        train_bpe("abc", 256)  # no room for the special token
    with pytest.raises(TokenizerError, match="empty"):
        train_bpe("", 300)
    with pytest.raises(TokenizerError):
        train_bpe(b"bytes", 300)
    with pytest.raises(TokenizerError, match="empty"):
        train_char_tokenizer("")


def test_small_corpus_stops_early():
    tok = train_bpe("ab ab", 1000, special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == 256 + 2 + 1  # "ab", " ab", then no pair is left


# ---- saving other tokenizers --------------------------------------------------------------------


def test_merges_from_ranks_doc_example():
    assert merges_from_ranks({b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4}) == [(b"a", b"b"), (b"ab", b"c")]


def test_llama3_tiktoken_vocabulary_saves_as_tokenizer_json(tmp_path, llama3_tokenizer_path):
    """A tiktoken-ranked vocabulary is saved with derived merges; tiktoken itself is the reference."""
    tiktoken = pytest.importorskip("tiktoken")
    from scratchlm.tokenizer import read_tiktoken_ranks

    tok = scratchlm.load_tokenizer(llama3_tokenizer_path)
    tok.save(tmp_path / "tokenizer.json")
    back = scratchlm.load_tokenizer(tmp_path / "tokenizer.json")
    ref = tiktoken.Encoding("llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=read_tiktoken_ranks(llama3_tokenizer_path),
                            special_tokens={})
    hf = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in (HELD_OUT, PROSE):
        want = ref.encode_ordinary(text)
        assert back.encode(text) == want
        assert hf.encode(text, add_special_tokens=False).ids == want
    assert back.bos_id == tok.bos_id and back.add_bos and back.special_tokens == tok.special_tokens
    assert hf.encode("hi").ids[0] == tok.bos_id  # BOS through the post-processor


# ---- the character tokenizer --------------------------------------------------------------------


def test_char_tokenizer_ids_and_round_trip():
    text = "hello, wörld → ok 😀\n"
    tok = train_char_tokenizer(text)
    chars = sorted(set(text))
    assert isinstance(tok, Tokenizer) and tok.name == "char"
    assert tok.encode(text) == [chars.index(c) for c in text]
    assert tok.decode(tok.encode(text)) == text
    assert [tok.id_to_piece(i) for i in range(len(chars))] == chars
    assert tok.token_bytes(chars.index("→")) == "→".encode()
    # then the helper byte tokens of ö, → and 😀, then the special token (EOS)
    n_helpers = tok.vocab_size - len(chars) - 1
    assert n_helpers == len({b[:j] for b in ("ö".encode(), "→".encode(), "😀".encode()) for j in range(1, len(b))}
                            | {b[j:j + 1] for b in ("ö".encode(), "→".encode(), "😀".encode()) for j in range(1, len(b))})
    assert tok.special_tokens == {"<|endoftext|>": tok.vocab_size - 1} and tok.eos_ids == [tok.vocab_size - 1]
    assert tok.encode("ok<|endoftext|>", allowed_special="all") == [*tok.encode("ok"), tok.vocab_size - 1]
    with pytest.raises(TokenizerError, match="'Z' is not in the vocabulary"):
        tok.encode("Zebra")


def test_char_tokenizer_ascii_has_exactly_chars_and_specials():
    tok = train_char_tokenizer("abcabc\n", special_tokens=())
    assert tok.vocab_size == 4 and tok.special_tokens == {} and tok.eos_ids == []
    assert tok.encode("cab\n") == [3, 1, 2, 0]  # sorted by code point: "\n" a b c


def test_char_tokenizer_save_load(tmp_path):
    text = "def f(x):\n    return 'é' * x  # ünïcode\n"
    tok = train_char_tokenizer(text)
    tok.save(tmp_path / "tokenizer.json")
    d = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert d["type"] == "scratchlm-char-tokenizer" and d["chars"] == sorted(set(text))
    back = scratchlm.load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(back, CharTokenizer)
    assert back.encode(text) == tok.encode(text) and back.vocab_size == tok.vocab_size
    assert back.special_tokens == tok.special_tokens and back.eos_ids == tok.eos_ids
    d["chars"] = ["ab"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(FormatError, match="single characters"):
        scratchlm.load_tokenizer(tmp_path / "bad.json")


def test_char_tokenizer_bpe_form_matches_hf_tokenizers(tmp_path):
    """Its byte-level BPE form (what export writes) encodes like the dict lookup, in HF tokenizers too."""
    from scratchlm.tokenizer.readers import tokenizer_to_hf_json

    text = PROSE + CODE[:3000]
    tok = train_char_tokenizer(text)
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_to_hf_json(tok)), encoding="utf-8")
    hf = hf_tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(text, add_special_tokens=False).ids == tok.encode(text)
    generic = scratchlm.load_tokenizer(tmp_path / "tokenizer.json")  # our plain BPE path on the same file
    assert type(generic) is Tokenizer and generic.encode(text) == tok.encode(text)


def test_char_tokenizer_drives_a_model():
    """A model over a character vocabulary generates and decodes text (greedy, a random tiny model)."""
    from scratchlm.config import ModelConfig, expected_shapes
    from scratchlm.model import Model

    tok = train_char_tokenizer("the cat sat on the mat → é\n")
    cfg = ModelConfig(arch="llama", dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size,
                      ffn_dim=32, max_seq_len=32)
    rng = np.random.default_rng(0)
    w = {n: (rng.standard_normal(s) * 0.3).astype(np.float32) for n, s in expected_shapes(cfg).items()}
    out = Model(cfg, w, tok).generate("the c", max_tokens=8, temperature=0)
    assert isinstance(out, str) and len(out) > 0
