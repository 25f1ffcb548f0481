"""The classic encoder-decoder Transformer ("Attention Is All You Need", 2017), forward and backward.

    >>> from scratchlm.seq2seq import Seq2SeqConfig, Seq2Seq, init_weights          # doctest: +SKIP
    >>> cfg = Seq2SeqConfig(dim=64, n_heads=4, n_enc_layers=2, n_dec_layers=2, ffn_dim=256, vocab_size=40)
    >>> model = Seq2Seq(cfg, init_weights(cfg, seed=0), tokenizer)
    >>> model.translate("March 5, 2019", beam=4)                                  # '2019-03-05' once trained

Encoder: source embedding * sqrt(D) + sinusoidal positions, then layers of self-attention (padding
mask) and a ReLU feed-forward block. Decoder: target embedding * sqrt(D) + positions, then layers of
causal self-attention, cross-attention to the encoder's output (the "memory", source padding masked)
and the feed-forward block; a final linear layer gives the logits [B,T,V].

Each sublayer is post-LN as in the paper, x = LN(x + f(x)), or pre-LN (norm_first=True),
x = x + f(LN(x)). Like torch.nn.Transformer, the encoder and the decoder each end with one more
LayerNorm (encoder.norm, decoder.norm) in both placements.

Weights: a flat dict keyed exactly like torch.nn.Transformer's state_dict (encoder.layers.{i}.self_attn
.in_proj_weight [3D,D] with q, k, v stacked, .out_proj.weight, .linear1/.linear2, .norm1/2/3, ...), so
`model.load_state_dict` takes them as they are, plus our three names around it:

    embed.weight                 [V, D]  shared_embeddings: one table for source, target (and output)
    src_embed.weight, tgt_embed.weight   the two tables otherwise
    output.weight                [V, D]  the output projection, absent when tie_output (it is then the
                                         target table, as in the paper's section 3.4)

Dropout is left out: training here is deterministic, and the reference tests run torch with dropout 0.
Shapes: B batch, S source positions, T target positions, D model dim, H heads, Hd head dim, F ffn hidden,
V vocab. The math is NumPy (float32 or float64, whichever the weights are).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from . import ops
from .errors import FormatError, PromptError


@dataclass
class Seq2SeqConfig:
    dim: int = 128
    n_heads: int = 4
    n_enc_layers: int = 2
    n_dec_layers: int = 2
    ffn_dim: int = 512
    vocab_size: int = 64
    max_seq_len: int = 64  # longest source and longest target (with its BOS / EOS), in tokens
    norm_first: bool = False  # False: post-LN as in the paper; True: pre-LN
    shared_embeddings: bool = True  # one embedding table for source and target
    tie_output: bool = True  # the output projection is the target embedding table
    norm_eps: float = 1e-5
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    arch: str = "seq2seq"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_layers(self) -> int:
        return self.n_enc_layers + self.n_dec_layers

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in expected_shapes(self).values())

    def validate(self) -> None:
        for n in ("dim", "n_heads", "n_enc_layers", "n_dec_layers", "ffn_dim", "vocab_size", "max_seq_len"):
            v = getattr(self, n)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 24:
                raise FormatError(f"seq2seq config: {n} must be a positive integer, got {v!r}")
        if self.dim % self.n_heads or self.dim % 2:
            raise FormatError(f"seq2seq config: dim {self.dim} must be even and a multiple of n_heads {self.n_heads}")
        for n in ("pad_id", "bos_id", "eos_id"):
            v = getattr(self, n)
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                raise FormatError(f"seq2seq config: {n} {v!r} is not an id of the {self.vocab_size}-token vocabulary")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Seq2SeqConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FormatError(f"seq2seq config: unknown field {unknown[0]!r}")
        cfg = cls(**d)
        cfg.validate()
        return cfg


def expected_shapes(cfg: Seq2SeqConfig) -> dict:
    """Every weight's name and shape, in a fixed order (the same seed gives the same model)."""
    D, F, V = cfg.dim, cfg.ffn_dim, cfg.vocab_size
    s = {}
    if cfg.shared_embeddings:
        s["embed.weight"] = (V, D)
    else:
        s["src_embed.weight"] = (V, D)
        s["tgt_embed.weight"] = (V, D)

    def attn(p):
        s[p + "in_proj_weight"] = (3 * D, D)
        s[p + "in_proj_bias"] = (3 * D,)
        s[p + "out_proj.weight"] = (D, D)
        s[p + "out_proj.bias"] = (D,)

    def ffn_and_norms(p, n_norms):
        s[p + "linear1.weight"], s[p + "linear1.bias"] = (F, D), (F,)
        s[p + "linear2.weight"], s[p + "linear2.bias"] = (D, F), (D,)
        for j in range(1, n_norms + 1):
            s[p + f"norm{j}.weight"], s[p + f"norm{j}.bias"] = (D,), (D,)

    for i in range(cfg.n_enc_layers):
        attn(f"encoder.layers.{i}.self_attn.")
        ffn_and_norms(f"encoder.layers.{i}.", 2)
    s["encoder.norm.weight"], s["encoder.norm.bias"] = (D,), (D,)
    for i in range(cfg.n_dec_layers):
        attn(f"decoder.layers.{i}.self_attn.")
        attn(f"decoder.layers.{i}.multihead_attn.")
        ffn_and_norms(f"decoder.layers.{i}.", 3)
    s["decoder.norm.weight"], s["decoder.norm.bias"] = (D,), (D,)
    if not cfg.tie_output:
        s["output.weight"] = (V, D)
    return s


def check_weights(cfg: Seq2SeqConfig, weights: dict, source: str) -> None:
    """Strict: exactly the tensors the config implies, each with its shape."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in weights]
    if missing:
        raise FormatError(f"{source}: missing tensor {missing[0]} (expected {list(want[missing[0]])})")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise FormatError(f"{source}: unexpected tensor {extra[0]} for this seq2seq config")
    for n, shape in want.items():
        if tuple(weights[n].shape) != shape:
            raise FormatError(f"{source}: {n} has shape {list(weights[n].shape)}, expected {list(shape)}")


def init_weights(cfg: Seq2SeqConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Xavier-uniform matrices (torch.nn.Transformer's own reset), embeddings N(0, D^-1/2) so that
    embedding * sqrt(D) has unit scale, biases 0, LayerNorms at 1."""
    rng = np.random.Generator(np.random.PCG64(seed))
    w = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("bias"):
            w[name] = np.zeros(shape, dtype)
        elif ".norm" in name or name.startswith(("encoder.norm", "decoder.norm")):
            w[name] = np.ones(shape, dtype)
        elif "embed" in name or name == "output.weight":
            w[name] = (rng.standard_normal(shape) * cfg.dim ** -0.5).astype(dtype)
        else:
            a = math.sqrt(6.0 / (shape[0] + shape[1]))
            w[name] = rng.uniform(-a, a, size=shape).astype(dtype)
    return w


# --- the table names ----------------------------------------------------------------------------

def src_table(cfg) -> str:
    return "embed.weight" if cfg.shared_embeddings else "src_embed.weight"


def tgt_table(cfg) -> str:
    return "embed.weight" if cfg.shared_embeddings else "tgt_embed.weight"


def out_table(cfg) -> str:
    return tgt_table(cfg) if cfg.tie_output else "output.weight"


def _add(grads: dict, name: str, g) -> None:
    """grads[name] += g, the first use storing g itself (a table used twice gets both gradients)."""
    if name in grads:
        grads[name] = grads[name] + g
    else:
        grads[name] = g


# --- pieces: embedding, attention, feed-forward, sublayer ----------------------------------------

def embed(w, name: str, ids, pe):
    """table[ids] * sqrt(D) + pe[:T]: ids [B,T] -> [B,T,D]."""
    x = ops.embedding(w[name], ids)  # [B,T] -> [B,T,D]
    D = x.shape[-1]
    return x * np.asarray(math.sqrt(D), x.dtype) + pe[:ids.shape[1]]  # [B,T,D] + [T,D]


def embed_backward(dx, ids, V: int):
    """Gradient of embed with respect to its table: [V, D] (the positions have no parameters)."""
    return ops.embedding_backward(dx * np.asarray(math.sqrt(dx.shape[-1]), dx.dtype), ids, V)


def mha(w, p: str, xq, xkv, H: int, mask=None, record=None):
    """Multi-head attention in torch.nn.MultiheadAttention's layout: q = xq Wq^T + bq, k and v from xkv
    (the same array for self-attention, the encoder's memory for cross-attention), softmax(q k^T /
    sqrt(Hd) + mask) v per head, then out_proj. xq [B,T,D], xkv [B,S,D] -> ([B,T,D], saved)."""
    W, b = w[p + "in_proj_weight"], w[p + "in_proj_bias"]  # [3D,D], [3D]
    B, T, D = xq.shape
    S = xkv.shape[1]
    Hd = D // H
    if xkv is xq:
        qkv = ops.linear(xq, W, b)  # [B,T,D] @ [D,3D] -> [B,T,3D]: one product for q, k and v
        q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    else:
        q = ops.linear(xq, W[:D], b[:D])  # [B,T,D] @ [D,D] -> [B,T,D]
        kv = ops.linear(xkv, W[D:], b[D:])  # [B,S,D] @ [D,2D] -> [B,S,2D]
        k, v = kv[..., :D], kv[..., D:]
    qh = q.reshape(B, T, H, Hd).transpose(0, 2, 1, 3)  # [B,T,D] -> [B,H,T,Hd]
    kh = k.reshape(B, S, H, Hd).transpose(0, 2, 1, 3)  # [B,S,D] -> [B,H,S,Hd]
    vh = v.reshape(B, S, H, Hd).transpose(0, 2, 1, 3)  # [B,S,D] -> [B,H,S,Hd]
    kept = {}

    def keep(name, a):  # the probabilities, for the backward and for the explain walkthrough
        kept[name] = a
        if record is not None:
            record(name, a)

    heads = ops.attention(qh, kh, vh, mask, record=keep, record_scores=False)  # [B,H,T,Hd]
    o = heads.transpose(0, 2, 1, 3).reshape(B, T, D)  # [B,H,T,Hd] -> [B,T,H,Hd] -> [B,T,D]
    y = ops.linear(o, w[p + "out_proj.weight"], w[p + "out_proj.bias"])  # [B,T,D] @ [D,D] -> [B,T,D]
    return y, (xq, xkv, qh, kh, vh, kept["probs"], o)


def mha_backward(dy, w, p: str, saved, grads: dict, self_attention: bool):
    """Gradients of mha from dy [B,T,D]: returns (dxq, dxkv) and adds the four weight gradients to grads.
    For self-attention dxkv is None and dxq holds both uses of x."""
    xq, xkv, qh, kh, vh, probs, o = saved
    B, T, D = xq.shape
    S = xkv.shape[1]
    H, Hd = qh.shape[1], qh.shape[3]
    do, dWo, dbo = ops.linear_backward(dy, o, w[p + "out_proj.weight"], bias=True)  # [B,T,D]
    dheads = do.reshape(B, T, H, Hd).transpose(0, 2, 1, 3)  # [B,T,D] -> [B,H,T,Hd]
    dqh, dkh, dvh = ops.attention_backward(dheads, qh, kh, vh, probs)  # [B,H,T,Hd], [B,H,S,Hd] x2
    dq = dqh.transpose(0, 2, 1, 3).reshape(B, T, D)  # [B,H,T,Hd] -> [B,T,D]
    dk = dkh.transpose(0, 2, 1, 3).reshape(B, S, D)  # [B,H,S,Hd] -> [B,S,D]
    dv = dvh.transpose(0, 2, 1, 3).reshape(B, S, D)
    W = w[p + "in_proj_weight"]
    if self_attention:
        dqkv = np.concatenate([dq, dk, dv], axis=-1)  # [B,T,3D]
        dx, dW, db = ops.linear_backward(dqkv, xq, W, bias=True)  # [B,T,D], [3D,D], [3D]
        dxkv = None
    else:
        dx, dWq, dbq = ops.linear_backward(dq, xq, W[:D], bias=True)  # [B,T,D], [D,D], [D]
        dxkv, dWkv, dbkv = ops.linear_backward(np.concatenate([dk, dv], axis=-1), xkv, W[D:], bias=True)  # [B,S,D]
        dW, db = np.concatenate([dWq, dWkv]), np.concatenate([dbq, dbkv])  # [3D,D], [3D]
    _add(grads, p + "in_proj_weight", dW)
    _add(grads, p + "in_proj_bias", db)
    _add(grads, p + "out_proj.weight", dWo)
    _add(grads, p + "out_proj.bias", dbo)
    return dx, dxkv


def ffn(w, p: str, x):
    """linear2(relu(linear1(x))): [B,T,D] -> [B,T,F] -> [B,T,D]."""
    h = ops.relu(ops.linear(x, w[p + "linear1.weight"], w[p + "linear1.bias"]))  # [B,T,D] @ [D,F] -> [B,T,F]
    y = ops.linear(h, w[p + "linear2.weight"], w[p + "linear2.bias"])  # [B,T,F] @ [F,D] -> [B,T,D]
    return y, (x, h)


def ffn_backward(dy, w, p: str, saved, grads: dict):
    x, h = saved
    dh, dW2, db2 = ops.linear_backward(dy, h, w[p + "linear2.weight"], bias=True)  # [B,T,F]
    dh = ops.relu_backward(dh, h)
    dx, dW1, db1 = ops.linear_backward(dh, x, w[p + "linear1.weight"], bias=True)  # [B,T,D]
    for n, g in (("linear1.weight", dW1), ("linear1.bias", db1), ("linear2.weight", dW2), ("linear2.bias", db2)):
        _add(grads, p + n, g)
    return dx


def sublayer(x, f, w, norm: str, cfg):
    """One residual sublayer: LN(x + f(x)) (post-LN) or x + f(LN(x)) (pre-LN). f(x) -> (y, f_saved).
    Returns (out, saved)."""
    g, b = w[norm + ".weight"], w[norm + ".bias"]
    if cfg.norm_first:
        y, fs = f(ops.layer_norm(x, g, b, cfg.norm_eps))
        return x + y, (x, fs)
    y, fs = f(x)
    z = x + y  # [B,T,D]: the sum the norm sees
    return ops.layer_norm(z, g, b, cfg.norm_eps), (z, fs)


def sublayer_backward(dout, saved, f_backward, w, norm: str, cfg, grads: dict):
    """Gradient of sublayer: dx, with f_backward(dy, f_saved) -> d(f's input) doing f's part."""
    g = w[norm + ".weight"]
    if cfg.norm_first:
        x, fs = saved
        dn = f_backward(dout, fs)  # through f, to the norm's output
        dx_norm, dg, db = ops.layer_norm_backward(dn, x, g, cfg.norm_eps)
        dx = dout + dx_norm  # the residual path and the norm path
    else:
        z, fs = saved
        dz, dg, db = ops.layer_norm_backward(dout, z, g, cfg.norm_eps)
        dx = dz + f_backward(dz, fs)
    _add(grads, norm + ".weight", dg)
    _add(grads, norm + ".bias", db)
    return dx


# --- encoder, decoder, whole model ---------------------------------------------------------------

def encode(w, cfg, src, src_pad, record=None, keep: list | None = None):
    """The encoder: src [B,S] ids -> memory [B,S,D]. `keep`: a list the saved values go in, for the backward."""
    pe = ops.sinusoidal_encoding(src.shape[1], cfg.dim, w[src_table(cfg)].dtype)  # [S,D]
    x = embed(w, src_table(cfg), src, pe)  # [B,S,D]
    mask = ops.padding_mask(src_pad, x.dtype)  # [B,1,1,1,S]
    if record is not None:
        record("encoder.embedding+pos", x)
    for i in range(cfg.n_enc_layers):
        p = f"encoder.layers.{i}."
        rec = None if record is None else (lambda n, a, p=p: record(p + "self_attn." + n, a))
        x, s1 = sublayer(x, lambda h: mha(w, p + "self_attn.", h, h, cfg.n_heads, mask, rec), w, p + "norm1", cfg)
        x, s2 = sublayer(x, lambda h: ffn(w, p, h), w, p + "norm2", cfg)
        if record is not None:
            record(p + "output", x)
        if keep is not None:
            keep.append((s1, s2))
    if keep is not None:
        keep.append(x)
    mem = ops.layer_norm(x, w["encoder.norm.weight"], w["encoder.norm.bias"], cfg.norm_eps)  # [B,S,D]
    if record is not None:
        record("encoder.memory", mem)
    return mem


def decode(w, cfg, tgt, tgt_pad, mem, src_pad, record=None, keep: list | None = None):
    """The decoder: target inputs tgt [B,T] (BOS first), the memory [B,S,D] -> logits [B,T,V]."""
    pe = ops.sinusoidal_encoding(tgt.shape[1], cfg.dim, mem.dtype)  # [T,D]
    x = embed(w, tgt_table(cfg), tgt, pe)  # [B,T,D]
    T = tgt.shape[1]
    self_mask = ops.causal_mask(T, T).astype(x.dtype) + ops.padding_mask(tgt_pad, x.dtype)  # [T,T] + [B,1,1,1,T] -> [B,1,1,T,T]
    cross_mask = ops.padding_mask(src_pad, x.dtype)  # [B,1,1,1,S]
    if record is not None:
        record("decoder.embedding+pos", x)
    for i in range(cfg.n_dec_layers):
        p = f"decoder.layers.{i}."
        r1 = None if record is None else (lambda n, a, p=p: record(p + "self_attn." + n, a))
        r2 = None if record is None else (lambda n, a, p=p: record(p + "multihead_attn." + n, a))
        x, s1 = sublayer(x, lambda h: mha(w, p + "self_attn.", h, h, cfg.n_heads, self_mask, r1), w, p + "norm1", cfg)
        x, s2 = sublayer(x, lambda h: mha(w, p + "multihead_attn.", h, mem, cfg.n_heads, cross_mask, r2),
                         w, p + "norm2", cfg)
        x, s3 = sublayer(x, lambda h: ffn(w, p, h), w, p + "norm3", cfg)
        if record is not None:
            record(p + "output", x)
        if keep is not None:
            keep.append((s1, s2, s3))
    h = ops.layer_norm(x, w["decoder.norm.weight"], w["decoder.norm.bias"], cfg.norm_eps)  # [B,T,D]
    if keep is not None:
        keep.append((x, h))
    logits = ops.linear(h, w[out_table(cfg)])  # [B,T,D] @ [D,V] -> [B,T,V]
    if record is not None:
        record("logits", logits)
    return logits


def forward(w, cfg, src, tgt, src_pad=None, tgt_pad=None, record=None):
    """Logits [B,T,V] of target inputs tgt [B,T] given sources src [B,S]; pads default to id == pad_id."""
    src_pad = (src == cfg.pad_id) if src_pad is None else src_pad
    tgt_pad = (tgt == cfg.pad_id) if tgt_pad is None else tgt_pad
    mem = encode(w, cfg, src, src_pad, record=record)
    return decode(w, cfg, tgt, tgt_pad, mem, src_pad, record=record)


def masked_cross_entropy(logits, targets, ignore: int):
    """Mean of -log p(target) over the positions whose target is not `ignore` (padding): logits [B,T,V],
    targets [B,T] -> (loss, dlogits [B,T,V])."""
    keep = targets != ignore  # [B,T]
    n = int(keep.sum())
    if n == 0:
        raise ValueError("a batch with no target tokens")
    sel = logits[keep]  # [N,V]: the scored rows
    logp = ops.log_softmax(sel)  # [N,V]
    loss = float(ops.cross_entropy(sel, targets[keep], logp=logp))
    dlogits = np.zeros_like(logits)
    dlogits[keep] = ops.cross_entropy_backward(sel, targets[keep], logp=logp)  # [N,V] into [B,T,V]
    return loss, dlogits


def loss_and_grads(w, cfg, src, tgt_in, tgt_out, src_pad=None, tgt_pad=None):
    """Cross-entropy of predicting tgt_out [B,T] from (src [B,S], tgt_in [B,T]), pads in tgt_out ignored,
    and the gradient of every weight, by the hand-written backward below: (loss, {name: grad})."""
    src_pad = (src == cfg.pad_id) if src_pad is None else src_pad
    tgt_pad = (tgt_in == cfg.pad_id) if tgt_pad is None else tgt_pad
    enc_keep, dec_keep = [], []
    mem = encode(w, cfg, src, src_pad, keep=enc_keep)
    logits = decode(w, cfg, tgt_in, tgt_pad, mem, src_pad, keep=dec_keep)
    loss, dlogits = masked_cross_entropy(logits, tgt_out, cfg.pad_id)
    grads: dict = {}
    V = cfg.vocab_size

    # output projection and the decoder's final norm
    x_last, h = dec_keep.pop()
    dh, dWout, _ = ops.linear_backward(dlogits, h, w[out_table(cfg)])  # [B,T,D], [V,D]
    _add(grads, out_table(cfg), dWout)
    dx, dg, db = ops.layer_norm_backward(dh, x_last, w["decoder.norm.weight"], cfg.norm_eps)
    _add(grads, "decoder.norm.weight", dg)
    _add(grads, "decoder.norm.bias", db)

    # the decoder's layers, last first; the memory's gradient adds up over every cross-attention
    dmem = np.zeros_like(mem)
    for i in reversed(range(cfg.n_dec_layers)):
        p = f"decoder.layers.{i}."
        s1, s2, s3 = dec_keep[i]
        dx = sublayer_backward(dx, s3, lambda d, fs: ffn_backward(d, w, p, fs, grads), w, p + "norm3", cfg, grads)

        def cross_back(d, fs, p=p):
            nonlocal dmem
            dxq, dkv = mha_backward(d, w, p + "multihead_attn.", fs, grads, self_attention=False)
            dmem = dmem + dkv
            return dxq

        dx = sublayer_backward(dx, s2, cross_back, w, p + "norm2", cfg, grads)
        dx = sublayer_backward(dx, s1, lambda d, fs: mha_backward(d, w, p + "self_attn.", fs, grads, True)[0],
                               w, p + "norm1", cfg, grads)
    _add(grads, tgt_table(cfg), embed_backward(dx, tgt_in, V))

    # the encoder's final norm, then its layers
    x_enc = enc_keep.pop()
    dx, dg, db = ops.layer_norm_backward(dmem, x_enc, w["encoder.norm.weight"], cfg.norm_eps)
    _add(grads, "encoder.norm.weight", dg)
    _add(grads, "encoder.norm.bias", db)
    for i in reversed(range(cfg.n_enc_layers)):
        p = f"encoder.layers.{i}."
        s1, s2 = enc_keep[i]
        dx = sublayer_backward(dx, s2, lambda d, fs: ffn_backward(d, w, p, fs, grads), w, p + "norm2", cfg, grads)
        dx = sublayer_backward(dx, s1, lambda d, fs: mha_backward(d, w, p + "self_attn.", fs, grads, True)[0],
                               w, p + "norm1", cfg, grads)
    _add(grads, src_table(cfg), embed_backward(dx, src, V))
    return loss, grads


# --- batches of pairs ------------------------------------------------------------------------------

def pad_batch(seqs, pad_id: int) -> np.ndarray:
    """Id lists of different lengths -> [B, longest] int64, padded on the right with pad_id."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), pad_id, np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def make_batch(pairs, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encoded pairs [(source ids, target ids), ...] -> src [B,S], decoder inputs [B,T] (BOS + target)
    and decoder targets [B,T] (target + EOS), padded with pad_id."""
    src = pad_batch([s for s, _ in pairs], cfg.pad_id)
    tgt_in = pad_batch([[cfg.bos_id] + list(t) for _, t in pairs], cfg.pad_id)
    tgt_out = pad_batch([list(t) + [cfg.eos_id] for _, t in pairs], cfg.pad_id)
    return src, tgt_in, tgt_out


# --- decoding ---------------------------------------------------------------------------------------

def _never_pad_or_bos(scores, cfg):
    """Scores [..., V] with padding and BOS at -inf: neither is ever an output (the other scores, log-probs
    of the full softmax, stay what the model says)."""
    scores[..., [cfg.pad_id, cfg.bos_id]] = -np.inf
    return scores


def greedy_decode(w, cfg, src_ids, max_len: int | None = None) -> list[int]:
    """The most likely next token (never padding or BOS), one at a time, until EOS or max_len tokens: source ids -> target ids
    (without BOS / EOS). The encoder runs once; the decoder reruns on the growing prefix (no cache:
    targets here are a few dozen tokens)."""
    max_len = cfg.max_seq_len - 1 if max_len is None else max_len
    src = np.asarray([src_ids], np.int64)  # [1,S]
    src_pad = src == cfg.pad_id
    mem = encode(w, cfg, src, src_pad)  # [1,S,D]
    out = [cfg.bos_id]
    while len(out) <= max_len:
        tgt = np.asarray([out], np.int64)  # [1,t]
        logits = decode(w, cfg, tgt, np.zeros(tgt.shape, bool), mem, src_pad)  # [1,t,V]
        nxt = int(np.argmax(_never_pad_or_bos(logits[0, -1].astype(np.float64), cfg)))
        if nxt == cfg.eos_id:
            break
        out.append(nxt)
    return out[1:]


def beam_search(w, cfg, src_ids, beam: int = 4, max_len: int | None = None) -> list[tuple[list[int], float]]:
    """Beam search: the `beam` best hypotheses by total log-probability (EOS included), best first, as
    [(target ids without BOS / EOS, score), ...].

    Each step extends every live hypothesis by every token and keeps the `beam` best extensions; one that
    ends in EOS is finished. A score only falls as a hypothesis grows, so the search stops as soon as the
    best finished score beats every live one: nothing live can overtake it. Hypotheses cut at max_len
    tokens count as finished (without an EOS term). Beam 1 is greedy decoding."""
    if not isinstance(beam, int) or beam < 1:
        raise ValueError(f"--beam must be a positive integer, got {beam!r}")
    max_len = cfg.max_seq_len - 1 if max_len is None else max_len
    src = np.asarray([src_ids], np.int64)  # [1,S]
    src_pad = src == cfg.pad_id
    mem1 = encode(w, cfg, src, src_pad)  # [1,S,D]
    live = [([cfg.bos_id], 0.0)]
    done: list[tuple[list[int], float]] = []
    while live:
        n = len(live)
        tgt = np.asarray([s for s, _ in live], np.int64)  # [n,t]: all live hypotheses have one length
        mem = np.broadcast_to(mem1, (n, *mem1.shape[1:]))  # [n,S,D]
        logits = decode(w, cfg, tgt, np.zeros(tgt.shape, bool), mem, np.broadcast_to(src_pad, (n, src.shape[1])))
        logp = _never_pad_or_bos(ops.log_softmax(logits[:, -1].astype(np.float64)), cfg)  # [n,V]
        total = np.asarray([sc for _, sc in live])[:, None] + logp  # [n,V]: every extension's score
        flat = np.argsort(-total, axis=None, kind="stable")[:beam]  # the best `beam` of n*V
        nxt = []
        for f in flat:
            i, tok = divmod(int(f), cfg.vocab_size)
            seq, sc = live[i][0] + [tok], float(total[i, tok])
            if tok == cfg.eos_id:
                done.append((seq, sc))
            elif len(seq) - 1 >= max_len:
                done.append((seq, sc))
            else:
                nxt.append((seq, sc))
        done.sort(key=lambda h: -h[1])
        done = done[:beam]
        if len(done) >= beam or (done and nxt and done[0][1] >= max(sc for _, sc in nxt)):
            break
        live = nxt
    done.sort(key=lambda h: -h[1])
    return [([t for t in seq[1:] if t != cfg.eos_id], sc) for seq, sc in done]


def sequence_logprob(w, cfg, src_ids, tgt_ids, eos: bool = True) -> float:
    """Sum of log p(token) of target ids (then EOS when eos) under the model, one teacher-forced forward."""
    src = np.asarray([src_ids], np.int64)
    tgt_in = np.asarray([[cfg.bos_id] + list(tgt_ids)], np.int64)  # [1,T]
    tgt_out = list(tgt_ids) + [cfg.eos_id]
    logits = forward(w, cfg, src, tgt_in, src == cfg.pad_id, np.zeros(tgt_in.shape, bool))  # [1,T,V]
    logp = ops.log_softmax(logits[0].astype(np.float64))  # [T,V]
    n = len(tgt_out) if eos else len(tgt_ids)
    return float(sum(logp[t, tgt_out[t]] for t in range(n)))


class Seq2Seq:
    """A trained (or freshly initialised) encoder-decoder: config, weights, tokenizer; translate() decodes text."""

    def __init__(self, config: Seq2SeqConfig, weights: dict, tokenizer=None, info: dict | None = None):
        config.validate()
        check_weights(config, weights, info.get("source", "weights") if info else "weights")
        self.config, self.weights, self.tokenizer = config, weights, tokenizer
        self.info = dict(info or {})

    def forward(self, src, tgt, src_pad=None, tgt_pad=None, recorder=None):
        return forward(self.weights, self.config, src, tgt, src_pad, tgt_pad, record=recorder)

    def loss_and_grads(self, src, tgt_in, tgt_out):
        return loss_and_grads(self.weights, self.config, src, tgt_in, tgt_out)

    def encode_text(self, text: str) -> list[int]:
        if not isinstance(text, str) or text == "":
            raise PromptError("empty source text: give something to transform")
        ids = self.tokenizer.encode(text)
        if len(ids) > self.config.max_seq_len:
            raise PromptError(f"the source is {len(ids)} tokens, longer than this model's {self.config.max_seq_len}")
        if self.config.pad_id in ids:
            raise PromptError("the source text holds the padding token")
        return ids

    def translate(self, text: str, beam: int = 1, max_len: int | None = None) -> str:
        """The model's output for a source text: greedy (beam 1) or the best beam-search hypothesis."""
        ids = self.encode_text(text)
        longest = self.config.max_seq_len - 1  # the longest output training showed it (BOS takes a position)
        max_len = longest if max_len is None else min(max_len, longest)
        if beam == 1:
            out = greedy_decode(self.weights, self.config, ids, max_len)
        else:
            out = beam_search(self.weights, self.config, ids, beam, max_len)[0][0]
        return self.tokenizer.decode(out)


def exact_match(model: Seq2Seq, pairs, beam: int = 1) -> float:
    """Fraction of (source, target) text pairs whose output equals the target exactly."""
    if not pairs:
        raise ValueError("no pairs to score")
    # an output can only equal its target if it ends (EOS) within len(target) + 1 tokens: decoding stops there
    return sum(model.translate(s, beam=beam, max_len=len(model.tokenizer.encode(t)) + 1) == t
               for s, t in pairs) / len(pairs)
