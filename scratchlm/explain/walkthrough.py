"""The step-by-step walkthrough of one forward pass, built from what the forward itself recorded.

Nothing here computes the model a second time: `record_forward` runs `Model.forward` once with a
`Recording` as its recorder, and every step reads the arrays it captured (plus the config and the
weight shapes, to print the formulas with the model's real numbers). The steps are plain data
(`Step`), rendered for the terminal here and as Markdown / HTML by the report and the docs script.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field

import numpy as np

from .. import ops
from ..errors import PromptError
from ..model import to_numpy
from .messages import msg

# The dimension letters of every recorded array (layer arrays without their "layers.{i}." prefix).
BTD = ("B", "T", "D")
DIMS = {
    "tokens": ("B", "T"), "embedding": BTD, "pos_embedding": ("T", "D"), "embedding+pos": BTD,
    "rope.inv_freq": ("Hd/2",), "rope.cos": ("T", "Hd/2"), "rope.sin": ("T", "Hd/2"), "mask": ("T", "S"),
    "attention_norm": BTD, "q": ("B", "T", "H", "Hd"), "k": ("B", "T", "K", "Hd"), "v": ("B", "T", "K", "Hd"),
    "q_rope": ("B", "T", "H", "Hd"), "k_rope": ("B", "T", "K", "Hd"), "scores": ("B", "H", "T", "S"),
    "probs": ("B", "H", "T", "S"), "heads": ("B", "H", "T", "Hd"), "attention_output": BTD,
    "residual_attention": BTD, "ffn_norm": BTD, "ffn_gate": ("B", "T", "F"), "ffn_sigmoid": ("B", "T", "F"), "ffn_phi": ("B", "T", "F"),
    "ffn_up": ("B", "T", "F"),
    "ffn_act": ("B", "T", "F"), "ffn_down": BTD, "residual_ffn": BTD, "norm": BTD, "logits": ("B", "T", "V"),
}

# Arrays kept for every layer (the residual stream and the two updates to it); the chosen layer keeps all.
SUMMARY_NAMES = ("attention_output", "residual_attention", "ffn_down", "residual_ffn")

VEC = 6  # values shown per vector
ROWS = 4  # rows shown per matrix


# --- recording -------------------------------------------------------------------------------

class Recording:
    """A forward recorder: keeps host copies of the intermediates the walkthrough shows.

    With keep_all=False it keeps every array of layer `layer` and only the residual-stream arrays
    (SUMMARY_NAMES) of the other layers, so a long prompt does not hold L copies of the [B,H,T,S]
    attention maps.
    """

    def __init__(self, layer: int = 0, keep_all: bool = False):
        self.layer = layer
        self.keep_all = keep_all
        self.arrays: dict[str, np.ndarray] = {}
        self.names: list[str] = []  # every name the forward reported, kept or not, in order

    def __call__(self, name: str, a) -> None:
        self.names.append(name)
        if not self.keep_all and name.startswith("layers."):
            i, _, short = name[len("layers."):].partition(".")
            if int(i) != self.layer and short not in SUMMARY_NAMES:
                return
        # a copy: the forward may hand over views of buffers it reuses (the KV cache)
        self.arrays[name] = np.array(to_numpy(a), copy=True)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def at(self, layer: int, name: str) -> np.ndarray:
        return self.arrays[f"layers.{layer}.{name}"]


def record_forward(model, ids, layer: int = 0, keep_all: bool = False):
    """Run the model's own forward once on ids [T] with a Recording; return (recording, logits [1,T,V])."""
    rec = Recording(layer, keep_all)
    logits = model.forward(np.asarray([list(ids)], dtype=np.int64), recorder=rec)  # [1,T] -> [1,T,V]
    return rec, to_numpy(logits)


def apply_output_head(model, x) -> np.ndarray:
    """The model's final norm and output head applied to a residual stream x [B,T,D] -> logits [B,T,V]
    (the logit lens: what the model would predict if it stopped after this layer)."""
    x = ops.move(x, model.head_home)  # where the head is, in its dtype (devices.py)
    h = model._norm(x, model.weights["norm.weight"], model.weights.get("norm.bias"))  # [B,T,D]
    return to_numpy(ops.linear(h, model.output_weight))  # [B,T,D] @ [D,V] -> [B,T,V]


def softmax_np(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def logit_lens(model, rec: Recording) -> tuple[np.ndarray, np.ndarray]:
    """For each layer and position, the top token the final norm + output head give on that layer's
    output (residual_ffn): ids [L,T] and their probabilities [L,T]."""
    L = model.config.n_layers
    T = rec["tokens"].shape[1]
    top_ids = np.zeros((L, T), dtype=np.int64)
    top_p = np.zeros((L, T), dtype=np.float32)
    for i in range(L):  # one layer at a time: [1,T,V] is the only large array alive
        p = softmax_np(apply_output_head(model, rec.at(i, "residual_ffn"))[0].astype(np.float64))  # [T,V]
        top_ids[i] = np.argmax(p, axis=-1)
        top_p[i] = p[np.arange(T), top_ids[i]]
    return top_ids, top_p


# --- checking the options --------------------------------------------------------------------

def check_indices(cfg, layer: int, head: int, top: int) -> None:
    """One-line errors for a layer or head the model does not have."""
    if not isinstance(layer, int) or not 0 <= layer < cfg.n_layers:
        raise ValueError(f"--layer {layer} does not exist: this model has layers 0..{cfg.n_layers - 1}")
    if not isinstance(head, int) or not 0 <= head < cfg.n_heads:
        raise ValueError(f"--head {head} does not exist: this model has query heads 0..{cfg.n_heads - 1}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"--top must be a positive integer, got {top!r}")


def prompt_to_ids(model, prompt: str, max_tokens: int) -> list[int]:
    """Token ids of the prompt (with BOS when the model wants one), bounded by max_tokens."""
    from ..generate import prompt_ids

    if not isinstance(prompt, str) or prompt == "":
        raise PromptError("empty prompt: give some text to explain")
    if model.tokenizer is None:
        raise PromptError("this model has no tokenizer, so it cannot read a text prompt")
    ids = prompt_ids(model, prompt)
    if len(ids) > max_tokens:
        raise PromptError(f"the prompt is {len(ids)} tokens, more than --max-tokens {max_tokens} "
                          "(attention maps grow with its square); shorten it or raise --max-tokens")
    if len(ids) > model.config.max_seq_len:
        raise PromptError(f"the prompt is {len(ids)} tokens but the model's context holds {model.config.max_seq_len}")
    return ids


# --- formatting helpers ----------------------------------------------------------------------

def num(v) -> str:
    v = float(v)
    if math.isinf(v):
        return "-inf" if v < 0 else "inf"
    return f"{v: .4f}"


def vec(a, n: int = VEC) -> str:
    """'[ 0.1234, -0.5678, …]  (6 of 576)'."""
    a = np.asarray(a).reshape(-1)
    body = ", ".join(num(x) for x in a[:n])
    return f"[{body}{', …' if a.size > n else ''}]" + (f"  ({min(n, a.size)}/{a.size})" if a.size > n else "")


def mat(a, rows: int = ROWS, cols: int = VEC, row_labels=None) -> list[str]:
    """A corner of a matrix as aligned text lines."""
    a = np.asarray(a)
    labels = [str(x) for x in (row_labels or range(a.shape[0]))]
    w = max(len(x) for x in labels[:rows]) if labels else 0
    out = []
    for r in range(min(rows, a.shape[0])):
        cells = " ".join(f"{num(x):>9}" for x in a[r, :cols])
        out.append(f"{labels[r]:>{w}} │{cells}{' …' if a.shape[1] > cols else ''}")
    if a.shape[0] > rows:
        out.append(f"{'':>{w}}  ⋮")
    return out


def show_piece(tok, i: int) -> str:
    """A token as readable quoted text ('the', ' answer', '\\n')."""
    text = piece_text(tok, i)
    return f"<{int(i)}>" if text is None else repr(text)


def piece_text(tok, i: int) -> str | None:
    """The text of token i, or None when there is no tokenizer or it has no such id (a model's
    embedding table may have more rows than its tokenizer has tokens)."""
    if tok is None or not 0 <= int(i) < tok.vocab_size:
        return None
    try:
        return tok.id_to_piece(int(i))
    except ValueError:
        return None


def dims(letters, shape) -> str:
    """'[B=1, T=16, D=576]': the shape letters with the model's real numbers."""
    return "[" + ", ".join(f"{k}={v}" for k, v in zip(letters, shape)) + "]"


def rms(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(np.sqrt(np.mean(x * x)))


# --- steps -----------------------------------------------------------------------------------

@dataclass
class Step:
    """One step of the walkthrough: a title, formulas, real shapes, a slice of values, notes, a table."""

    key: str
    title: str
    formula: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Walkthrough:
    """The explained forward: model, prompt ids, the recording, the steps and the logit lens."""

    model: object
    prompt: str
    ids: list[int]
    rec: Recording
    logits: np.ndarray  # [1,T,V] as the forward returned it
    layer: int
    head: int
    top: int
    lang: str
    steps: list[Step]
    lens_ids: np.ndarray  # [L,T]
    lens_p: np.ndarray  # [L,T]
    top_tokens: list[tuple[int, float, float]]  # (id, logit, probability), best first


def build(model, prompt: str, *, layer: int = 0, head: int = 0, top: int = 10, lang: str = "en",
          max_tokens: int = 64) -> Walkthrough:
    """Check the options, run the one recorded forward and turn it into steps."""
    if lang not in ("en", "zh"):
        raise ValueError(f"--lang must be 'en' or 'zh', got {lang!r}")
    cfg = model.config
    check_indices(cfg, layer, head, top)
    ids = prompt_to_ids(model, prompt, max_tokens)
    rec, logits = record_forward(model, ids, layer)
    lens_ids, lens_p = logit_lens(model, rec)
    last = logits[0, -1].astype(np.float64)  # [V]
    p = softmax_np(last)
    k = min(top, last.shape[0])
    best = np.argsort(-last, kind="stable")[:k]
    top_tokens = [(int(i), float(last[i]), float(p[i])) for i in best]
    w = Walkthrough(model, prompt, ids, rec, logits, layer, head, top, lang, [], lens_ids, lens_p, top_tokens)
    w.steps = _steps(w)
    return w


def _steps(w: Walkthrough) -> list[Step]:
    m, cfg, rec, lang = w.model, w.model.config, w.rec, w.lang
    t = lambda key, **kw: msg(key, lang, **kw)  # noqa: E731
    tok = m.tokenizer
    gpt2 = cfg.arch == "gpt2"
    D, H, K, Hd, F, V, L = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim, cfg.vocab_size, cfg.n_layers
    G = H // K
    ids = w.ids
    T = len(ids)
    p = T - 1  # the last position: it sees every token and predicts the next one
    li, h = w.layer, w.head
    kv = h // G
    pieces = [show_piece(tok, i) for i in ids]
    plabel = [f"{j} {pieces[j]}" for j in range(T)]
    lay = lambda name: rec.at(li, name)  # noqa: E731
    sh = lambda name, a: f"{name} {dims(DIMS[name.split('.', 2)[-1] if name.startswith('layers.') else name], a.shape)}"  # noqa: E731
    norm_name = "LayerNorm" if gpt2 else "RMSNorm"
    steps: list[Step] = []

    # 1. the model
    rows = [["D", t("cfg_dim"), str(D)], ["L", t("cfg_layers"), str(L)], ["H", t("cfg_heads"), str(H)],
            ["K", t("cfg_kv_heads"), str(K)], ["Hd", t("cfg_head_dim"), str(Hd)], ["F", t("cfg_ffn"), str(F)],
            ["V", t("cfg_vocab"), str(V)], ["", t("cfg_context"), str(cfg.max_seq_len)],
            ["", t("cfg_params"), f"{cfg.n_params:,}"]]
    if not gpt2:
        rows.append(["", t("cfg_rope_theta"), f"{cfg.rope_theta:g}"])
    steps.append(Step("model", t("step_model"), table=([t("col_letter"), t("col_meaning"), t("col_value")], rows),
                      notes=[t("arch_gpt2" if gpt2 else "arch_llama"),
                             t("model_source", source=m.info.get("name") or m.info.get("source") or "?")]))

    # 2. tokenization
    trow = [[str(j), str(i), pieces[j]] for j, i in enumerate(ids)]
    notes = [t("tokens_note", T=T)]
    if tok is not None and tok.bos_id is not None and ids and ids[0] == tok.bos_id:
        notes.append(t("tokens_bos", piece=pieces[0]))
    steps.append(Step("tokens", t("step_tokens"), formula=["ids = BPE(text)"],
                      shapes=[f"text ({len(w.prompt)} chars) → {sh('tokens', rec['tokens'])}"],
                      table=([t("col_pos"), t("col_id"), t("col_piece")], trow), notes=notes))

    # 3. embedding (and GPT-2's learned positions)
    emb = rec["embedding"]
    steps.append(Step("embedding", t("step_embedding"), formula=[f"x = E[ids]        E: [V, D] = [{V}, {D}]"],
                      shapes=[f"{sh('tokens', rec['tokens'])} → {sh('embedding', emb)}"],
                      values=mat(emb[0], row_labels=plabel), notes=[t("embedding_note", D=D)]))
    if gpt2:
        pos, x0 = rec["pos_embedding"], rec["embedding+pos"]
        steps.append(Step("positions", t("step_positions"),
                          formula=[f"x = E[ids] + P[0..T−1]        P: [ctx, D] = [{cfg.max_seq_len}, {D}]"],
                          shapes=[f"{sh('embedding', emb)} + {sh('pos_embedding', pos)} → {sh('embedding+pos', x0)}"],
                          values=["P[0..]:"] + mat(pos, row_labels=list(range(T))) + ["x:"] + mat(x0[0], row_labels=plabel),
                          notes=[t("positions_note")]))
    else:
        x0 = emb

    # 4. into the chosen layer
    x_in = x0 if li == 0 else rec.at(li - 1, "residual_ffn")
    steps.append(Step("layer", t("step_layer", layer=li, L=L), shapes=[f"x {dims(BTD, x_in.shape)}"],
                      notes=[t("layer_note", layer=li, L=L)]))

    # 5. attention norm
    steps.append(_norm_step(t, "attn_norm", t("step_attn_norm", norm=norm_name, layer=li), gpt2, cfg.norm_eps,
                            x_in[0, p], lay("attention_norm"), p, pieces[p], "attention_norm",
                            f"layers.{li}.attention_norm.weight"))

    # 6. q, k, v projections and heads
    q, k, v = lay("q"), lay("k"), lay("v")
    b = " + b" if gpt2 else ""
    groups = [[str(j), ", ".join(str(g) for g in range(j * G, (j + 1) * G))] for j in range(K)]
    steps.append(Step(
        "qkv", t("step_qkv", layer=li),
        formula=[f"q = y·Wqᵀ{b}   k = y·Wkᵀ{b}   v = y·Wvᵀ{b}",
                 f"[B,T,H·Hd] → [B,T,H,Hd]:  {H * Hd} = {H}·{Hd};   [B,T,K·Hd] → [B,T,K,Hd]:  {K * Hd} = {K}·{Hd}"],
        shapes=[f"y {dims(BTD, lay('attention_norm').shape)} @ Wqᵀ [D={D}, H·Hd={H * Hd}] → {sh('q', q)}",
                f"y @ Wkᵀ [D={D}, K·Hd={K * Hd}] → {sh('k', k)}",
                f"y @ Wvᵀ [D={D}, K·Hd={K * Hd}] → {sh('v', v)}"],
        values=[f"q[{p}, head {h}]    = {vec(q[0, p, h])}", f"k[{p}, kv head {kv}] = {vec(k[0, p, kv])}",
                f"v[{p}, kv head {kv}] = {vec(v[0, p, kv])}"],
        table=([t("col_kv_head"), t("col_query_heads")], groups),
        notes=[t("gqa_note", H=H, K=K, G=G) if G > 1 else t("mha_note", H=H), t("head_note", h=h, kv=kv)]))

    # 7. RoPE (Llama) — GPT-2 added its positions at the input instead
    if not gpt2:
        inv, cos, sin = rec["rope.inv_freq"], rec["rope.cos"], rec["rope.sin"]
        qr, kr = lay("q_rope"), lay("k_rope")
        npair = inv.shape[0]
        cols = sorted({0, 1, 2, npair // 2, npair - 1})
        angle = np.arange(T, dtype=np.float64)[:, None] * inv.astype(np.float64)[None, :]  # m·θ_i [T,Hd/2]
        show_pos = sorted({0, 1, min(2, p), p})
        arows = [[str(mm)] + [f"{angle[mm, c]:.4f}" for c in cols] + [f"{cos[mm, 1]:.4f}", f"{sin[mm, 1]:.4f}"]
                 for mm in show_pos]
        x0q, x1q = q[0, p, h, 0:2]
        y0q, y1q = qr[0, p, h, 0:2]
        formula = [f"θ_i = base^(−2i/Hd)   i = 0..{npair - 1}   base = {cfg.rope_theta:g}",
                   "angle(m, i) = m · θ_i        (m = position)",
                   "(x₂ᵢ, x₂ᵢ₊₁) → (x₂ᵢ·cos − x₂ᵢ₊₁·sin,  x₂ᵢ·sin + x₂ᵢ₊₁·cos)"]
        notes = [t("rope_note"), t("rope_pairs_note", Hd=Hd, half=Hd // 2)]
        if cfg.rope_scaling:
            notes.append(t("rope_scaling_note", kind=cfg.rope_scaling.get("rope_type")))
        steps.append(Step(
            "rope", t("step_rope", layer=li), formula=formula,
            shapes=[f"{sh('rope.inv_freq', inv)} → cos, sin {dims(DIMS['rope.cos'], cos.shape)}",
                    f"{sh('q', q)} → {sh('q_rope', qr)}", f"{sh('k', k)} → {sh('k_rope', kr)}"],
            values=[f"θ = {vec(inv, 4)} … θ_{npair - 1} = {float(inv[-1]):.3g}",
                    t("rope_pair_value", p=p, h=h),
                    f"  ({x0q: .4f}, {x1q: .4f})  —{angle[p, 0]:.4f} rad→  ({y0q: .4f}, {y1q: .4f})",
                    t("rope_length", before=f"{math.hypot(x0q, x1q):.4f}", after=f"{math.hypot(y0q, y1q):.4f}")],
            table=([t("col_position")] + [f"m·θ_{c}" for c in cols] + ["cos(m·θ_1)", "sin(m·θ_1)"], arows),
            notes=notes))

    # 8. scores
    scores, probs, mask = lay("scores"), lay("probs"), rec["mask"] if "mask" in rec else None
    qn, kn = ("q", "k") if gpt2 else ("q_rope", "k_rope")
    s_by_hand = float(np.dot(lay(qn)[0, p, h].astype(np.float64), lay(kn)[0, 0, kv].astype(np.float64)) / math.sqrt(Hd))
    steps.append(Step(
        "scores", t("step_scores", layer=li),
        formula=[f"scores = q·kᵀ / √Hd = q·kᵀ / {math.sqrt(Hd):.4f}"],
        shapes=[f"q [B,H={H},T={T},Hd={Hd}] @ kᵀ [B,K={K},Hd={Hd},S={T}] → {sh('scores', scores)}"],
        values=[t("matrix_of_head", h=h)] + mat(scores[0, h], row_labels=plabel)
        + [t("score_by_hand", p=p, h=h, s=0, q=qn, k=kn, kv=kv, value=f"{s_by_hand:.4f}",
             recorded=num(scores[0, h, p, 0]).strip())],
        notes=[t("scores_note", G=G), t("scores_masked_note")]))

    # 9. causal mask
    if mask is not None:
        steps.append(Step("mask", t("step_mask"), formula=["mask[t, s] = 0 if s ≤ t else −∞"],
                          shapes=[sh("mask", mask)], values=mat(mask, rows=5, cols=5), notes=[t("mask_note")]))

    # 10. softmax
    row = probs[0, h, p]
    best = int(np.argmax(row))
    steps.append(Step(
        "softmax", t("step_softmax", layer=li), formula=["p = softmax(scores + mask) = exp(s − max s) / Σ exp(s − max s)"],
        shapes=[f"{sh('scores', scores)} → {sh('probs', probs)}"],
        values=[t("matrix_of_head", h=h)] + mat(probs[0, h], row_labels=plabel)
        + [t("row_sum", p=p, total=f"{float(row.astype(np.float64).sum()):.6f}")],
        notes=[t("softmax_note"), t("attends_most", h=h, p=p, piece=pieces[p], s=best, spiece=pieces[best],
                                    prob=f"{float(row[best]):.3f}")]))

    # 11. weighted sum of values
    heads = lay("heads")
    steps.append(Step(
        "weighted", t("step_weighted", layer=li), formula=[f"out_h = p_h · v_(h // G)     G = {G}"],
        shapes=[f"{sh('probs', probs)} @ v [B,K={K},S={T},Hd={Hd}] → {sh('heads', heads)}"],
        values=[f"out[head {h}, {p}] = {vec(heads[0, h, p])}"], notes=[t("weighted_note")]))

    # 12. output projection
    ao = lay("attention_output")
    steps.append(Step(
        "wo", t("step_wo", layer=li), formula=["a = concat(out_0 … out_{H−1}) · Woᵀ" + (" + b" if gpt2 else "")],
        shapes=[f"{sh('heads', heads)} → [B,T,H·Hd={H * Hd}] @ Woᵀ [H·Hd={H * Hd}, D={D}] → a {dims(BTD, ao.shape)}"],
        values=[f"a[{p}] = {vec(ao[0, p])}"], notes=[t("wo_note")]))

    # 13. residual
    xa = lay("residual_attention")
    steps.append(Step(
        "residual_attention", t("step_residual", layer=li), formula=["x ← x + a"],
        shapes=[f"x {dims(BTD, x_in.shape)} + a {dims(BTD, ao.shape)} → x {dims(BTD, xa.shape)}"],
        values=[f"x[{p}] = {vec(x_in[0, p])}", f"a[{p}] = {vec(ao[0, p])}", f"x + a = {vec(xa[0, p])}"],
        notes=[t("residual_note")]))

    # 14. ffn norm
    steps.append(_norm_step(t, "ffn_norm", t("step_ffn_norm", norm=norm_name, layer=li), gpt2, cfg.norm_eps,
                            xa[0, p], lay("ffn_norm"), p, pieces[p], "ffn_norm", f"layers.{li}.ffn_norm.weight"))

    # 15. feed-forward
    up, act, down = lay("ffn_up"), lay("ffn_act"), lay("ffn_down")
    if gpt2:
        steps.append(Step(
            "ffn", t("step_ffn_gelu", layer=li),
            formula=["f = gelu(y·W1ᵀ + b1) · W2ᵀ + b2",
                     "gelu(z) ≈ 0.5·z·(1 + tanh(√(2/π)·(z + 0.044715·z³)))"],
            shapes=[f"y {dims(BTD, lay('ffn_norm').shape)} @ W1ᵀ [D={D}, F={F}] → {sh('ffn_up', up)}",
                    f"gelu → {sh('ffn_act', act)} @ W2ᵀ [F={F}, D={D}] → {sh('ffn_down', down)}"],
            values=[f"y·W1ᵀ + b1 = {vec(up[0, p])}", f"gelu(…)   = {vec(act[0, p])}", f"f         = {vec(down[0, p])}"],
            notes=[t("gelu_note", F=F, D=D)]))
    else:
        gate = lay("ffn_gate")
        steps.append(Step(
            "ffn", t("step_ffn_swiglu", layer=li),
            formula=["f = (silu(y·W1ᵀ) ⊙ (y·W3ᵀ)) · W2ᵀ", "silu(z) = z · σ(z) = z / (1 + e^(−z))"],
            shapes=[f"y {dims(BTD, lay('ffn_norm').shape)} @ W1ᵀ, W3ᵀ [D={D}, F={F}] → gate, up {dims(DIMS['ffn_up'], up.shape)}",
                    f"silu(gate) ⊙ up → {sh('ffn_act', act)} @ W2ᵀ [F={F}, D={D}] → {sh('ffn_down', down)}"],
            values=[f"gate = y·W1ᵀ = {vec(gate[0, p])}", f"up   = y·W3ᵀ = {vec(up[0, p])}",
                    f"silu(gate)⊙up = {vec(act[0, p])}", f"f    = {vec(down[0, p])}"],
            notes=[t("swiglu_note", F=F, D=D)]))

    # 16. second residual: the layer's output
    xo = lay("residual_ffn")
    steps.append(Step(
        "residual_ffn", t("step_residual2", layer=li), formula=["x ← x + f"],
        shapes=[f"x {dims(BTD, xa.shape)} + f {dims(BTD, down.shape)} → x {dims(BTD, xo.shape)}"],
        values=[f"x[{p}] = {vec(xo[0, p])}"], notes=[t("layer_out_note", layer=li)]))

    # 17. all layers, summarised from the residual stream
    lrows = []
    for i in range(L):
        xin = x0 if i == 0 else rec.at(i - 1, "residual_ffn")
        lid = int(w.lens_ids[i, p])
        lrows.append([f"{i}{' *' if i == li else ''}", f"{rms(xin[0, p]):.3f}", f"{rms(rec.at(i, 'attention_output')[0, p]):.3f}",
                      f"{rms(rec.at(i, 'ffn_down')[0, p]):.3f}", f"{rms(rec.at(i, 'residual_ffn')[0, p]):.3f}",
                      f"{show_piece(tok, lid)} ({w.lens_p[i, p]:.2f})"])
    steps.append(Step(
        "layers", t("step_layers", L=L), formula=[f"for i in 0..{L - 1}:  x ← x + attention_i(norm(x));  x ← x + ffn_i(norm(x))"],
        shapes=[f"x {dims(BTD, x0.shape)} → … → x {dims(BTD, rec.at(L - 1, 'residual_ffn').shape)}"],
        table=([t("col_layer"), t("col_rms_in"), t("col_rms_attn"), t("col_rms_ffn"), t("col_rms_out"), t("col_lens")], lrows),
        notes=[t("layers_note", p=p, piece=pieces[p], layer=li)]))

    # 18. final norm
    fn = rec["norm"]
    steps.append(_norm_step(t, "final_norm", t("step_final_norm", norm=norm_name), gpt2, cfg.norm_eps,
                            rec.at(L - 1, "residual_ffn")[0, p], fn, p, pieces[p], "norm", "norm.weight"))

    # 19. output head
    lg = w.logits
    wname = "E" if cfg.tie_embeddings else "Wout"
    steps.append(Step(
        "output", t("step_output"), formula=[f"logits = y · {wname}ᵀ"],
        shapes=[f"y {dims(BTD, fn.shape)} @ {wname}ᵀ [D={D}, V={V}] → {sh('logits', lg)}"],
        values=[f"logits[{p}] = {vec(lg[0, p])}"],
        notes=[t("tied_note" if cfg.tie_embeddings else "untied_note"), t("output_note", p=p)]))

    # 20. top-K next tokens
    krows = [[str(r + 1), str(i), show_piece(tok, i), f"{lo:.3f}", f"{pr:.4f}"] for r, (i, lo, pr) in enumerate(w.top_tokens)]
    best_id, _, best_p = w.top_tokens[0]
    steps.append(Step(
        "top", t("step_top", k=len(w.top_tokens)), formula=["P(next) = softmax(logits[T−1]) = exp(z − max z) / Σ exp(z − max z)"],
        shapes=[f"logits[T−1] [V={V}] → P [V={V}]"],
        table=([t("col_rank"), t("col_id"), t("col_piece"), t("col_logit"), t("col_prob")], krows),
        notes=[t("top_note", piece=show_piece(tok, best_id), prob=f"{best_p:.1%}")]))
    return steps


def _norm_step(t, key, title, gpt2, eps, x, y_all, p, piece, yname, wname) -> Step:
    """RMSNorm (Llama) or LayerNorm (GPT-2) on the vector of position p, with its statistics."""
    y = y_all[0, p]
    if gpt2:
        xd = np.asarray(x, dtype=np.float64)
        formula = [f"y = (x − mean(x)) / √(var(x) + ε) · w + b        ε = {eps:g}"]
        stats = t("norm_stats_ln", mean=f"{xd.mean():.4f}", std=f"{math.sqrt(xd.var() + eps):.4f}")
        notes = [t("layernorm_note")]
    else:
        formula = [f"y = x / √(mean(x²) + ε) · w        ε = {eps:g}"]
        stats = t("norm_stats_rms", rms=f"{math.sqrt(rms(x) ** 2 + eps):.4f}")
        notes = [t("rmsnorm_note")]
    return Step(key, title, formula=formula,
                shapes=[f"x {dims(BTD, y_all.shape)} → {yname} {dims(BTD, y_all.shape)}    w: {wname} [D={y_all.shape[-1]}]"],
                values=[t("at_position", p=p, piece=piece), f"x = {vec(x)}", stats, f"y = {vec(y)}"], notes=notes)


# --- rendering for the terminal ----------------------------------------------------------------

def _width(s: str) -> int:
    """Terminal columns of a string: CJK characters take two."""
    return sum(2 if 0x1100 <= ord(c) <= 0x115F or 0x2E80 <= ord(c) <= 0xFFDC else 1 for c in s)


def _table_lines(header, rows) -> list[str]:
    width = _width
    cols = len(header)
    ws = [max(width(str(r[c])) for r in [header] + rows) for c in range(cols)]
    pad = lambda s, n: str(s) + " " * (n - width(str(s)))  # noqa: E731
    lines = ["  ".join(pad(header[c], ws[c]) for c in range(cols)).rstrip(),
             "  ".join("─" * ws[c] for c in range(cols))]
    lines += ["  ".join(pad(r[c], ws[c]) for c in range(cols)).rstrip() for r in rows]
    return lines


def render_text(w: Walkthrough, width: int = 100, intro: str | None = None) -> str:
    """The whole walkthrough as terminal text (`intro`: another first paragraph, as seq2seq's)."""
    t = lambda key, **kw: msg(key, w.lang, **kw)  # noqa: E731
    out = [intro if intro is not None else t("intro", prompt=repr(w.prompt), T=len(w.ids), layer=w.layer, head=w.head), ""]
    n = len(w.steps)
    for i, s in enumerate(w.steps, 1):
        head = f"━━ {i}/{n}  {s.title} "
        out.append(head + "━" * max(3, width - _width(head)))
        for f in s.formula:
            out.append(f"  {t('label_formula'):<8}  {f}" if f is s.formula[0] else f"  {'':<8}  {f}")
        for j, x in enumerate(s.shapes):
            out.append(f"  {t('label_shapes') if j == 0 else '':<8}  {x}")
        if s.values:
            out.append(f"  {t('label_values')}")
            out += ["    " + v for v in s.values]
        if s.table:
            out += ["    " + x for x in _table_lines(*s.table)]
        for note in s.notes:
            wrapped = textwrap.wrap(note, width - 4) if w.lang == "en" else [note]
            out += ["  " + x for x in wrapped]
        out.append("")
    return "\n".join(out)
