"""The pictures of a walkthrough and the self-contained HTML report (and the Markdown of the docs).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display needed) and
embedded in the HTML as base64 PNGs, so the page opens in any browser offline. Every figure is drawn
from the recording of the one forward, except the KV-cache figure, which times real decode steps.
"""

from __future__ import annotations

import base64
import html
import io
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..model import to_numpy
from .messages import msg
from .walkthrough import Walkthrough, piece_text, show_piece

# Fonts that can draw Chinese labels, if one is installed; without one, figures keep English labels.
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei", "WenQuanYi Micro Hei",
             "SimHei", "Microsoft YaHei", "PingFang SC", "Heiti SC", "Droid Sans Fallback", "AR PL UMing CN")
MAX_LENS_POSITIONS = 24  # the logit lens shows at most this many (last) positions
DPI = 100


def cjk_font() -> str | None:
    """The name of an installed font with Chinese glyphs, or None."""
    from matplotlib import font_manager

    names = {f.name for f in font_manager.fontManager.ttflist}
    return next((n for n in CJK_FONTS if n in names), None)


def figure_lang(lang: str) -> str:
    """The language figure labels can be drawn in: Chinese only when a CJK font exists."""
    return lang if lang != "zh" or cjk_font() else "en"


def check_writable(out_dir) -> Path:
    """Create `out_dir` if needed and make sure a file can be written there (before any long work)."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".scratchlm-probe-"):
            pass
    except OSError as e:
        raise OSError(f"cannot write the report to {str(out_dir)!r}: {e.strerror or e}") from None
    return path


# --- the KV cache, measured ------------------------------------------------------------------

@dataclass
class KVTiming:
    """Seconds per new token, decoding greedily with the KV cache and by recomputing the whole prefix."""

    lengths: list[int] = field(default_factory=list)  # positions the new token sees
    with_cache: list[float] = field(default_factory=list)
    without_cache: list[float] = field(default_factory=list)
    tokens_with: list[int] = field(default_factory=list)
    tokens_without: list[int] = field(default_factory=list)
    prefill: float = 0.0

    @property
    def median_with(self) -> float:
        return float(np.median(self.with_cache))

    @property
    def median_without(self) -> float:
        return float(np.median(self.without_cache))


def time_kv_cache(model, ids, n_new: int = 8, reps: int = 2) -> KVTiming | None:
    """Decode n_new tokens greedily both ways, timing every step (the fastest of `reps` runs, after
    one warm-up run, so a busy machine disturbs the picture less); None when the context has no room."""
    n_new = min(int(n_new), model.config.max_seq_len - len(ids))
    if n_new < 1:
        return None
    r = KVTiming()
    cache = model.new_cache(len(ids) + n_new)
    t0 = time.perf_counter()
    logits = model.forward(np.asarray([ids]), cache, 0, last_only=True)  # prefill: [1,1,V]
    r.prefill = time.perf_counter() - t0
    first = int(np.argmax(to_numpy(logits[0, -1])))

    def best_of(step):
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            out = step()
            times.append(time.perf_counter() - t0)
        return out, min(times)

    # step j consumes token j-1 and produces token j from a prefix of len(ids)+j positions:
    # with the cache, one new row of keys/values per layer; without it, the whole prefix again.
    # The two are timed in turn, step by step, so both see the same load on a shared machine.
    # Re-running a cached step rewrites the same cache row with the same values, so repeats are harmless.
    seq_c = list(ids) + [first]  # with the cache
    seq_n = list(ids) + [first]  # without
    model.forward(np.asarray([seq_c[-1:]]), cache, len(seq_c) - 1, last_only=True)  # warm-up
    model.forward(np.asarray([seq_n]), last_only=True)
    for _ in range(n_new):
        logits, dt = best_of(lambda: model.forward(np.asarray([seq_c[-1:]]), cache, len(seq_c) - 1, last_only=True))  # [1,1,V]
        nxt = int(np.argmax(to_numpy(logits[0, -1])))
        r.with_cache.append(dt)
        r.lengths.append(len(seq_c))
        r.tokens_with.append(nxt)
        seq_c.append(nxt)
        logits, dt = best_of(lambda: model.forward(np.asarray([seq_n]), last_only=True))  # [1,S] -> [1,1,V]
        nxt = int(np.argmax(to_numpy(logits[0, -1])))
        r.without_cache.append(dt)
        r.tokens_without.append(nxt)
        seq_n.append(nxt)
    return r


# --- figures ---------------------------------------------------------------------------------

def _figure(w_in: float, h_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w_in, h_in), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Gg]lyph.*missing.*")
        fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _label(tok, i: int, n: int = 10) -> str:
    """A short token label for a plot axis; a space shows as ␣, so ' the' and 'the' differ."""
    s = piece_text(tok, i)
    if s is None:
        return f"<{int(i)}>"
    s = s.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    return s if len(s) <= n else s[:n - 1] + "…"


def _font(fig_lang: str) -> dict:
    f = cjk_font() if fig_lang == "zh" else None
    return {"family": [f, "DejaVu Sans"]} if f else {}


def fig_attention(w: Walkthrough, fig_lang: str) -> bytes:
    """Heatmaps of the attention probabilities of every head of the chosen layer."""
    t = lambda key, **kw: msg(key, fig_lang, **kw)  # noqa: E731
    probs = w.rec.at(w.layer, "probs")[0]  # [H,T,S]
    H, T, S = probs.shape
    G = H // w.model.config.n_kv_heads
    ncols = math.ceil(math.sqrt(H))
    nrows = math.ceil(H / ncols)
    cell = 3.0 if T <= 24 else 3.6
    fig = _figure(ncols * cell, nrows * cell + 0.5)
    labels = [_label(w.model.tokenizer, i) for i in w.ids]
    future = np.triu(np.ones((T, S), dtype=bool), k=S - T + 1)  # masked (future) positions
    for h in range(H):
        ax = fig.add_subplot(nrows, ncols, h + 1)
        im = ax.imshow(np.ma.masked_array(probs[h], future), cmap="viridis", vmin=0.0, vmax=1.0,
                       interpolation="nearest")
        ax.set_title(t("fig_head", h=h, kv=h // G), fontsize=9, color="crimson" if h == w.head else "black",
                     fontweight="bold" if h == w.head else "normal", **_font(fig_lang))
        if T <= 24:
            ax.set_xticks(range(S), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels, fontsize=6)
        else:
            ax.tick_params(labelsize=6)
    fig.colorbar(im, ax=fig.axes, shrink=0.6, label=t("fig_prob"))
    fig.suptitle(t("fig_attention_title", layer=w.layer), **_font(fig_lang))
    return _png(fig)


def fig_rope(w: Walkthrough, fig_lang: str) -> bytes:
    """RoPE: the frequencies, the angle of every (position, pair), and one pair of q rotating."""
    from matplotlib import colormaps

    t = lambda key, **kw: msg(key, fig_lang, **kw)  # noqa: E731
    inv, cos, sin = w.rec["rope.inv_freq"], w.rec["rope.cos"], w.rec["rope.sin"]
    T, P = cos.shape
    fig = _figure(15, 4.4)
    ax = fig.add_subplot(1, 3, 1)
    ax.semilogy(np.arange(P), inv, marker=".", ms=4)
    ax.set_xlabel(t("fig_pair_index"), **_font(fig_lang))
    ax.set_ylabel("θ_i (rad / position)")
    ax.set_title(t("fig_rope_freq"), fontsize=10, **_font(fig_lang))
    ax.grid(True, alpha=0.3)

    ax = fig.add_subplot(1, 3, 2)
    ang = np.arctan2(sin, cos)  # the recorded rotation, wrapped to (−π, π]  [T,Hd/2]
    im = ax.imshow(ang, cmap="twilight", vmin=-np.pi, vmax=np.pi, aspect="auto", interpolation="nearest")
    ax.set_xlabel(t("fig_pair_index"), **_font(fig_lang))
    ax.set_ylabel(t("fig_position"), **_font(fig_lang))
    ax.set_title(t("fig_rope_angles"), fontsize=10, **_font(fig_lang))
    fig.colorbar(im, ax=ax, label="rad")

    ax = fig.add_subplot(1, 3, 3)
    # the rotation each pair of q actually received, measured from q before and after RoPE
    q = w.rec.at(w.layer, "q")[0, :, w.head].astype(np.float64)  # [T,Hd]
    qr = w.rec.at(w.layer, "q_rope")[0, :, w.head].astype(np.float64)
    turned = np.arctan2(qr[:, 1::2], qr[:, 0::2]) - np.arctan2(q[:, 1::2], q[:, 0::2])  # [T,Hd/2]
    turned = np.unwrap(turned, axis=0)  # count whole turns as the position grows
    pos = np.arange(T)
    for i, color in zip(sorted({0, 1, 2, 3, P // 4}), colormaps["tab10"].colors):
        ax.plot(pos, pos * float(inv[i]), "-", color=color, lw=1, alpha=0.6)
        ax.plot(pos, turned[:, i], "o", color=color, ms=4, label=f"i = {i}")
    ax.set_xlabel(t("fig_position"), **_font(fig_lang))
    ax.set_ylabel("rad")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.set_title(t("fig_rope_pair", layer=w.layer, h=w.head), fontsize=10, **_font(fig_lang))
    fig.suptitle(t("fig_rope_title"), **_font(fig_lang))
    return _png(fig)


def fig_positions(w: Walkthrough, fig_lang: str) -> bytes:
    """GPT-2's learned positions: how alike the position vectors of the prompt's positions are."""
    t = lambda key, **kw: msg(key, fig_lang, **kw)  # noqa: E731
    P = w.rec["pos_embedding"].astype(np.float64)  # [T,D]
    n = P / (np.linalg.norm(P, axis=1, keepdims=True) + 1e-12)
    fig = _figure(11, 4.4)
    ax = fig.add_subplot(1, 2, 1)
    im = ax.imshow(n @ n.T, cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")  # [T,D] @ [D,T] -> [T,T]
    ax.set_xlabel(t("fig_position"), **_font(fig_lang))
    ax.set_ylabel(t("fig_position"), **_font(fig_lang))
    ax.set_title(t("fig_pos_similarity"), fontsize=10, **_font(fig_lang))
    fig.colorbar(im, ax=ax)
    ax = fig.add_subplot(1, 2, 2)
    k = min(64, P.shape[1])
    im = ax.imshow(P[:, :k], cmap="coolwarm", aspect="auto", interpolation="nearest")
    ax.set_xlabel(t("fig_dim", k=k), **_font(fig_lang))
    ax.set_ylabel(t("fig_position"), **_font(fig_lang))
    ax.set_title(t("fig_pos_values"), fontsize=10, **_font(fig_lang))
    fig.colorbar(im, ax=ax)
    fig.suptitle(t("fig_positions_title"), **_font(fig_lang))
    return _png(fig)


def fig_lens(w: Walkthrough, fig_lang: str) -> bytes:
    """The logit lens: the top token each layer's output would give, at each position."""
    t = lambda key, **kw: msg(key, fig_lang, **kw)  # noqa: E731
    L, T = w.lens_ids.shape
    first = max(0, T - MAX_LENS_POSITIONS)
    cols = range(first, T)
    tok = w.model.tokenizer
    fig = _figure(1.0 * len(cols) + 2.2, 0.3 * L + 1.8)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(w.lens_p[:, first:], cmap="Blues", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    for i in range(L):
        for j, c in enumerate(cols):
            ax.text(j, i, _label(tok, w.lens_ids[i, c], 8), ha="center", va="center", fontsize=6.5,
                    color="white" if w.lens_p[i, c] > 0.6 else "black")
    ax.set_xticks(range(len(cols)), [f"{c}:{_label(tok, w.ids[c], 8)}" for c in cols], rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=7)
    ax.set_xlabel(t("fig_lens_x"), **_font(fig_lang))
    ax.set_ylabel(t("fig_layer"), **_font(fig_lang))
    ax.set_title(t("fig_lens_title"), **_font(fig_lang))
    fig.colorbar(im, ax=ax, label=t("fig_prob"), shrink=0.5)
    return _png(fig)


def fig_kv(kv: KVTiming, fig_lang: str) -> bytes:
    """Milliseconds per new token against sequence length, with and without the KV cache."""
    t = lambda key, **kw: msg(key, fig_lang, **kw)  # noqa: E731
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(kv.lengths, np.asarray(kv.without_cache) * 1e3, "o-", label=t("fig_without_cache"), color="tab:red")
    ax.plot(kv.lengths, np.asarray(kv.with_cache) * 1e3, "o-", label=t("fig_with_cache"), color="tab:green")
    ax.set_xlabel(t("fig_seq_len"), **_font(fig_lang))
    ax.set_ylabel(t("fig_ms_per_token"), **_font(fig_lang))
    ax.set_ylim(bottom=0)
    ax.legend(prop=_font(fig_lang) or None)
    ax.grid(True, alpha=0.3)
    ax.set_title(t("fig_kv_title"), **_font(fig_lang))
    return _png(fig)


def make_figures(w: Walkthrough, kv: KVTiming | None, fig_lang: str) -> dict[str, bytes]:
    """name -> PNG bytes, in the order the report shows them."""
    figs = {"attention": fig_attention(w, fig_lang)}
    figs["positions" if w.model.config.arch == "gpt2" else "rope"] = (
        fig_positions(w, fig_lang) if w.model.config.arch == "gpt2" else fig_rope(w, fig_lang))
    figs["lens"] = fig_lens(w, fig_lang)
    if kv is not None:
        figs["kv"] = fig_kv(kv, fig_lang)
    return figs


# --- text around the figures -----------------------------------------------------------------

def kv_rows(w: Walkthrough, kv: KVTiming) -> tuple[list[str], list[list[str]]]:
    t = lambda key, **kw: msg(key, w.lang, **kw)  # noqa: E731
    tok = w.model.tokenizer
    rows = [[str(n), f"{a * 1e3:.1f}", f"{b * 1e3:.1f}", f"{b / a:.1f}×", show_piece(tok, i)]
            for n, a, b, i in zip(kv.lengths, kv.with_cache, kv.without_cache, kv.tokens_with)]
    return [t("col_seq_len"), t("col_ms_with"), t("col_ms_without"), t("col_ratio"), t("col_token")], rows


def kv_summary(w: Walkthrough, kv: KVTiming) -> str:
    same = kv.tokens_with == kv.tokens_without
    return msg("kv_summary", w.lang, n=len(kv.lengths), with_ms=f"{kv.median_with * 1e3:.1f}",
               without_ms=f"{kv.median_without * 1e3:.1f}", ratio=f"{kv.median_without / kv.median_with:.1f}",
               prefill_ms=f"{kv.prefill * 1e3:.0f}", T=len(w.ids)) + " " + msg("kv_same" if same else "kv_differ", w.lang)


def captions(w: Walkthrough) -> dict[str, tuple[str, str]]:
    """name -> (heading, caption) of every figure, in the walkthrough's language."""
    t = lambda key, **kw: msg(key, w.lang, **kw)  # noqa: E731
    c = w.model.config
    return {
        "attention": (t("sec_attention", layer=w.layer), t("cap_attention", H=c.n_heads, K=c.n_kv_heads, layer=w.layer, h=w.head)),
        "rope": (t("sec_rope"), t("cap_rope", h=w.head, layer=w.layer)),
        "positions": (t("sec_positions"), t("cap_positions")),
        "lens": (t("sec_lens"), t("cap_lens", n=MAX_LENS_POSITIONS)),
        "kv": (t("sec_kv"), t("cap_kv")),
    }


# --- HTML ------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans","PingFang SC","Microsoft YaHei",sans-serif;
max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.5;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}h3{margin-top:1.6em}
pre{background:#f6f8fa;padding:.7em;overflow-x:auto;font-size:.85em;line-height:1.35}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
th{background:#f0f0f0}img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:1em 0}
figcaption{color:#555;font-size:.9em}.meta td:first-child{font-weight:bold}code{font-size:.95em}
"""


def _html_table(header, rows) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(x))}</th>" for x in header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(w: Walkthrough, figs: dict[str, bytes], kv: KVTiming | None) -> str:
    """The report as one HTML page, images embedded as data: URIs."""
    e = html.escape
    t = lambda key, **kw: msg(key, w.lang, **kw)  # noqa: E731
    c = w.model.config
    tok = w.model.tokenizer
    parts = [f'<!DOCTYPE html>\n<html lang="{w.lang}">\n<head>\n<meta charset="utf-8">',
             f"<title>{e(t('report_title'))}</title>", f"<style>{CSS}</style>\n</head>\n<body>",
             f"<h1>{e(t('report_title'))}</h1>"]
    meta = [[t("meta_model"), w.model.info.get("name") or w.model.info.get("source") or "?"],
            [t("meta_arch"), f"{c.arch}: L={c.n_layers} D={c.dim} H={c.n_heads} K={c.n_kv_heads} Hd={c.head_dim} "
                             f"F={c.ffn_dim} V={c.vocab_size}"],
            [t("meta_prompt"), repr(w.prompt)], [t("meta_tokens"), str(len(w.ids))],
            [t("meta_layer_head"), f"{w.layer} / {w.head}"]]
    parts.append('<table class="meta">' + "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td></tr>" for a, b in meta) + "</table>")
    top = [[str(r + 1), str(i), show_piece(tok, i), f"{p:.4f}"] for r, (i, _, p) in enumerate(w.top_tokens)]
    parts.append(f"<h2>{e(t('sec_next'))}</h2>" + _html_table([t("col_rank"), t("col_id"), t("col_piece"), t("col_prob")], top))
    caps = captions(w)
    for name, png in figs.items():
        heading, cap = caps[name]
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<h2>{e(heading)}</h2>\n<figure><img alt=\"{e(heading)}\" src=\"data:image/png;base64,{b64}\">"
                     f"<figcaption>{e(cap)}</figcaption></figure>")
        if name == "kv" and kv is not None:
            parts.append(f"<p>{e(kv_summary(w, kv))}</p>" + _html_table(*kv_rows(w, kv)))
    parts.append(f"<h2>{e(t('sec_steps'))}</h2>")
    for i, s in enumerate(w.steps, 1):
        parts.append(f"<h3>{i}. {e(s.title)}</h3>")
        pre = s.formula + ([""] if s.formula and s.shapes else []) + s.shapes + ([""] if s.values else []) + s.values
        if pre:
            parts.append(f"<pre>{e(chr(10).join(pre))}</pre>")
        if s.table:
            parts.append(_html_table(*s.table))
        parts += [f"<p>{e(n)}</p>" for n in s.notes]
    parts.append(f"<p><small>{e(t('report_footer'))}</small></p>\n</body>\n</html>\n")
    return "\n".join(parts)


def write_report(w: Walkthrough, out_dir, *, kv_tokens: int = 8, fig_lang: str | None = None) -> Path:
    """Time the KV cache, draw the figures and write `out_dir/report.html`; return its path."""
    path = check_writable(out_dir)
    kv = time_kv_cache(w.model, w.ids, kv_tokens) if kv_tokens > 0 else None
    figs = make_figures(w, kv, fig_lang or figure_lang(w.lang))
    out = path / "report.html"
    try:
        out.write_text(render_html(w, figs, kv), encoding="utf-8")
    except OSError as e:
        raise OSError(f"cannot write the report to {str(out)!r}: {e.strerror or e}") from None
    return out


# --- Markdown (the docs) ---------------------------------------------------------------------

def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def _md_table(header, rows) -> list[str]:
    return ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)] + \
           ["| " + " | ".join(_md_cell(x) for x in r) + " |" for r in rows]


def render_markdown(w: Walkthrough, images: dict[str, str], kv: KVTiming | None, header: list[str] = ()) -> str:
    """The walkthrough as Markdown, figures linked from `images` (name -> relative path)."""
    t = lambda key, **kw: msg(key, w.lang, **kw)  # noqa: E731
    out = list(header)
    out += [t("intro", prompt=repr(w.prompt), T=len(w.ids), layer=w.layer, head=w.head), ""]
    for i, s in enumerate(w.steps, 1):
        out += [f"## {i}. {s.title}", ""]
        pre = s.formula + ([""] if s.formula and s.shapes else []) + s.shapes + ([""] if s.values else []) + s.values
        if pre:
            out += ["```text"] + pre + ["```", ""]
        if s.table:
            out += _md_table(*s.table) + [""]
        for n in s.notes:
            out += [n, ""]
    out += [f"## {t('sec_pictures')}", ""]
    caps = captions(w)
    for name, rel in images.items():
        heading, cap = caps[name]
        out += [f"### {heading}", "", f"![{heading}]({rel})", "", cap, ""]
        if name == "kv" and kv is not None:
            out += [kv_summary(w, kv), ""] + _md_table(*kv_rows(w, kv)) + [""]
    return "\n".join(out).rstrip() + "\n"
