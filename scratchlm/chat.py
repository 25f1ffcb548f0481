"""Chat templates: turning a list of messages into the prompt text and token ids a chat model was trained on.

A chat template is a small Jinja program shipped with the model (GGUF key ``tokenizer.chat_template``,
``tokenizer_config.json`` field ``chat_template``). We render it the way Hugging Face ``transformers``
does, so the same template gives the same text: a sandboxed, immutable Jinja environment (templates
come from the internet), ``trim_blocks`` and ``lstrip_blocks``, ``break``/``continue`` in loops, and the
helpers templates expect (``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII and
does not HTML-escape).

Turning the text into ids has one trap: special tokens such as ``<|im_start|>`` must come from the
template, never from what a user typed, or a user could forge a system turn. ``encode_chat`` keeps the
two apart (see there).
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import FormatError, PromptError

# Meta's Llama 3 chat format (llama3 repository, `ChatFormat`): BOS once, then per message a header
# `<|start_header_id|>role<|end_header_id|>` + "\n\n" + the stripped content + `<|eot_id|>`, and an empty
# assistant header to ask for a reply. Used for Meta directories, which ship no template.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# A plain chat format for models that ship none (GPT-2): "User: ...", "Assistant: ...<eos>", one turn per
# line. Fine-tuning such a base on chat data teaches it this format, and the adapter carries the template
# (training/lora.py TEMPLATE_NAME) so `chat --adapter` speaks it too.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first %}{{ '\n' }}{% endif %}"
    "{% if message['role'] == 'system' %}{{ message['content'] | trim }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] | trim }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] | trim + eos_token }}"
    "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\nAssistant:' }}{% endif %}"
)

# Two Unicode noncharacters (reserved for a program's internal use) that bracket special-token text found
# in messages while the template runs, so that afterwards we can tell it from the template's own tokens.
_OPEN, _CLOSE = "\ufdd0", "\ufdd1"


# ---------------------------------------------------------------- the Jinja environment


def _raise_exception(message: Any) -> None:
    """Templates call this to reject a conversation (say, roles that do not alternate)."""
    raise PromptError(_one_line(f"chat template rejected the messages: {message}"))


def _strftime_now(fmt: str) -> str:
    """Today's date in the template's format (Llama 3.1+ templates put it in the system prompt)."""
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; a prompt is not HTML and models saw the plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _SafeNamespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore names, so a template cannot reach Python internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # no named `self`: a template may pass `self=` as a key
        ns, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _SafeNamespace._check(name)
        jinja2.utils.Namespace.__init__(ns, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _SafeNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set {name!r} on a namespace")


class _TemplateDict:
    """``dict(...)`` / ``dict.fromkeys(...)`` for templates, without handing them the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, keys: Any, value: Any = None) -> dict:
        return dict.fromkeys(keys, value)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in transformers;
    rendering is unchanged, so here the block just renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the `generation` name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _SafeNamespace
    env.globals["dict"] = _TemplateDict()
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise FormatError(_one_line(f"chat template is not valid Jinja (line {e.lineno}): {e.message}")) from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------- messages


def validate_messages(messages: Any) -> list[dict]:
    """Check that ``messages`` is a non-empty list of {"role": str, "content": str, ...}; return plain copies.

    Keys whose value is None are dropped, as transformers does (APIs send ``content=None``; templates
    handle a missing key better than the string "None").
    """
    if not isinstance(messages, (list, tuple)):
        raise PromptError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise PromptError("a chat needs at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        for key in ("role", "content"):
            if key not in m:
                raise PromptError(f"message {i} has no {key!r}")
            if not isinstance(m[key], str):
                raise PromptError(f"message {i}: {key!r} must be a string, got {type(m[key]).__name__}")
        if not m["role"]:
            raise PromptError(f"message {i} has an empty 'role'")
        out.append(m)
    return out


# ---------------------------------------------------------------- rendering


def render_chat(template: str, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """The prompt text for ``messages``, exactly as transformers' ``apply_chat_template(..., tokenize=False)``.

    ``add_generation_prompt`` appends the header that asks the model for an assistant reply. ``extra``
    goes to the template as variables (``tools``, ``date_string``, ...); like transformers we always
    define ``tools`` and ``documents`` (None by default) because templates test them with ``is not none``.
    """
    if not isinstance(template, str) or not template:
        raise PromptError("no chat template: pass a template string (this model may not ship one)")
    msgs = validate_messages(messages)
    return _render(_compile(template), msgs, bos_token=bos_token, eos_token=eos_token,
                   add_generation_prompt=add_generation_prompt, **extra)


def _render(compiled: jinja2.Template, messages: list[dict], **variables: Any) -> str:
    variables = {"tools": None, "documents": None, **variables}
    try:
        return compiled.render(messages=messages, **variables)
    except PromptError:
        raise
    except Exception as e:  # a template bug (bad types, missing keys) is reported as a one-line prompt error
        raise PromptError(_one_line(f"chat template failed: {type(e).__name__}: {e}")) from None


# ---------------------------------------------------------------- tokenizing


def _mark(value: Any, specials_re: re.Pattern) -> Any:
    """Bracket special-token text inside message strings with the private markers (values only, not keys)."""
    if isinstance(value, str):
        # a user cannot type the markers themselves: drop them first, so they cannot forge a bracket
        value = value.replace(_OPEN, "").replace(_CLOSE, "")
        return specials_re.sub(lambda m: _OPEN + m.group(0) + _CLOSE, value)
    if isinstance(value, dict):
        return {k: _mark(v, specials_re) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, specials_re) for v in value]
    return value


@functools.lru_cache(maxsize=8)
def _special_patterns(specials: tuple[str, ...]) -> tuple[re.Pattern, re.Pattern]:
    """(any special token, one piece of rendered text) regexes; longer tokens first so none hides inside another."""
    alternatives = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)"
    # a rendered piece is: a marked token (user text) | a bare token (the template's) | a stray marker
    piece = f"{_OPEN}({alternatives}){_CLOSE}|({alternatives})|[{_OPEN}{_CLOSE}]"
    return re.compile(alternatives), re.compile(piece)


def _split_rendered(rendered: str, piece_re: re.Pattern, specials: dict[str, int]) -> list[str | int]:
    """Rendered, marked text -> [text, id, text, ...]: bare special tokens become ids, marked ones stay text."""
    parts: list[str | int] = []
    text: list[str] = []  # text since the last id, user's special-looking text included
    pos = 0
    for m in piece_re.finditer(rendered):
        text.append(rendered[pos:m.start()])
        pos = m.end()
        if m.group(1) is not None:  # marked: typed by a user, so it is plain text
            text.append(m.group(1))
        elif m.group(2) is not None:  # bare: written by the template, so it is the token
            if "".join(text):
                parts.append("".join(text))
            text = []
            parts.append(specials[m.group(2)])
        else:
            # a lone marker: the template cut a marked token apart (slicing, split), so we can no longer tell
            # the template's tokens from the user's. Refuse rather than risk a forged token.
            raise PromptError(
                "the chat template cut apart a special token typed in a message; remove it from the message")
    text.append(rendered[pos:])
    if "".join(text):
        parts.append("".join(text))
    return parts


def encode_chat(tokenizer: Any, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                template: str | None = None, **extra: Any) -> list[int]:
    """Token ids of the chat prompt for ``messages``: the model's template rendered, then tokenized.

    Special tokens enter only from the template: the template's own ``<|im_start|>`` becomes its id,
    while the same text typed in a message is encoded as ordinary text. To tell them apart, special-token
    text inside the messages is bracketed with two private marker characters before rendering (they
    survive the template's own edits such as ``| trim``); after rendering, bracketed tokens are text and
    bare ones are ids, and the markers are removed. The text between ids (message content included) is
    encoded with ``tokenizer.encode`` as plain text.

    BOS: the rendered text is the whole prompt, so a BOS the template writes is not added again
    (transformers tokenizes the rendered chat with ``add_special_tokens=False``). If the template writes
    none and the tokenizer asks for one (``add_bos``, as GGUF's ``tokenizer.ggml.add_bos_token``), we
    prepend it, as llama.cpp does when it tokenizes a chat prompt; transformers would not.
    """
    if template is None:
        template = getattr(tokenizer, "chat_template", None) or _fallback_template(tokenizer)
    specials: dict[str, int] = dict(tokenizer.special_tokens)
    specials_re, piece_re = _special_patterns(tuple(specials))
    msgs = _mark(validate_messages(messages), specials_re)
    extra = _mark(extra, specials_re)
    rendered = render_chat(template, msgs, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                           add_generation_prompt=add_generation_prompt, **extra)
    ids: list[int] = []
    for part in _split_rendered(rendered, piece_re, specials):
        ids.extend([part] if isinstance(part, int) else tokenizer.encode(part))
    bos_id = getattr(tokenizer, "bos_id", None)
    if getattr(tokenizer, "add_bos", False) and bos_id is not None and (not ids or ids[0] != bos_id):
        ids.insert(0, bos_id)
    return ids


def _fallback_template(tokenizer: Any) -> str:
    """A tokenizer without a template: Llama 3's format if it has Llama 3's header tokens, else an error."""
    if {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"} <= set(tokenizer.special_tokens):
        return LLAMA3_TEMPLATE
    raise PromptError("this model has no chat template; use plain generation, or pass a template")
