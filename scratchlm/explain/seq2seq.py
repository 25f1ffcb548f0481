"""`scratchlm explain -m RUN "source"` for an encoder-decoder run: encoder, decoder and cross-attention.

As for the decoder (walkthrough.py), nothing is computed twice for show: the source is decoded (greedy
or beam search), then the engine's own seq2seq.forward runs once on (source, BOS + output) with a
recorder, and every step reads the arrays it recorded: embeddings with their sinusoidal positions, the
encoder's self-attention, the memory, the decoder's causal self-attention and its cross-attention to
the source, and the output probabilities. Text in English and Chinese comes from messages.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import ops
from ..seq2seq import beam_search, greedy_decode
from .messages import msg
from .walkthrough import Step, Walkthrough, dims, mat, num, render_text, show_piece, vec


class _Recorder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def __call__(self, name, a):
        self.arrays[name] = np.array(a, copy=True)

    def __getitem__(self, name):
        return self.arrays[name]


def _check(cfg, layer: int, head: int, top: int) -> None:
    n = min(cfg.n_enc_layers, cfg.n_dec_layers)
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise ValueError(f"--layer {layer} does not exist: this encoder-decoder has layers 0..{n - 1} on each side")
    if not isinstance(head, int) or not 0 <= head < cfg.n_heads:
        raise ValueError(f"--head {head} does not exist: this model has heads 0..{cfg.n_heads - 1}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"--top must be a positive integer, got {top!r}")


def build(model, source: str, *, layer: int = 0, head: int = 0, top: int = 5, lang: str = "en",
          beam: int = 1) -> Walkthrough:
    """Decode `source`, record one forward of (source, BOS + output) and turn it into steps."""
    if lang not in ("en", "zh"):
        raise ValueError(f"--lang must be 'en' or 'zh', got {lang!r}")
    cfg, w, tok = model.config, model.weights, model.tokenizer
    _check(cfg, layer, head, top)
    src_ids = model.encode_text(source)
    out_ids = (greedy_decode(w, cfg, src_ids) if beam == 1 else beam_search(w, cfg, src_ids, beam)[0][0])
    tgt_in = [cfg.bos_id] + out_ids
    rec = _Recorder()
    src = np.asarray([src_ids], np.int64)  # [1,S]
    tgt = np.asarray([tgt_in], np.int64)  # [1,T]
    logits = model.forward(src, tgt, src == cfg.pad_id, np.zeros(tgt.shape, bool), recorder=rec)  # [1,T,V]
    t = lambda key, **kw: msg(key, lang, **kw)  # noqa: E731
    S, T, D, H, Hd = len(src_ids), len(tgt_in), cfg.dim, cfg.n_heads, cfg.head_dim
    src_labels = [show_piece(tok, i) for i in src_ids]
    tgt_labels = [show_piece(tok, i) for i in tgt_in]
    steps = []

    rows = [["D", t("cfg_dim"), str(D)], ["H", t("cfg_heads"), str(H)], ["Hd", t("cfg_head_dim"), str(Hd)],
            ["F", t("cfg_ffn"), str(cfg.ffn_dim)], ["V", t("cfg_vocab"), str(cfg.vocab_size)],
            ["", t("s2s_cfg_enc_layers"), str(cfg.n_enc_layers)], ["", t("s2s_cfg_dec_layers"), str(cfg.n_dec_layers)],
            ["S", t("s2s_cfg_source_len"), str(S)], ["T", t("s2s_cfg_target_len"), str(T)],
            ["", t("s2s_cfg_norm"), t("s2s_pre_ln") if cfg.norm_first else t("s2s_post_ln")],
            ["", t("s2s_cfg_embeddings"), t("s2s_shared") if cfg.shared_embeddings else t("s2s_separate")],
            ["", t("cfg_params"), f"{cfg.n_params:,}"]]
    steps.append(Step("model", t("s2s_step_model"), table=([t("col_letter"), t("col_meaning"), t("col_value")], rows),
                      notes=[t("s2s_model_note")]))

    steps.append(Step("source", t("s2s_step_source"), shapes=[f"src {dims(('B', 'S'), (1, S))}"],
                      table=(["#", "id", t("s2s_col_piece")], [[str(p), str(i), src_labels[p]] for p, i in enumerate(src_ids)])))

    pe = ops.sinusoidal_encoding(max(S, T), D, np.float64)
    x = rec["encoder.embedding+pos"]
    steps.append(Step("embed", t("s2s_step_embed"),
                      formula=["x = E[src] · √D + PE", "PE[t, 2i] = sin(t / 10000^(2i/D)),  PE[t, 2i+1] = cos(t / 10000^(2i/D))"],
                      shapes=[f"E {dims(('V', 'D'), (cfg.vocab_size, D))}", f"PE {dims(('S', 'D'), (S, D))}",
                              f"x {dims(('B', 'S', 'D'), x.shape)}"],
                      values=[f"PE[1] = {vec(pe[1])}", f"x[0] = {vec(x[0, 0])}"], notes=[t("s2s_embed_note")]))

    sub = (["x = x + SelfAttn(LN(x))", "x = x + FFN(LN(x))"] if cfg.norm_first
           else ["x = LN(x + SelfAttn(x))", "x = LN(x + FFN(x))"])
    p_enc = rec[f"encoder.layers.{layer}.self_attn.probs"]  # [1,H,S,S]
    steps.append(Step("encoder", t("s2s_step_encoder", layer=layer),
                      formula=sub + ["SelfAttn: softmax(q kᵀ / √Hd + pad mask) v,  q, k, v = x W_q, x W_k, x W_v"],
                      shapes=[f"q, k, v {dims(('B', 'H', 'S', 'Hd'), (1, H, S, Hd))}",
                              f"probs {dims(('B', 'H', 'S', 'S'), p_enc.shape)}"],
                      values=[t("matrix_of_head", h=head)] + mat(p_enc[0, head], rows=min(S, 8), cols=min(S, 8),
                                                                 row_labels=src_labels),
                      notes=[t("s2s_encoder_note")] + [
                          t("s2s_enc_layer_rms", i=i, rms=num(np.sqrt(np.mean(rec[f"encoder.layers.{i}.output"] ** 2))))
                          for i in range(cfg.n_enc_layers)]))

    mem = rec["encoder.memory"]
    steps.append(Step("memory", t("s2s_step_memory"), formula=["memory = LN(x)"],
                      shapes=[f"memory {dims(('B', 'S', 'D'), mem.shape)}"], values=[f"memory[0] = {vec(mem[0, 0])}"],
                      notes=[t("s2s_memory_note", L=cfg.n_dec_layers)]))

    p_self = rec[f"decoder.layers.{layer}.self_attn.probs"]  # [1,H,T,T]
    dsub = (["x = x + SelfAttn(LN(x), causal)", "x = x + CrossAttn(LN(x), memory)", "x = x + FFN(LN(x))"]
            if cfg.norm_first else
            ["x = LN(x + SelfAttn(x, causal))", "x = LN(x + CrossAttn(x, memory))", "x = LN(x + FFN(x))"])
    steps.append(Step("decoder", t("s2s_step_decoder", layer=layer), formula=dsub,
                      shapes=[f"y {dims(('B', 'T', 'D'), (1, T, D))}", f"probs {dims(('B', 'H', 'T', 'T'), p_self.shape)}"],
                      values=[t("matrix_of_head", h=head)] + mat(p_self[0, head], rows=min(T, 8), cols=min(T, 8),
                                                                 row_labels=tgt_labels),
                      notes=[t("s2s_decoder_note")]))

    p_cross = rec[f"decoder.layers.{layer}.multihead_attn.probs"]  # [1,H,T,S]
    focus = np.argmax(p_cross[0, head], axis=-1)  # [T]: the source position each target row weighs most
    steps.append(Step("cross", t("s2s_step_cross", layer=layer),
                      formula=["CrossAttn: softmax(q kᵀ / √Hd + source pad mask) v,  q = y W_q,  k, v = memory W_k, memory W_v"],
                      shapes=[f"q {dims(('B', 'H', 'T', 'Hd'), (1, H, T, Hd))}", f"k, v {dims(('B', 'H', 'S', 'Hd'), (1, H, S, Hd))}",
                              f"probs {dims(('B', 'H', 'T', 'S'), p_cross.shape)}"],
                      values=[t("s2s_cross_rows", h=head)] + mat(p_cross[0, head], rows=min(T, 12), cols=min(S, 10),
                                                                 row_labels=tgt_labels),
                      table=([t("s2s_col_reads"), t("s2s_col_looks_at"), t("s2s_col_weight")],
                             [[tgt_labels[r], src_labels[int(focus[r])], num(p_cross[0, head, r, focus[r]])] for r in range(T)]),
                      notes=[t("s2s_cross_note")]))

    probs = np.exp(ops.log_softmax(logits[0].astype(np.float64)))  # [T,V]
    nxt = out_ids + [cfg.eos_id]
    rows = []
    for r in range(T):
        alt = np.argsort(-probs[r])[:top]
        rows.append([tgt_labels[r], show_piece(tok, nxt[r]), num(probs[r, nxt[r]]),
                     ", ".join(f"{show_piece(tok, int(i))} {probs[r, i]:.3f}" for i in alt)])
    steps.append(Step("output", t("s2s_step_output"), formula=["logits = LN(y) W_outᵀ,  p = softmax(logits)"],
                      shapes=[f"logits {dims(('B', 'T', 'V'), logits.shape)}"],
                      table=([t("s2s_col_after"), t("s2s_col_chosen"), "p", t("s2s_col_top")], rows),
                      notes=[t("s2s_output_note", out=repr(tok.decode(out_ids)), beam=beam)]))
    wt = Walkthrough(model=model, prompt=source, ids=src_ids, rec=rec, logits=logits, layer=layer, head=head,
                     top=top, lang=lang, steps=steps, lens_ids=np.zeros((0, T), np.int64),
                     lens_p=np.zeros((0, T), np.float32), top_tokens=[])
    wt.target_ids = tgt_in  # BOS + the decoded output: the decoder's input rows
    return wt


def write_cross_attention_png(w: Walkthrough, out) -> Path:
    """out/cross_attention.png: every head's cross-attention map of the chosen decoder layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .report import _font, check_writable, figure_lang

    out = check_writable(out)
    lang = figure_lang(w.lang)  # Chinese labels only where a CJK font is installed
    font = _font(lang)
    m = w.model
    tok, cfg = m.tokenizer, m.config
    p = w.rec[f"decoder.layers.{w.layer}.multihead_attn.probs"][0]  # [H,T,S]
    src = [tok.decode([i]) for i in w.ids]
    tgt = ["BOS"] + [tok.decode([i]) for i in w.target_ids[1:]]  # the rows: what the decoder had read
    T = p.shape[1]
    fig, axes = plt.subplots(1, cfg.n_heads, figsize=(2.2 + 2.0 * cfg.n_heads * len(src) / 12, 0.4 * T + 1.5),
                             dpi=100, squeeze=False)
    for h, ax in enumerate(axes[0]):
        ax.imshow(p[h], cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(src)), src, fontsize=7)
        ax.set_yticks(range(T), tgt if h == 0 else [""] * T, fontsize=7)
        ax.set_title(msg("s2s_fig_head", lang, h=h), fontsize=8, **font)
    fig.suptitle(msg("s2s_fig_cross_title", lang, layer=w.layer), fontsize=9, **font)
    fig.tight_layout()
    path = out / "cross_attention.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def explain_seq2seq(model, source: str, *, layer: int = 0, head: int = 0, top: int = 5, lang: str = "en", out=None,
                    beam: int = 1, file=None) -> Walkthrough:
    """Print the walkthrough of `source` and, with `out`, write out/cross_attention.png."""
    import sys

    file = sys.stdout if file is None else file
    w = build(model, source, layer=layer, head=head, top=top, lang=lang, beam=beam)
    print(render_text(w, intro=msg("s2s_intro", lang, source=repr(source), S=len(w.ids), layer=layer, head=head)), file=file)
    if out is not None:
        path = write_cross_attention_png(w, out)
        print(msg("s2s_png_written", lang, path=path), file=file)
    return w
