"""The decoder: Llama (RMSNorm, RoPE, GQA, SwiGLU) and GPT-2 (LayerNorm, learned positions, GELU)
as one config-driven transformer, with a forward pass that can use a KV cache.

Weights live in `Model.tensors` under Meta's canonical names, [out, in] layout, so a projection
is `x @ W.T`: float32 arrays, or QuantizedMatrix (quant.py) for weights kept as their stored ggml blocks
(a quantized GGUF, 16-bit safetensors), which ops.linear multiplies through kernels.py.
`Model.weights` is the same mapping seen as arrays: a packed entry answers dequantized.
To shorten the per-layer op count, q/k/v and gate/up are fused into one matrix each at load time
(packed ones too, when their types agree), and the canonical entries become views into the fused
matrices (no second copy; writing through `weights` changes what the model computes).
"""

from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np

from . import ops
from .cache import KVCache
from .config import ModelConfig, check_weights
from .errors import PromptError
from .quant import QuantizedMatrix


def to_numpy(x) -> np.ndarray:
    """Host copy of an array of any namespace (NumPy, torch, CuPy)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "get"):  # CuPy
        return x.get()
    if hasattr(x, "detach"):  # torch
        return x.detach().cpu().float().numpy()
    return np.asarray(x)


# What a forward recorder receives, in order (layer names are prefixed "layers.{i}.").
RECORDED = {
    "start": ("tokens", "embedding", "pos_embedding", "embedding+pos", "rope.inv_freq", "rope.cos", "rope.sin", "mask"),
    # softmax.blocks: what ops.causal_attention saves per block (training), instead of scores/probs
    "layer": ("attention_norm", "q", "k", "v", "q_rope", "k_rope", "scores", "probs", "softmax.blocks", "heads",
              "attention_output", "residual_attention", "ffn_norm", "ffn_gate", "ffn_sigmoid", "ffn_phi", "ffn_up", "ffn_act",
              "ffn_down", "residual_ffn"),
    "end": ("norm", "logits"),
}


# Query rows per block of ops.causal_attention (training and other whole-sequence forwards).
ATTENTION_BLOCK = 64

# Packed matrices are fused (copied side by side) only up to this size: fusing saves a kernel call per
# token (~10 us), which matters for small models; a large model's matrices stay memory-mapped, uncopied,
# so its resident memory stays the file's size and loading stays instant.
FUSE_PACKED_BYTES = 16 << 20

# A prompt run through the KV cache goes in chunks of at most this many tokens, fewer when the attention
# scores of a chunk, [H, chunk, S] float32, would pass PREFILL_SCORES_BYTES: memory stays bounded however
# long the prompt (the activations are [chunk, F], the scores [H, chunk, S]).
PREFILL_CHUNK = 512
PREFILL_SCORES_BYTES = 64 << 20


class Weights(MutableMapping):
    """`model.weights`: canonical name -> float32 array. A weight kept packed (QuantizedMatrix) answers
    with its dequantized array, a new one on each access (writing into it changes nothing); assigning
    stores the array given. `model.tensors` holds what the model computes with."""

    def __init__(self, tensors: dict):
        self._t = tensors

    def __getitem__(self, name):
        w = self._t[name]
        return w.dequantize() if isinstance(w, QuantizedMatrix) else w

    def __setitem__(self, name, value):
        self._t[name] = value

    def __delitem__(self, name):
        del self._t[name]

    def __iter__(self):
        return iter(self._t)

    def __len__(self):
        return len(self._t)

    def __repr__(self):
        return f"Weights({len(self._t)} tensors)"


def _home_of(a):
    """An empty array standing for where `a` lives (its device) and computes (its float dtype): NumPy's float32,
    or a torch tensor's own device and dtype. See devices.py."""
    if isinstance(a, np.ndarray) or isinstance(a, QuantizedMatrix):
        return np.empty(0, np.float32)
    xp = ops.array_namespace(a)
    return xp.empty((0,), dtype=a.dtype, device=ops.device(a))


def _home_key(home) -> tuple:
    return type(home), str(getattr(home, "device", "")), str(home.dtype)


class _AtHome:
    """The RoPE angles (cos, sin [T,Hd/2]) and the mask [T,S] of one forward, made on the host and moved once
    to each home a block runs at; with NumPy's rotation as complex numbers (ops.rope_rotation) alongside."""

    def __init__(self, cos, sin, mask):
        self._host = (cos, sin, mask)
        self._seen = {}

    def at(self, home):
        """(cos, sin, rot, mask) at `home` (rot None off NumPy; each None where the forward has none)."""
        got = self._seen.get(id(home))  # homes are shared objects (Model.homes): one entry per device
        if got is None:
            cos, sin, mask = (None if a is None else ops.move(a, home) for a in self._host)
            rot = None if cos is None else ops.rope_rotation(cos, sin)  # [T,1,Hd/2] complex on NumPy, else None
            got = self._seen[id(home)] = (cos, sin, rot, mask)
        return got


class _Layer:
    """The arrays of one transformer block, fused for the forward pass."""

    __slots__ = ("attn_norm_w", "attn_norm_b", "wqkv", "bqkv", "wo", "bo",
                 "ffn_norm_w", "ffn_norm_b", "w13", "w1", "w3", "b1", "w2", "b2")


class Model:
    """A loaded decoder: config, tokenizer and canonical weights, with forward, logits, generate and chat."""

    def __init__(self, config: ModelConfig, weights: dict, tokenizer=None, *, info: dict | None = None):
        check_weights(config, {n: tuple(w.shape) for n, w in weights.items()}, "weights")
        self.config = config
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self.tensors = dict(weights)  # arrays and QuantizedMatrix: what the forward computes with
        self.weights = Weights(self.tensors)  # the same, every entry seen as an array
        emb = self.tensors["tok_embeddings.weight"]
        self.xp = ops.array_namespace(np.empty(0, np.float32) if isinstance(emb, QuantizedMatrix) else emb)
        self.adapter = None  # LoRA adapters (training/lora.py) the forward adds to its projections, or None
        self.attention_block = ATTENTION_BLOCK
        self.kv_dtype = None  # what new_cache stores keys and values in: None = the compute dtype, or "f16"
        self._inv_freq = ops.rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
        self._build_layers()
        # where each block runs (devices.py): an empty array on its device in its dtype; the activations move
        # there before it runs, its KV cache lives there. The embedding, final norm and head share one home.
        homes = {}  # one object per distinct home: _AtHome moves the angles once to each
        self.homes = [homes.setdefault(_home_key(h), h) for h in (_home_of(L.attn_norm_w) for L in self.layers)]
        self.head_home = homes.setdefault(_home_key(h := _home_of(self.tensors["norm.weight"])), h)
        self.plan = None  # the devices.Plan the model was placed by (load(device=...)), or None
        self.stream = None  # a devices.BlockStream when blocks are streamed in for their turn
        self.traffic = None  # a devices.Traffic to time the activations' moves between devices (bench), or None

    # --- weights ---------------------------------------------------------------------------

    def _fuse(self, names: list[str], axis: int = 0):
        """Concatenate the named weights along `axis` into one array and make the named entries views of it.
        Packed weights fuse when they share one type (their rows are stacked); otherwise they stay apart and
        the fused "matrix" is the tuple of them (see _project)."""
        xp, w = self.xp, self.tensors
        parts = [w[n] for n in names]
        if any(isinstance(p, QuantizedMatrix) for p in parts):
            same = all(isinstance(p, QuantizedMatrix) and p.ggml_type == parts[0].ggml_type for p in parts)
            if not same or sum(p.nbytes for p in parts) > FUSE_PACKED_BYTES:
                return tuple(parts)
            fused = QuantizedMatrix.concat(parts)
        else:
            fused = ops.concat(parts, axis=axis)
        start = 0
        for n in names:
            size = w[n].shape[axis]
            w[n] = fused[start:start + size]
            start += size
        return fused

    def _build_layers(self) -> None:
        w, cfg = self.tensors, self.config
        gpt2 = cfg.arch == "gpt2"
        self.layers = []
        for i in range(cfg.n_layers):
            p = f"layers.{i}."
            L = _Layer()
            L.attn_norm_w = w[p + "attention_norm.weight"]
            L.ffn_norm_w = w[p + "ffn_norm.weight"]
            # [H*Hd + 2*K*Hd, D]: one matmul yields q, k and v
            L.wqkv = self._fuse([p + "attention.wq.weight", p + "attention.wk.weight", p + "attention.wv.weight"])
            L.wo = w[p + "attention.wo.weight"]
            L.w2 = w[p + "feed_forward.w2.weight"]
            if gpt2:
                L.attn_norm_b = w[p + "attention_norm.bias"]
                L.ffn_norm_b = w[p + "ffn_norm.bias"]
                L.bqkv = self._fuse([p + "attention.wq.bias", p + "attention.wk.bias", p + "attention.wv.bias"])
                L.bo = w[p + "attention.wo.bias"]
                L.w1, L.b1 = w[p + "feed_forward.w1.weight"], w[p + "feed_forward.w1.bias"]
                L.b2 = w[p + "feed_forward.w2.bias"]
                L.w13 = L.w3 = None
            else:
                L.attn_norm_b = L.ffn_norm_b = L.bqkv = L.bo = L.b1 = L.b2 = None
                # [2F, D]: the SwiGLU gate (w1) and up (w3) projections, one matrix for LoRA's fused group;
                # w1 and w3 are views of its halves
                L.w13 = self._fuse([p + "feed_forward.w1.weight", p + "feed_forward.w3.weight"])
                L.w1, L.w3 = w[p + "feed_forward.w1.weight"], w[p + "feed_forward.w3.weight"]
            self.layers.append(L)

    @property
    def output_weight(self):
        """The output head [V, D]: the token embedding itself when tied."""
        return self.tensors["tok_embeddings.weight"] if self.config.tie_embeddings else self.tensors["output.weight"]

    def _norm(self, x, w, b):
        if self.config.arch == "gpt2":
            return ops.layer_norm(x, w, b, self.config.norm_eps)
        return ops.rms_norm(x, w, self.config.norm_eps)

    # --- forward ---------------------------------------------------------------------------

    def _project(self, i: int, group: str, x, w, b, r):
        """x @ w.T for layer i's projection `group` (qkv, o, w13, down), plus its LoRA adapters if any are
        attached (before the bias, as PEFT adds them), plus the bias b (GPT-2; None for Llama).

        w may be a tuple of matrices whose outputs side by side are the group's (Llama's gate and up): then
        one matmul each and a tuple of outputs, faster than one [..., 2F] output read in strided halves.
        A tuple for a single-output group (q, k and v packed in different types) is joined into one output."""
        if isinstance(w, tuple):
            y = tuple(ops.linear(x, wk) for wk in w)  # [..., in] @ [in, out_k] -> [..., out_k] each
            if group != "w13":
                y = ops.array_namespace(*y).concat(y, axis=-1)  # [..., sum out_k]
        else:
            y = ops.linear(x, w)  # [..., in] @ [in, out] -> [..., out], a fresh array
        if self.adapter is not None:
            self.adapter.apply(i, group, x, y, r)  # += s * (x @ A.T) @ B.T, in place
        if b is not None:
            y += b  # in place too: no second [..., out] array
        return y

    def _ffn(self, i: int, L: _Layer, h, r):
        """Layer i's feed-forward block on the normed h [B,T,D] -> [B,T,D] (GELU MLP for GPT-2, SwiGLU for
        Llama), recording its intermediates when r is given (the backward needs them)."""
        if self.config.arch == "gpt2":
            up = self._project(i, "w13", h, L.w1, L.b1, r)  # [B,T,D] @ [D,F] -> [B,T,F]
            phi = ops.gelu_tanh_phi(up)  # kept: the backward needs it too
            act = ops.gelu_tanh(up, phi)  # up * phi(up)
        elif type(L.w13) is QuantizedMatrix and h.shape[1] == 1 and r is None:  # decoding: one kernel call for both
            act = ops.swiglu_halves(self._project(i, "w13", h, L.w13, None, r))  # [B,1,D] @ [D,2F] -> [B,1,2F] -> [B,1,F]
        else:
            gate, up = self._project(i, "w13", h, (L.w1, L.w3), None, r)  # [B,T,D] @ [D,F] -> [B,T,F] each
            sig = ops.sigmoid(gate)  # kept: the backward needs it too
            act = ops.swiglu(gate, up, sig)
        f = self._project(i, "down", act, L.w2, L.b2, r)  # [B,T,F] @ [F,D] -> [B,T,D]
        if r is not None:
            r("ffn_norm", h)
            if self.config.arch == "gpt2":
                r("ffn_phi", phi)
            else:
                r("ffn_gate", gate)
                r("ffn_sigmoid", sig)
            r("ffn_up", up)
            r("ffn_act", act)
            r("ffn_down", f)
        return f

    def new_cache(self, max_len: int, batch: int = 1, dtype: str | None = None) -> KVCache:
        """A KV cache for `max_len` positions (at most the model's context), stored in `dtype` ("f16", or
        None: self.kv_dtype, by default the compute dtype float32)."""
        c = self.config
        max_len = min(int(max_len), c.max_seq_len)
        dtype = dtype or self.kv_dtype
        if dtype not in (None, "f32", "f16"):
            raise ValueError(f"KV cache dtype must be f32 or f16, got {dtype!r}")
        store = "f16" if dtype == "f16" else None
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_len, c.head_dim, self.homes, dtype=store)  # each block's at its home

    def _prefill_chunk(self, S: int) -> int:
        """Tokens per chunk of a prompt run through the cache when S positions are attended to."""
        fit = PREFILL_SCORES_BYTES // (4 * self.config.n_heads * max(S, 1))
        return max(16, min(PREFILL_CHUNK, fit))

    def forward(self, ids, cache: KVCache | None = None, start_pos: int = 0, last_only: bool = False,
                recorder=None, head: bool = True):
        """Logits for token ids [B, T] at positions start_pos..start_pos+T-1.

        With a cache, keys/values of earlier positions come from it and the new ones are written
        to it. `last_only` computes the output head for the last position only (decoding needs no more).
        `head=False` stops before the output head and returns the final normed states [B, T, D] (a
        masked loss applies the head to the positions it scores only: training/backward.py).
        `recorder(name, array)`, when given, receives every named intermediate (see RECORDED); it is
        how `scratchlm explain` observes this very forward. Returns [B, T, V] (or [B, 1, V]).
        """
        rec = recorder  # one None check per recording point when off
        # a recorder may say it drops the attention scores (the backward's does): then they are not copied out
        keep_scores = getattr(rec, "wants_scores", True)
        cfg = self.config
        ids = ops.move(ids, self.head_home)  # the token ids where the embedding table is
        xp = ops.array_namespace(ids)
        B, T = ids.shape
        chunk = self._prefill_chunk(start_pos + T)
        if cache is not None and rec is None and T > chunk:  # a long prompt: chunk by chunk through the cache
            outs = []
            for a in range(0, T, chunk):
                b = min(a + chunk, T)
                last = b == T
                o = self.forward(ids[:, a:b], cache, start_pos + a, last_only=last_only, head=head and (last or not last_only))
                if last or not last_only:
                    outs.append(o)
            return outs[0] if len(outs) == 1 else ops.array_namespace(*outs).concat(outs, axis=1)  # [B,T,V] (or [B,1,V])
        D, H, K, Hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        S = start_pos + T
        if S > cfg.max_seq_len:
            raise PromptError(f"{S} positions exceed the model's context of {cfg.max_seq_len} tokens")
        gpt2 = cfg.arch == "gpt2"

        x = ops.embedding(self.tensors["tok_embeddings.weight"], ids)  # [B,T] -> [B,T,D]
        if rec is not None:
            rec("tokens", ids)
            rec("embedding", x)
        if gpt2:
            pe = self.tensors["pos_embeddings.weight"]  # learned positions [ctx,D]
            pos = pe.take_rows(np.arange(start_pos, S)) if isinstance(pe, QuantizedMatrix) else pe[start_pos:S]  # [T,D]
            x = x + pos
            cos = sin = rot = None
            if rec is not None:
                rec("pos_embedding", pos)
                rec("embedding+pos", x)
        else:
            cos, sin = ops.rope_cos_sin(self._inv_freq, start_pos, T)  # [T,Hd/2] each, on the host
            if rec is not None:
                rec("rope.inv_freq", self._inv_freq)
                rec("rope.cos", cos)
                rec("rope.sin", sin)
        # a single new token sees every cached position: no mask needed
        mask = None if T == 1 else ops.causal_mask(T, S)  # [T,S], on the host
        here = _AtHome(cos, sin, mask)  # the same, moved once to each home a block runs at
        # a whole sequence from position 0 (training, evaluation, a prompt's first chunk) skips the masked
        # future block by block, unless a recorder wants the full [T, S] scores and probabilities (explain)
        blocked = start_pos == 0 and T > self.attention_block and (rec is None or not keep_scores)
        if rec is not None and mask is not None:
            rec("mask", mask)

        for i, L in self._blocks():
            x = self._move(x, self.homes[i])  # the activations go to the block's device (a no-op when there)
            xp = ops.array_namespace(x)
            cos, sin, rot, mask = here.at(self.homes[i])
            r = None if rec is None else (lambda name, a, _p=f"layers.{i}.": rec(_p + name, a))
            # --- attention block ---
            h = self._norm(x, L.attn_norm_w, L.attn_norm_b)  # [B,T,D]
            qkv = self._project(i, "qkv", h, L.wqkv, L.bqkv, r)  # [B,T,D] @ [D,(H+2K)*Hd] -> [B,T,(H+2K)*Hd]
            qkv = xp.reshape(qkv, (B, T, H + 2 * K, Hd))  # [B,T,H+2K,Hd]
            qk, v = qkv[:, :, :H + K], qkv[:, :, H + K:]  # [B,T,H+K,Hd], [B,T,K,Hd]
            if r is not None:
                r("attention_norm", h)
                r("q", qk[:, :, :H])  # [B,T,H,Hd]
                r("k", qk[:, :, H:])  # [B,T,K,Hd]
                r("v", v)  # [B,T,K,Hd]
            if not gpt2:
                # rotate queries and keys together; in place when nothing recorded the unrotated ones
                qk = ops.rope(qk, cos, sin, inplace=r is None, rot=rot)
                if r is not None:
                    r("q_rope", qk[:, :, :H])
                    r("k_rope", qk[:, :, H:])
            q = xp.permute_dims(qk[:, :, :H], (0, 2, 1, 3))  # [B,T,H,Hd] -> [B,H,T,Hd]
            k = xp.permute_dims(qk[:, :, H:], (0, 2, 1, 3))  # [B,T,K,Hd] -> [B,K,T,Hd]
            v = xp.permute_dims(v, (0, 2, 1, 3))  # [B,T,K,Hd] -> [B,K,T,Hd]
            if cache is not None:
                k, v = cache.update(i, k, v, start_pos)  # [B,K,S,Hd] each
            if blocked:  # a whole sequence: its future is never computed
                a, saved = ops.causal_attention(q, k, v, self.attention_block)  # [B,H,T,Hd]
                if r is not None:
                    r("softmax.blocks", saved)
            else:
                a = ops.attention(q, k, v, mask, record=r, record_scores=keep_scores)  # [B,H,T,Hd]
            if r is not None:
                r("heads", a)  # per-head outputs [B,H,T,Hd]
            a = xp.reshape(xp.permute_dims(a, (0, 2, 1, 3)), (B, T, H * Hd))  # [B,H,T,Hd] -> [B,T,H*Hd]
            a = self._project(i, "o", a, L.wo, L.bo, r)  # [B,T,H*Hd] @ [H*Hd,D] -> [B,T,D]
            x = x + a  # residual
            if r is not None:
                r("attention_output", a)
                r("residual_attention", x)

            # --- feed-forward block ---
            h = self._norm(x, L.ffn_norm_w, L.ffn_norm_b)  # [B,T,D]
            x = x + self._ffn(i, L, h, r)  # residual
            if r is not None:
                r("residual_ffn", x)

        x = self._move(x, self.head_home)
        if last_only:
            x = x[:, -1:]  # [B,1,D]
        x = self._norm(x, self.tensors["norm.weight"], self.tensors.get("norm.bias"))
        if not head:
            if rec is not None:
                rec("norm", x)
            return x
        logits = ops.linear(x, self.output_weight)  # [B,T,D] @ [D,V] -> [B,T,V]
        if rec is not None:
            rec("norm", x)
            rec("logits", logits)
        return logits

    def decode_batch(self, tokens, caches: list[KVCache], positions: list[int]):
        """One decoding step of B independent sequences: logits [B, V] of tokens[b] at positions[b], each
        sequence with its own KV cache (holding positions[b] positions before the call, one more after).

        The server's continuous batching (serve/scheduler.py) runs every active request through this, so
        the sequences sit at different lengths. The projections see the B tokens as B rows of one matrix,
        so each weight is read once for all of them (decoding is bound by reading the weights); RoPE turns
        each row by its own position; attention runs per sequence over exactly its own cached positions
        (a slice as long as that sequence: there is no padding, so nothing to mask).

        Equal to `forward` one sequence at a time, and bit for bit when the weights are packed blocks and
        B <= kernels.MATVEC_MAX_ROWS: the C matrix-vector kernels, RMSNorm, SwiGLU and attention each
        compute a row alone, in the same order whatever the other rows. Float32 weights (load(dtype="f32"))
        go through BLAS, whose B-row product sums in another order than its one-row product (a few 1e-7
        relative), and so do packed weights for more than MATVEC_MAX_ROWS rows (dequantized tiles instead of
        the 8-bit activations: ~1e-4), and so do a LoRA adapter's float32 matrices: logits then agree
        closely, and a greedy choice between two nearly tied tokens can differ.
        """
        xp, cfg = self.xp, self.config
        B = len(tokens)
        if not (B == len(caches) == len(positions)) or B == 0:
            raise ValueError(f"decode_batch needs as many caches and positions as tokens, got {B}, "
                             f"{len(caches)}, {len(positions)}")
        for c, p in zip(caches, positions):
            if p + 1 > c.max_len:
                raise PromptError(f"position {p} is past the end of a KV cache of {c.max_len} positions")
        D, H, K, Hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        gpt2 = cfg.arch == "gpt2"
        ids = ops.move(np.asarray(tokens, dtype=np.int64).reshape(B, 1), self.head_home)  # [B,1]
        x = ops.embedding(self.tensors["tok_embeddings.weight"], ids)  # [B,1] -> [B,1,D]
        if gpt2:
            pe = self.tensors["pos_embeddings.weight"]  # learned positions [ctx,D]
            where = np.asarray(positions)
            pos = pe.take_rows(where) if isinstance(pe, QuantizedMatrix) else pe[ops.move(where, self.head_home)]  # [B,D]
            x = x + ops.array_namespace(x).reshape(pos, (B, 1, D))
            cos = sin = None
        else:
            # each sequence's own angles, made as the lone forward makes them (one position at a time)
            cs = [ops.rope_cos_sin(self._inv_freq, int(p), 1) for p in positions]  # B x ([1,Hd/2], [1,Hd/2])
            cos = np.concatenate([c for c, _ in cs])  # [B,Hd/2]
            sin = np.concatenate([s for _, s in cs])  # [B,Hd/2]
        here = _AtHome(cos, sin, None)

        for i, L in self._blocks():
            x = self._move(x, self.homes[i])  # to the block's device
            xp = ops.array_namespace(x)
            cos, sin, rot, _ = here.at(self.homes[i])
            h = self._norm(x, L.attn_norm_w, L.attn_norm_b)  # [B,1,D]
            qkv = self._project(i, "qkv", h, L.wqkv, L.bqkv, None)  # [B,1,D] @ [D,(H+2K)*Hd] -> [B,1,(H+2K)*Hd]
            # the B sequences on the T axis ([1,B,...], the same memory): rope then gives row b angle b
            qkv = xp.reshape(qkv, (1, B, H + 2 * K, Hd))  # [1,B,H+2K,Hd]
            qk, v = qkv[:, :, :H + K], qkv[:, :, H + K:]  # [1,B,H+K,Hd], [1,B,K,Hd]
            if not gpt2:
                qk = ops.rope(qk, cos, sin, inplace=True, rot=rot)
            heads = []
            for b in range(B):  # attention: each sequence over its own cache
                q_b = xp.permute_dims(qk[:, b:b + 1, :H], (0, 2, 1, 3))  # [1,1,H,Hd] -> [1,H,1,Hd]
                k_b = xp.permute_dims(qk[:, b:b + 1, H:], (0, 2, 1, 3))  # [1,1,K,Hd] -> [1,K,1,Hd]
                v_b = xp.permute_dims(v[:, b:b + 1], (0, 2, 1, 3))  # [1,1,K,Hd] -> [1,K,1,Hd]
                k_all, v_all = caches[b].update(i, k_b, v_b, positions[b])  # [1,K,S_b,Hd] each
                heads.append(ops.attention(q_b, k_all, v_all))  # [1,H,1,Hd]
            a = xp.concat(heads, axis=0)  # [B,H,1,Hd]
            a = xp.reshape(xp.permute_dims(a, (0, 2, 1, 3)), (B, 1, H * Hd))  # [B,H,1,Hd] -> [B,1,H*Hd]
            a = self._project(i, "o", a, L.wo, L.bo, None)  # [B,1,H*Hd] @ [H*Hd,D] -> [B,1,D]
            x = x + a  # residual

            h = self._norm(x, L.ffn_norm_w, L.ffn_norm_b)  # [B,1,D]
            x = x + self._ffn(i, L, h, None)  # residual, the lone decode step's feed-forward

        x = self._move(x, self.head_home)
        xp = ops.array_namespace(x)
        x = self._norm(x, self.tensors["norm.weight"], self.tensors.get("norm.bias"))  # [B,1,D]
        logits = ops.linear(x, self.output_weight)  # [B,1,D] @ [D,V] -> [B,1,V]
        return xp.reshape(logits, (B, cfg.vocab_size))  # [B,V]

    def _move(self, x, home):
        """ops.move, timed into self.traffic when one is set (scratchlm bench --gpu-layers / --devices)."""
        if self.traffic is None:
            return ops.move(x, home)
        return self.traffic.timed_move(x, home)

    def _blocks(self):
        """(i, arrays of block i) in order: the resident blocks, or with streaming (devices.BlockStream) each
        block's device copy, made just ahead of its turn."""
        return enumerate(self.layers) if self.stream is None else self.stream.blocks(self.layers)

    def logits(self, ids) -> np.ndarray:
        """Logits [len(ids), V] float32 of a full causal forward without cache (for tests and tools)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # [1,T]
        if ids.shape[1] == 0:
            raise PromptError("logits() needs at least one token id")
        self._check_ids(ids)
        return to_numpy(self.forward(ids)[0]).astype(np.float32, copy=False)

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise PromptError(f"token id {bad} is outside the model's vocabulary [0, {self.config.vocab_size})")

    # --- training (see training/backward.py) --------------------------------------------------

    def loss_and_grads(self, input_ids, target_ids, loss_mask=None, wrt: str = "all", grad_scale: float = 1.0):
        """Mean cross-entropy of target_ids [B, T] given input_ids [B, T], and its gradient for every
        weight: (loss: float, grads keyed and shaped like `self.weights`). See training/backward.py
        (loss_mask: only some targets count; wrt="adapters": gradients of the LoRA adapters only;
        grad_scale: gradients of grad_scale * loss)."""
        from .training.backward import loss_and_grads
        return loss_and_grads(self, input_ids, target_ids, loss_mask=loss_mask, wrt=wrt, grad_scale=grad_scale)

    # --- generation (see generate.py and chat.py) --------------------------------------------

    def generate(self, prompt, **kwargs):
        """Generate a continuation of `prompt` (text, or a list of token ids). See `generate.generate`."""
        from .generate import generate
        return generate(self, prompt, **kwargs)

    def chat(self, messages, **kwargs):
        """Answer a conversation [{"role", "content"}, ...] with the model's chat template. See `generate.chat`."""
        from .generate import chat
        return chat(self, messages, **kwargs)

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.arch}, {c.n_params / 1e6:.1f}M params, L={c.n_layers} D={c.dim} H={c.n_heads} "
                f"K={c.n_kv_heads} F={c.ffn_dim} V={c.vocab_size}, source={self.info.get('source')!r})")
