"""`scratchlm explain`: one forward pass, step by step, with the real shapes and values.

    >>> import scratchlm
    >>> from scratchlm.explain import explain
    >>> model = scratchlm.load()
    >>> w = explain(model, "the answer to life is", layer=0, head=0, out="report/")   # doctest: +SKIP

The walkthrough (walkthrough.py) comes from a single recorded run of the engine's own
`Model.forward`; the report (report.py) adds pictures and the measured effect of the KV cache.
All explanation text lives in messages.py, in English and Chinese.
"""

from __future__ import annotations

import sys

from .messages import LANGS, MESSAGES, msg
from .report import check_writable, make_figures, render_html, render_markdown, time_kv_cache, write_report
from .walkthrough import Recording, Step, Walkthrough, build, logit_lens, record_forward, render_text

__all__ = ["explain", "build", "render_text", "write_report", "render_html", "render_markdown", "make_figures",
           "time_kv_cache", "record_forward", "logit_lens", "Recording", "Step", "Walkthrough", "MESSAGES",
           "LANGS", "msg"]


def explain(model, prompt: str, *, layer: int = 0, head: int = 0, top: int = 10, lang: str = "en", out=None,
            max_tokens: int = 64, kv_tokens: int = 8, file=None) -> Walkthrough:
    """Print the walkthrough of `prompt` to `file` (stdout) and, with `out`, write out/report.html.

    Bad options (a layer or head the model lacks, an empty prompt, a prompt longer than max_tokens,
    an output directory that cannot be written) raise a one-line ValueError / OSError before any
    long computation.
    """
    file = sys.stdout if file is None else file
    if out is not None:
        check_writable(out)
    w = build(model, prompt, layer=layer, head=head, top=top, lang=lang, max_tokens=max_tokens)
    print(render_text(w), file=file)
    if out is not None:
        if kv_tokens > 0:
            print(msg("kv_measuring", lang, n=kv_tokens), file=sys.stderr)
        path = write_report(w, out, kv_tokens=kv_tokens)
        print(msg("report_written", lang, path=path), file=file)
    else:
        print(msg("report_hint", lang), file=file)
    return w
