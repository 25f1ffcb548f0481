"""Build a `Tokenizer` from the files people have.

- a tiktoken file (Llama 3's `tokenizer.model`: one "base64-token rank" per line),
- a Hugging Face `tokenizer.json` (byte-level BPE) with `tokenizer_config.json` beside it,
- a GGUF file (the vocabulary, merges and special ids stored in its metadata),
- a directory holding one of those.

Everything read from a file is checked before use; a bad file raises a one-line `FormatError`,
a well-formed file of a kind we do not implement raises `UnsupportedError`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gc
import json
import numbers
import operator
import os
from itertools import accumulate, chain, repeat, starmap
from pathlib import Path
from typing import Any

from ..errors import FormatError, ModelNotFoundError, TokenizerError, UnsupportedError
from .bpe import Tokenizer
from .char import CHAR_FORMAT, char_tokenizer_from_dict
from .pretokenize import (
    DIGIT_PATTERN,
    GGUF_PRE_TOKENIZERS,
    GPT2_PATTERN,
    LLAMA3_PATTERN,
    PreTokenizer,
    bytes_to_unicode,
    gguf_pre_tokenizer,
    unicode_to_bytes,
)

@contextlib.contextmanager
def _gc_paused():
    """Reading a vocabulary allocates ~0.5 M objects that all stay alive, so the collector's passes over
    them find nothing: pausing it cut Llama 3's load from ~225 to ~185 ms and SmolLM2's from ~187 to ~154 ms."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Bounds on what we are willing to read: far above any real tokenizer, far below a memory blow-up.
_MAX_TEXT_FILE_BYTES = 256 * 1024 * 1024
_MAX_VOCAB = 4_000_000

# Token texts that end a turn or a document in the vocabularies we know; declared ids are added too.
END_TOKEN_TEXTS = (
    "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>", "<|endoftext|>", "<|im_end|>", "<|end|>",
    "<end_of_turn>", "<|eot|>", "<EOT>",
)

LLAMA3_NUM_SPECIAL = 256
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOS = "<|end_of_text|>"
LLAMA3_EOS_TEXTS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")


def llama3_special_tokens(first_id: int = 128000) -> dict[str, int]:
    """Llama 3's standard 256 special tokens (the Llama 3.1/3.2 names), numbered from `first_id`."""
    named = [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
    ]
    reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(LLAMA3_NUM_SPECIAL - len(named))]
    return {text: first_id + k for k, text in enumerate(named + reserved)}


# ---- entry point ---------------------------------------------------------------------------


@_gc_paused()
def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a tiktoken file, a tokenizer.json, a .gguf file, or a directory with one of them.

    In a directory the first found wins: tokenizer.json, then tokenizer.model, then a single *.gguf.
    """
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"tokenizer path does not exist: {p}")
    if p.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (p / name).is_file():
                return load_tokenizer(p / name)
        ggufs = sorted(x for x in p.glob("*.gguf") if x.is_file())
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        if len(ggufs) > 1:
            raise TokenizerError(f"{p}: several .gguf files, pass one of them: {', '.join(x.name for x in ggufs[:4])}")
        raise TokenizerError(f"{p}: no tokenizer.json, tokenizer.model or .gguf file in this directory")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return _tokenizer_from_gguf_file(p)
    if p.suffix == ".json" or head.lstrip()[:1] == b"{":
        return tokenizer_from_hf_json(p)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise UnsupportedError(f"{p}: looks like a PyTorch/pickle file, not a tokenizer")
    return tokenizer_from_tiktoken_file(p)


# ---- tiktoken files (Llama 3 tokenizer.model) ------------------------------------------------


# binascii's strict mode (Python 3.11+) is what base64.b64decode(validate=True) uses there.
try:
    _a2b_strict = functools.partial(binascii.a2b_base64, strict_mode=True)
    _a2b_strict(b"QQ==")
except TypeError:  # Python 3.10: the fast reader declines, the line-by-line one reads the file
    _a2b_strict = None


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """The "base64 rank" lines of a tiktoken file as bytes -> rank."""
    data = _read_bounded(path)
    if data[:1] == b"\n":  # protobuf field 1: a sentencepiece model (Llama 1/2, Mistral)
        raise UnsupportedError(f"{path}: looks like a sentencepiece model; only byte-level BPE (tiktoken) is supported")
    if b"\x00" in data[:4096]:
        raise FormatError(f"{path}: not a tiktoken BPE file (binary data)")
    ranks = _tiktoken_ranks_fast(data)
    if ranks is None:
        ranks = _tiktoken_ranks_by_line(data, path)  # finds the bad line and says which
    if not ranks:
        raise FormatError(f"{path}: empty tiktoken file")
    values = list(ranks.values())
    if values != list(range(len(values))) and sorted(values) != list(range(len(values))):  # in order: no sort
        raise FormatError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise FormatError(f"{path}: byte 0x{missing[0]:02x} has no token (a byte-level BPE needs all 256)")
    return ranks


def _tiktoken_ranks_fast(data: bytes) -> dict[bytes, int] | None:
    """The ranks of a file in the plain form ("base64 rank" lines, one space, "\\n"), or None for any other.

    C-level loops over all lines at once: ~90 ms for Llama 3's 128k lines where the line-by-line
    reader takes ~200 ms (a validating regex findall alone took ~85 ms, rebuilding the text ~45 ms).
    """
    if _a2b_strict is None or any(c in data for c in (b"\t", b"\r", b"\x0b", b"\x0c")):
        return None
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        del lines[-1]
    # Exactly one space in every line, and two words per line: each line is "token rank".
    if set(map(bytes.count, lines, repeat(b" "))) != {1}:
        return None
    words = data.split()
    if len(words) != 2 * len(lines):
        return None
    b64s, rank_words = words[0::2], words[1::2]
    if not b"".join(rank_words).isdigit():
        return None
    try:
        tokens = list(map(_a2b_strict, b64s))
    except binascii.Error:
        return None
    ranks = dict(zip(tokens, map(int, rank_words)))
    if len(ranks) != len(tokens) or not all(tokens) or max(ranks.values(), default=0) >= _MAX_VOCAB:
        return None  # a repeated or empty token, a rank out of range
    return ranks


def _tiktoken_ranks_by_line(data: bytes, path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise FormatError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
            rank = int(fields[1])
        except (binascii.Error, ValueError):
            raise FormatError(f"{path}:{lineno}: bad base64 token or rank in {line[:60]!r}") from None
        if not token or not 0 <= rank < _MAX_VOCAB:
            raise FormatError(f"{path}:{lineno}: empty token or rank {rank} out of range")
        if token in ranks:
            raise FormatError(f"{path}:{lineno}: token {token!r} listed twice")
        ranks[token] = rank
    return ranks


@_gc_paused()
def tokenizer_from_tiktoken_file(path: str | os.PathLike) -> Tokenizer:
    """Llama 3's tokenizer.model: tiktoken ranks + Llama 3's regex + its special tokens.

    Specials come from tokenizer_config.json beside the file when present, else Llama 3's standard list.
    """
    path = Path(path)
    ranks = read_tiktoken_ranks(path)
    n = len(ranks)
    tokens: list[bytes | None] = list(ranks)  # the file lists tokens by rank, as Llama 3's does
    if not all(map(operator.eq, ranks.values(), range(n))):
        tokens = [None] * n
        for b, r in ranks.items():
            tokens[r] = b
    cfg = _read_tokenizer_config(path.parent)
    specials = _config_added_tokens(cfg, path.parent) if cfg else {}
    if not specials:
        specials = llama3_special_tokens(n)
    for text, i in specials.items():
        if i < n:
            raise FormatError(f"{path}: special token {text!r} has id {i}, inside the {n} BPE ranks")
    bos_text = _config_token_text(cfg, "bos_token") or LLAMA3_BOS
    eos_text = _config_token_text(cfg, "eos_token") or LLAMA3_EOS
    eos = [specials[t] for t in (eos_text,) + LLAMA3_EOS_TEXTS if t in specials]
    return Tokenizer(
        tokens=tokens,
        special_tokens=specials,
        pre_tokenizer=PreTokenizer([LLAMA3_PATTERN], name="llama-bpe"),
        merges=None,
        bos_id=specials.get(bos_text),
        eos_ids=eos + _generation_config_eos(path.parent),
        add_bos=_config_bool(cfg, "add_bos_token", True),
        chat_template=_chat_template(cfg, path.parent),
        name="llama-bpe",
    )


# ---- Hugging Face tokenizer.json --------------------------------------------------------------


@_gc_paused()
def tokenizer_from_hf_json(path: str | os.PathLike) -> Tokenizer:
    """A byte-level BPE tokenizer.json (GPT-2, Llama 3, SmolLM2, ...) + tokenizer_config.json beside it."""
    path = Path(path)
    j = _read_json(path)
    if isinstance(j, dict) and j.get("type") == CHAR_FORMAT:  # our character tokenizer's own file
        return char_tokenizer_from_dict(j, str(path))
    if not isinstance(j, dict) or not isinstance(j.get("model"), dict):
        raise FormatError(f"{path}: not a tokenizer.json (no 'model' object)")
    model = j["model"]
    mtype = model.get("type", "BPE" if "merges" in model else None)
    if mtype != "BPE":
        raise UnsupportedError(f"{path}: tokenizer model {mtype!r} is not supported (only byte-level BPE)")
    if model.get("byte_fallback"):
        raise UnsupportedError(f"{path}: sentencepiece-style BPE (byte_fallback) is not supported, only byte-level BPE")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise UnsupportedError(f"{path}: BPE with subword prefixes/suffixes is not supported")
    if model.get("dropout"):
        raise UnsupportedError(f"{path}: BPE dropout is not supported")
    if j.get("normalizer") is not None:
        kind = j["normalizer"].get("type") if isinstance(j["normalizer"], dict) else j["normalizer"]
        raise UnsupportedError(f"{path}: normalizer {kind!r} is not supported (byte-level BPE has none)")
    pre, name = _hf_pre_tokenizer(j.get("pre_tokenizer"), path)

    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise FormatError(f"{path}: model.vocab must be a non-empty object")
    added = j.get("added_tokens") or []
    if not isinstance(added, list):
        raise FormatError(f"{path}: added_tokens must be a list")
    specials: dict[str, int] = {}
    for a in added:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str) or not _is_id(a.get("id")):
            raise FormatError(f"{path}: bad added_tokens entry {str(a)[:80]}")
        specials[a["content"]] = a["id"]

    n = max(vocab.values(), default=-1) + 1 if all(_is_id(v) for v in vocab.values()) else -1
    if n <= 0 or n > _MAX_VOCAB:
        raise FormatError(f"{path}: model.vocab ids must be integers in [0, {_MAX_VOCAB})")
    special_ids = set(specials.values())
    tokens: list[bytes | None] = [None] * n
    texts = list(vocab)
    all_bytes = _byte_level_decode_all(texts)
    bytes_of_text = dict(zip(texts, all_bytes))
    for i, b in zip(vocab.values(), all_bytes):
        tokens[i] = b
    for i in special_ids:
        if i < n:
            tokens[i] = None
    merges = _parse_merges(model.get("merges"), bytes_of_text, path)
    _check_merges(merges, tokens, path)

    cfg = _read_tokenizer_config(path.parent)
    bos_text = _config_token_text(cfg, "bos_token")
    eos_text = _config_token_text(cfg, "eos_token")
    template_bos = _template_first_special(j.get("post_processor"))
    if bos_text is None:
        bos_text = template_bos
    if cfg is not None and "add_bos_token" in cfg:
        add_bos = _config_bool(cfg, "add_bos_token", False)
    else:
        add_bos = template_bos is not None
    bos_id = specials.get(bos_text) if bos_text is not None else None
    if bos_id is None and bos_text is not None:
        bos_id = vocab.get(bos_text)
    eos_id = specials.get(eos_text) if eos_text is not None else None
    return Tokenizer(
        tokens=tokens,
        special_tokens=specials,
        pre_tokenizer=pre,
        merges=merges,
        ignore_merges=bool(model.get("ignore_merges", False)),
        bos_id=bos_id,
        eos_id=eos_id,
        eos_ids=_end_ids(specials) + _generation_config_eos(path.parent),
        add_bos=add_bos,
        chat_template=_chat_template(cfg, path.parent),
        name=name,
    )


def tokenizer_to_hf_json(tok: Tokenizer) -> dict:
    """A tokenizer.json (Hugging Face tokenizers format) for a byte-level BPE `Tokenizer`: the inverse of
    `tokenizer_from_hf_json`. Pre-tokenizer regexes become Split(Isolated) steps before a regex-free
    ByteLevel; BOS (when added) becomes a TemplateProcessing post-processor; special tokens become
    added_tokens. The chat template and token names live in tokenizer_config.json (see formats/export.py)."""
    to_text = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(map(to_text.__getitem__, b))

    vocab: dict[str, int] = {}
    for i, b in enumerate(tok.ordinary_tokens()):
        if b is not None:
            vocab.setdefault(text(b), i)  # a repeated token keeps its first id, as our reader does
    merges = [[text(a), text(b)] for a, b in tok.merge_list()]
    steps: list[dict] = []
    pre = tok.pre_tokenizer
    for k, (pat, prefix) in enumerate(zip(pre.patterns, pre.prefix_space)):
        if prefix:  # only HF's own ByteLevel(add_prefix_space) step expresses this, as the last step
            if pat != GPT2_PATTERN or k != len(pre.patterns) - 1:
                raise UnsupportedError(f"tokenizer {tok.name!r}: a prefix space before regex #{k} cannot be saved")
            steps.append({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True})
        else:
            steps.append({"type": "Split", "pattern": {"Regex": pat}, "behavior": "Isolated", "invert": False})
    if steps[-1]["type"] != "ByteLevel":
        steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t, i in sorted(tok.special_tokens.items(), key=lambda x: x[1])]
    post = None
    if tok.add_bos and tok.bos_id is not None:
        bos = tok.bos_token
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_id], "tokens": [bos]}}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": steps},
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": bool(tok.ignore_merges), "vocab": vocab, "merges": merges},
    }


def _hf_pre_tokenizer(spec: Any, path: Path) -> tuple[PreTokenizer, str]:
    steps = spec.get("pretokenizers") if isinstance(spec, dict) and spec.get("type") == "Sequence" else [spec]
    if not isinstance(steps, list):
        raise FormatError(f"{path}: bad pre_tokenizer")
    patterns: list[str] = []
    prefix: list[bool] = []
    byte_level = False
    for s in steps:
        kind = s.get("type") if isinstance(s, dict) else None
        if kind == "Split":
            pat = s.get("pattern") or {}
            if s.get("behavior") != "Isolated" or s.get("invert"):
                raise UnsupportedError(f"{path}: Split pre-tokenizer with behavior {s.get('behavior')!r} "
                                       f"invert={s.get('invert')} is not supported (only Isolated)")
            if isinstance(pat.get("Regex"), str):
                patterns.append(pat["Regex"])
            elif isinstance(pat.get("String"), str):
                import regex
                patterns.append(regex.escape(pat["String"]))
            else:
                raise FormatError(f"{path}: Split pre-tokenizer without a pattern")
            prefix.append(False)
        elif kind == "Digits":
            patterns.append(DIGIT_PATTERN if s.get("individual_digits") else r"\p{N}+")
            prefix.append(False)
        elif kind == "ByteLevel":
            byte_level = True
            if s.get("use_regex", True):
                patterns.append(GPT2_PATTERN)
                prefix.append(bool(s.get("add_prefix_space")))
            elif s.get("add_prefix_space"):
                raise UnsupportedError(f"{path}: ByteLevel(add_prefix_space=true, use_regex=false) is not supported")
        else:
            raise UnsupportedError(f"{path}: pre-tokenizer {kind!r} is not supported (byte-level BPE only)")
    if not byte_level:
        raise UnsupportedError(f"{path}: no ByteLevel pre-tokenizer: not a byte-level BPE tokenizer")
    if not patterns:
        raise UnsupportedError(f"{path}: ByteLevel without a regex and no Split: not supported")
    name = "bpe"
    for known, pats in (("llama-bpe", [LLAMA3_PATTERN]), ("smollm", [DIGIT_PATTERN, GPT2_PATTERN]),
                        ("gpt2", [GPT2_PATTERN])):
        if patterns == pats and not any(prefix):
            name = known
    return PreTokenizer(patterns, prefix, name=name), name


def _template_first_special(post: Any) -> str | None:
    """The special token a TemplateProcessing puts before the text (BOS), if any."""
    procs = post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    for p in procs:
        if isinstance(p, dict) and p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if single and isinstance(single[0], dict) and "SpecialToken" in single[0]:
                tid = single[0]["SpecialToken"].get("id")
                return tid if isinstance(tid, str) else None
    return None


def _parse_merges(raw: Any, bytes_of_text: dict[str, bytes], path: Path) -> list[tuple[bytes, bytes]]:
    if not isinstance(raw, list):
        raise FormatError(f"{path}: BPE merges must be a list")
    merges = _parse_merges_fast(raw, bytes_of_text)
    return merges if merges is not None else _parse_merges_one_by_one(raw, bytes_of_text, path)


def _parse_merges_fast(raw: list, bytes_of_text: dict[str, bytes]) -> list[tuple[bytes, bytes]] | None:
    """Well-formed merges ("a b" strings or [a, b] lists) with C-level loops (~15 ms for 48k merges
    instead of ~100 ms one by one), or None when any is not (then the slow path names it)."""
    if not raw:
        return []
    kinds = set(map(type, raw))
    if kinds == {str}:
        # One join and one split (~12 ms for 48k) rather than a split per merge (~25 ms).
        if set(map(str.count, raw, repeat(" "))) != {1}:
            return None
        words = " ".join(raw).split(" ")
    elif kinds == {list} and set(map(len, raw)) == {2}:
        words = list(chain.from_iterable(raw))
        if set(map(type, words)) != {str}:
            return None
    else:
        return None
    try:
        flat = list(map(bytes_of_text.__getitem__, words))
    except KeyError:
        return None
    return list(zip(flat[0::2], flat[1::2]))


def _parse_merges_one_by_one(raw: list, bytes_of_text: dict[str, bytes], path: Path) -> list[tuple[bytes, bytes]]:
    out = []
    for k, m in enumerate(raw):
        if isinstance(m, str):
            parts = m.split(" ")
        elif isinstance(m, list):
            parts = m
        else:
            parts = None
        if not parts or len(parts) != 2 or not all(isinstance(x, str) for x in parts):
            raise FormatError(f"{path}: merge #{k} is not a pair: {str(m)[:60]!r}")
        try:
            out.append((bytes_of_text[parts[0]], bytes_of_text[parts[1]]))
        except KeyError:
            raise FormatError(f"{path}: merge #{k} {m!r} uses a token missing from the vocabulary") from None
    return out


def _check_merges(merges: list[tuple[bytes, bytes]], tokens: list[bytes | None], path) -> None:
    known = set(tokens)
    known.discard(None)
    if all(map(known.__contains__, starmap(operator.add, merges))):  # the common case, in C
        return
    for k, (a, b) in enumerate(merges):
        if a + b not in known:
            raise FormatError(f"{path}: merge #{k} gives {a + b!r}, which is not in the vocabulary")


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, str]:
    """str.translate table from GPT-2's byte-as-character alphabet to the Latin-1 character of each byte.

    Characters below 256 that are not in the alphabet (space, controls, ...) map to U+FFFF, so that
    encoding the result as Latin-1 fails exactly when a text is not pure alphabet."""
    table = {c: "\uffff" for c in range(256)}
    table.update((ord(c), chr(b)) for c, b in unicode_to_bytes().items())
    return table


def _byte_level_decode(text: str) -> bytes:
    """A vocabulary entry in GPT-2's byte-as-character form back to bytes.

    Added/control tokens may hold characters outside that alphabet; they are taken as UTF-8 text.
    """
    try:
        return text.translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _byte_level_decode_all(texts: list[str]) -> list[bytes]:
    """`_byte_level_decode` of every entry: one translate() over them all joined (one character is one
    byte when all are pure alphabet), then slices; ~10 ms for 49k entries instead of ~70 ms one by one."""
    try:
        blob = "".join(texts).translate(_byte_level_table()).encode("latin-1")
    except UnicodeEncodeError:
        return list(map(_byte_level_decode, texts))
    ends = list(accumulate(map(len, texts)))
    return list(map(blob.__getitem__, map(slice, [0] + ends, ends)))


# ---- GGUF ------------------------------------------------------------------------------------

# GGUF token types (llama.cpp's llama_token_type).
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


def _tokenizer_from_gguf_file(path: Path) -> Tokenizer:
    from ..formats.gguf import read_gguf  # lazy: the tokenizer works without the model code

    f = read_gguf(path)
    try:
        md = dict(f.metadata)
    finally:
        close = getattr(f, "close", None)
        if close is not None:
            close()
    return tokenizer_from_gguf_metadata(md, str(path))


@_gc_paused()
def tokenizer_from_gguf_metadata(md: dict, source: str) -> Tokenizer:
    """A tokenizer from GGUF metadata (key -> str/int/list), as `read_gguf(path).metadata` gives it."""
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise FormatError(f"{source}: no tokenizer in this GGUF (tokenizer.ggml.model missing)")
    if model != "gpt2":
        kinds = {"llama": "sentencepiece", "bert": "WordPiece", "t5": "Unigram", "rwkv": "RWKV"}
        raise UnsupportedError(f"{source}: GGUF tokenizer {model!r} ({kinds.get(model, 'unknown kind')}) is not "
                               "supported, only byte-level BPE ('gpt2')")
    texts = md.get("tokenizer.ggml.tokens")
    if not isinstance(texts, (list, tuple)) or not texts or len(texts) > _MAX_VOCAB:
        raise FormatError(f"{source}: tokenizer.ggml.tokens must be a non-empty list of strings")
    n = len(texts)
    if set(map(type, texts)) != {str} and not all(isinstance(t, str) for t in texts):  # the set: C speed
        raise FormatError(f"{source}: tokenizer.ggml.tokens holds a non-string entry")
    types = md.get("tokenizer.ggml.token_type")
    if types is not None:
        if not isinstance(types, (list, tuple)) or len(types) != n:
            raise FormatError(f"{source}: tokenizer.ggml.token_type has {len(types) if isinstance(types, (list, tuple)) else '?'}"
                              f" entries for {n} tokens")
        types = list(map(int, types))
    else:
        types = [_TT_NORMAL] * n

    def token_id(key: str) -> int | None:
        v = md.get(key)
        if v is None:
            return None
        if not _is_id(v) or v >= n:
            raise FormatError(f"{source}: {key} = {v!r} is not a token id in [0, {n})")
        return int(v)

    bos, eos = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    eot, eom = token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")

    # Control and user-defined tokens are matched as whole strings, never produced by BPE.
    special_types = {_TT_CONTROL, _TT_USER_DEFINED, _TT_UNKNOWN}
    named = {i for i in (bos, eos, eot, eom) if i is not None}
    special_ids = sorted(named.union(i for i, ty in enumerate(types) if ty in special_types))
    specials: dict[str, int] = {}
    for i in special_ids:
        specials.setdefault(texts[i], i)
    tokens: list[bytes | None] = _byte_level_decode_all(texts)
    bytes_of_text = dict(zip(reversed(texts), reversed(tokens)))  # reversed: the first of equal texts wins
    for i in specials.values():
        tokens[i] = None
    raw_merges = md.get("tokenizer.ggml.merges")
    if raw_merges is None:
        raise FormatError(f"{source}: a 'gpt2' GGUF tokenizer needs tokenizer.ggml.merges")
    merges = _parse_merges(list(raw_merges), bytes_of_text, Path(source))
    _check_merges(merges, tokens, source)

    pre_name = md.get("tokenizer.ggml.pre")
    pre = gguf_pre_tokenizer(pre_name if isinstance(pre_name, str) else None)
    llama3_like = pre.patterns == GGUF_PRE_TOKENIZERS["llama3"]
    # llama.cpp takes a whole piece that is a token as is for Llama 3 vocabularies (as tiktoken does),
    # and adds BOS by default for them; tokenizer.ggml.add_bos_token overrides that default.
    add_bos = md.get("tokenizer.ggml.add_bos_token")
    add_bos = llama3_like if add_bos is None else bool(add_bos)
    eos_ids = [i for i in (eos, eot, eom) if i is not None] + _end_ids(specials)
    template = md.get("tokenizer.chat_template")
    return Tokenizer(
        tokens=tokens,
        special_tokens=specials,
        pre_tokenizer=pre,
        merges=merges,
        ignore_merges=llama3_like,
        bos_id=bos,
        eos_ids=eos_ids,
        add_bos=add_bos,
        chat_template=template if isinstance(template, str) else None,
        name=pre.name,
    )


# ---- helpers ---------------------------------------------------------------------------------


def _is_id(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and 0 <= v < _MAX_VOCAB


def _end_ids(specials: dict[str, int]) -> list[int]:
    return [specials[t] for t in END_TOKEN_TEXTS if t in specials]


def _read_bounded(path) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > _MAX_TEXT_FILE_BYTES:
            raise FormatError(f"{path}: {size} bytes is too large for a tokenizer file")
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ModelNotFoundError(f"tokenizer file not found: {path}") from None
    except IsADirectoryError:
        raise TokenizerError(f"{path} is a directory, expected a tokenizer file") from None


def _read_json(path) -> Any:
    data = _read_bounded(path)
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({str(e).splitlines()[0][:80]})") from None


def _read_tokenizer_config(folder: Path) -> dict | None:
    p = folder / "tokenizer_config.json"
    if not p.is_file():
        return None
    cfg = _read_json(p)
    if not isinstance(cfg, dict):
        raise FormatError(f"{p}: expected a JSON object")
    return cfg


def _config_added_tokens(cfg: dict, folder: Path) -> dict[str, int]:
    dec = cfg.get("added_tokens_decoder") or {}
    if not isinstance(dec, dict):
        raise FormatError(f"{folder / 'tokenizer_config.json'}: added_tokens_decoder must be an object")
    out = {}
    for k, v in dec.items():
        try:
            i = int(k)
        except ValueError:
            i = -1
        if not _is_id(i) or not isinstance(v, dict) or not isinstance(v.get("content"), str):
            raise FormatError(f"{folder / 'tokenizer_config.json'}: bad added_tokens_decoder entry {k!r}")
        out[v["content"]] = i
    return out


def _config_token_text(cfg: dict | None, key: str) -> str | None:
    v = (cfg or {}).get(key)
    if isinstance(v, dict):  # serialized AddedToken
        v = v.get("content")
    return v if isinstance(v, str) else None


def _config_bool(cfg: dict | None, key: str, default: bool) -> bool:
    v = (cfg or {}).get(key)
    return v if isinstance(v, bool) else default


def _chat_template(cfg: dict | None, folder: Path) -> str | None:
    t = (cfg or {}).get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    if isinstance(t, str):
        return t
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return _read_bounded(jinja).decode("utf-8", errors="replace")
    return None


def _generation_config_eos(folder: Path) -> list[int]:
    """eos_token_id(s) from generation_config.json beside the tokenizer (instruct models list several)."""
    p = folder / "generation_config.json"
    if not p.is_file():
        return []
    try:
        v = json.loads(_read_bounded(p)).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return []
    v = v if isinstance(v, list) else [v]
    return [i for i in v if _is_id(i)]
