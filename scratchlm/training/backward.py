"""The backward pass of the decoder, written by hand (no autograd), op by op with ops.*_backward.

`loss_and_grads(model, input_ids, target_ids)` runs the model's own `forward` with a recorder that
keeps the activations the backward needs (the same decoder, not a second implementation), then
walks the layers in reverse. The gradient of the fused q/k/v matrix (and GPT-2's fused bias) is
computed once per layer and handed out as row slices under the canonical names, so q/k rows come
out in Meta's interleaved order like the weights themselves; Llama's gate and up halves (w1, w3)
get one matmul each.

The residual stream makes the walk simple: the gradient `dx` of the stream [B,T,D] passes each
residual add unchanged, and each block adds what flows back through its normalisation.
"""

from __future__ import annotations

from ..ops import device

from .. import ops
from ..errors import PromptError

# What the backward reads from the forward's recording (layer names are prefixed "layers.{i}.").
_KEEP_LAYER = ("attention_norm", "q", "k", "q_rope", "k_rope", "v", "probs", "softmax.blocks", "heads", "residual_attention",
               "ffn_norm", "ffn_gate", "ffn_sigmoid", "ffn_phi", "ffn_up", "ffn_act", "residual_ffn")
_KEEP_OTHER = ("embedding", "embedding+pos", "rope.cos", "rope.sin", "norm")
# what LoRA adapters record (training/lora.py), per fused group
_KEEP_LORA = tuple(f"lora.{g}.{n}" for g in ("qkv", "o", "w13", "down") for n in ("x", "u", "keep"))


def _check_ids(xp, ids, name: str, shape, vocab_size: int):
    ids = xp.asarray(ids)
    if ids.ndim != 2 or 0 in ids.shape:
        raise PromptError(f"{name} must be a non-empty integer array of shape [B, T], got shape {list(ids.shape)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise PromptError(f"{name} has shape {list(ids.shape)}, expected {list(shape)} like input_ids")
    if not xp.isdtype(ids.dtype, "integral"):
        raise PromptError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
    lo, hi = int(xp.min(ids)), int(xp.max(ids))
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise PromptError(f"{name}: token id {bad} is outside the model's vocabulary [0, {vocab_size})")
    return xp.astype(ids, xp.int64)


def loss_and_grads(model, input_ids, target_ids, loss_mask=None, wrt: str = "all", grad_scale: float = 1.0):
    """Mean next-token cross-entropy over all B*T targets and its gradient for every weight.

    input_ids, target_ids: integer arrays [B, T] (target_ids[b, t] is the token that should follow
    input_ids[b, :t+1]). Returns (loss: float, grads: dict) with grads keyed and shaped exactly like
    `model.weights`, float32 in the model's array namespace.

    loss_mask [B, T] of 0/1 (optional): the loss is the mean over the targets where it is 1 only (the
    assistant's tokens, in fine-tuning). wrt="adapters": the base is frozen; only the gradients of the
    LoRA adapters attached to the model (model.adapter) are formed, keyed like adapter.params; the
    backward still flows through every base weight, but skips their weight-gradient matmuls (the
    output head's [V,D] one included). With wrt="all" and an adapter, its gradients are added to grads.
    grad_scale: the gradients are those of grad_scale * loss (this batch's share of a larger one, as in
    training/parallel.py, which then only adds them up); the returned loss is not scaled.
    """
    xp, cfg, W = model.xp, model.config, model.weights
    if wrt not in ("all", "adapters"):
        raise ValueError(f"wrt must be 'all' or 'adapters', got {wrt!r}")
    ad = getattr(model, "adapter", None)
    if wrt == "adapters" and ad is None:
        raise ValueError("wrt='adapters' needs LoRA adapters attached to the model (model.adapter)")
    base = wrt == "all"  # form the base weights' gradients
    # the ids (and mask) where the embedding is: on a torch device, that device (devices.py)
    input_ids, target_ids = ops.move(input_ids, model.head_home), ops.move(target_ids, model.head_home)
    if loss_mask is not None:
        loss_mask = ops.move(loss_mask, model.head_home)
    ids = _check_ids(xp, input_ids, "input_ids", None, cfg.vocab_size)
    tgt = _check_ids(xp, target_ids, "target_ids", ids.shape, cfg.vocab_size)
    B, T = ids.shape
    H, K, Hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    gpt2 = cfg.arch == "gpt2"
    eps = cfg.norm_eps

    keep = set(_KEEP_OTHER) | {f"layers.{i}.{n}" for i in range(cfg.n_layers) for n in _KEEP_LAYER}
    if ad is not None:
        keep |= {f"layers.{i}.{n}" for i in range(cfg.n_layers) for n in _KEEP_LORA}
    mask = None
    if loss_mask is not None:
        mask = xp.asarray(loss_mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise PromptError(f"loss_mask has shape {list(mask.shape)}, expected {list(ids.shape)} like input_ids")
        mask = xp.astype(mask, xp.float32)
        if bool(xp.any((mask != 0) & (mask != 1))):
            raise PromptError("loss_mask must hold only 0 and 1")
        if not bool(xp.any(mask)):
            raise PromptError("loss_mask selects no target: nothing to learn from")
    act = {}

    def recorder(name, a):
        if name in keep:
            act[name] = a

    recorder.wants_scores = False  # the backward needs the probabilities only

    grads = {}
    if mask is None:
        logits = model.forward(ids, recorder=recorder)  # [B,T,V]
        logp = ops.log_softmax(logits)  # [B,T,V], shared by the loss and its gradient
        loss = float(ops.cross_entropy(logits, tgt, logp=logp))
        dlogits = ops.cross_entropy_backward(logits, tgt, dloss=grad_scale, logp=logp)  # [B,T,V]
        del logits, logp
        # --- output head ---
        dxn, d_head, _ = ops.linear_backward(dlogits, act["norm"], model.output_weight, weight_grad=base)  # [B,T,D], [V,D]
        del dlogits
    else:
        # the head only where the loss looks: unmasked targets add nothing to the loss or any gradient,
        # so their [V]-wide logits (the largest matmul and softmax of the step) are never formed
        xn = model.forward(ids, recorder=recorder, head=False)  # [B,T,D], final normed states
        D = xn.shape[-1]
        sel = xp.nonzero(xp.reshape(mask, (-1,)))[0]  # [M] flat positions whose target counts
        xs = xp.take(xp.reshape(xn, (B * T, D)), sel, axis=0)  # [B*T,D] -> [M,D]
        ts = xp.take(xp.reshape(tgt, (-1,)), sel, axis=0)  # [M]
        logits = ops.linear(xs, model.output_weight)  # [M,D] @ [D,V] -> [M,V]
        logp = ops.log_softmax(logits)  # [M,V]
        loss = float(ops.cross_entropy(logits, ts, logp=logp))  # the mean over the M selected targets
        dlogits = ops.cross_entropy_backward(logits, ts, dloss=grad_scale, logp=logp)  # [M,V]
        del logits, logp
        dxs, d_head, _ = ops.linear_backward(dlogits, xs, model.output_weight, weight_grad=base)  # [M,D], [V,D]
        del dlogits
        dxn = xp.reshape(ops.embedding_backward(dxs, sel, B * T), (B, T, D))  # rows back in place: [M,D] -> [B,T,D]

    def norm_backward(dy, x, prefix):
        """Backward of the norm whose weights are `prefix`.weight (and .bias for GPT-2): returns dx."""
        if gpt2:
            dx, dw, db = ops.layer_norm_backward(dy, x, W[prefix + ".weight"], eps)
            if base:
                grads[prefix + ".weight"], grads[prefix + ".bias"] = dw, db
        else:
            dx, dw = ops.rms_norm_backward(dy, x, W[prefix + ".weight"], eps)
            if base:
                grads[prefix + ".weight"] = dw
        return dx

    def lora_backward(i, group, dy, dx):
        """dx plus the adapters' part of the gradient of the input of layer i's `group` (training/lora.py)."""
        if ad is None:
            return dx
        la = {n: act[f"layers.{i}.{n}"] for n in _KEEP_LORA if f"layers.{i}.{n}" in act}
        extra = ad.backward(i, group, dy, la, grads)
        return dx if extra is None else dx + extra

    # --- final norm ---
    dx = norm_backward(dxn, act[f"layers.{cfg.n_layers - 1}.residual_ffn"], "norm")  # [B,T,D]: gradient of the residual stream

    cos, sin = act.get("rope.cos"), act.get("rope.sin")  # the forward's rotation angles, [T,Hd/2] each (Llama)
    if cos is not None:  # recorded on the host: to the blocks' device and dtype (a no-op on NumPy)
        cos, sin = ops.move(cos, model.homes[0]), ops.move(sin, model.homes[0])

    for i in reversed(range(cfg.n_layers)):
        L, p = model.layers[i], f"layers.{i}."
        a = {n: act[p + n] for n in _KEEP_LAYER if p + n in act}
        x_in = act[f"layers.{i - 1}.residual_ffn"] if i else act["embedding+pos" if gpt2 else "embedding"]

        # --- feed-forward block: x_out = x_mid + ffn(norm(x_mid)) ---
        d_act, d_w2, d_b2 = ops.linear_backward(dx, a["ffn_act"], L.w2, bias=gpt2 and base, weight_grad=base)  # [B,T,F]
        d_act = lora_backward(i, "down", dx, d_act)
        if gpt2:
            d_up = ops.gelu_tanh_backward(d_act, a["ffn_up"], a["ffn_phi"])  # [B,T,F]
            dh, d_w1, d_b1 = ops.linear_backward(d_up, a["ffn_norm"], L.w1, bias=base, weight_grad=base)  # [B,T,D]
            dh = lora_backward(i, "w13", d_up, dh)
            if base:
                grads[p + "feed_forward.w1.weight"], grads[p + "feed_forward.w1.bias"] = d_w1, d_b1
                grads[p + "feed_forward.w2.weight"], grads[p + "feed_forward.w2.bias"] = d_w2, d_b2
        else:
            d_gate, d_up = ops.swiglu_backward(d_act, a["ffn_gate"], a["ffn_up"], a["ffn_sigmoid"])  # [B,T,F] each
            # the fused gate/up matrix's backward as its two halves: no [B,T,2F] gradient to concatenate
            # (two matmuls each way run faster than one concatenation and one matmul, measured)
            dh, d_w1, _ = ops.linear_backward(d_gate, a["ffn_norm"], L.w1, weight_grad=base)  # [B,T,D], [F,D]
            dh_up, d_w3, _ = ops.linear_backward(d_up, a["ffn_norm"], L.w3, weight_grad=base)
            dh += dh_up  # [B,T,D]: x fed both halves
            if ad is not None:  # the adapters see the fused output's gradient
                dh = lora_backward(i, "w13", xp.concat([d_gate, d_up], axis=-1), dh)  # [B,T,2F]
            if base:
                grads[p + "feed_forward.w2.weight"] = d_w2
                grads[p + "feed_forward.w1.weight"], grads[p + "feed_forward.w3.weight"] = d_w1, d_w3
        dx += norm_backward(dh, a["residual_attention"], p + "ffn_norm")  # both paths of the residual (dx is ours)

        # --- attention block: x_mid = x_in + wo(attention(rope(wqkv(norm(x_in))))) ---
        heads = a["heads"]  # [B,H,T,Hd]
        a_cat = xp.reshape(xp.permute_dims(heads, (0, 2, 1, 3)), (B, T, H * Hd))  # [B,H,T,Hd] -> [B,T,H*Hd]
        d_cat, d_wo, d_bo = ops.linear_backward(dx, a_cat, L.wo, bias=gpt2 and base, weight_grad=base)  # [B,T,H*Hd]
        d_cat = lora_backward(i, "o", dx, d_cat)
        if base:
            grads[p + "attention.wo.weight"] = d_wo
        if gpt2 and base:
            grads[p + "attention.wo.bias"] = d_bo
        d_heads = xp.permute_dims(xp.reshape(d_cat, (B, T, H, Hd)), (0, 2, 1, 3))  # [B,T,H*Hd] -> [B,H,T,Hd]
        q, k = (a["q"], a["k"]) if gpt2 else (a["q_rope"], a["k_rope"])  # what attention saw: [B,T,H|K,Hd]
        qkv_heads = (d_heads,
                     xp.permute_dims(q, (0, 2, 1, 3)),  # [B,T,H,Hd] -> [B,H,T,Hd]
                     xp.permute_dims(k, (0, 2, 1, 3)),  # [B,T,K,Hd] -> [B,K,T,Hd]
                     xp.permute_dims(a["v"], (0, 2, 1, 3)))  # [B,T,K,Hd] -> [B,K,T,Hd]
        # dq, dk and dv go straight into the fused projection's layout [B,T,H+2K,Hd], seen per head
        d_qkv = xp.empty((B, T, H + 2 * K, Hd), dtype=dx.dtype, device=device(dx))
        d_heads_qkv = tuple(xp.permute_dims(d_qkv[:, :, lo:hi], (0, 2, 1, 3))  # [B,T,n,Hd] -> [B,n,T,Hd]
                            for lo, hi in ((0, H), (H, H + K), (H + K, H + 2 * K)))
        if "softmax.blocks" in a:  # the forward went block by block (ops.causal_attention)
            ops.causal_attention_backward(*qkv_heads, heads, a["softmax.blocks"], model.attention_block,
                                          grads=d_heads_qkv)
        else:
            for into, g in zip(d_heads_qkv, ops.attention_backward(*qkv_heads, a["probs"])):  # dq, dk, dv
                into[...] = g
        if not gpt2:
            ops.rope_backward(d_qkv[:, :, :H + K], cos, sin, inplace=True)  # un-rotate queries and keys together
        d_qkv = xp.reshape(d_qkv, (B, T, (H + 2 * K) * Hd))  # [B,T,H+2K,Hd] -> [B,T,(H+2K)*Hd]
        dh, d_wqkv, d_bqkv = ops.linear_backward(d_qkv, a["attention_norm"], L.wqkv, bias=gpt2 and base,
                                                 weight_grad=base)  # [B,T,D]
        dh = lora_backward(i, "qkv", d_qkv, dh)
        nq, nk = H * Hd, K * Hd
        for n, lo, hi in (("wq", 0, nq), ("wk", nq, nq + nk), ("wv", nq + nk, nq + 2 * nk)) if base else ():
            grads[p + f"attention.{n}.weight"] = d_wqkv[lo:hi]  # row slices of the fused gradient
            if gpt2:
                grads[p + f"attention.{n}.bias"] = d_bqkv[lo:hi]
        dx += norm_backward(dh, x_in, p + "attention_norm")

    if not base:  # frozen base: the embeddings' gradients are not needed
        return loss, {n: grads[n] for n in ad.params}

    # --- embeddings ---
    if gpt2:
        d_pos = xp.zeros(W["pos_embeddings.weight"].shape, dtype=dx.dtype, device=device(dx))  # [max_seq_len,D]; unseen rows get 0
        d_pos[:T] = xp.sum(dx, axis=0)  # [B,T,D] -> [T,D]: every sequence used positions 0..T-1
        grads["pos_embeddings.weight"] = d_pos
    if cfg.tie_embeddings:  # one table, two uses: the head's gradient plus the lookup's
        grads["tok_embeddings.weight"] = ops.embedding_backward(dx, ids, cfg.vocab_size, out=d_head)
    else:
        grads["output.weight"] = d_head
        grads["tok_embeddings.weight"] = ops.embedding_backward(dx, ids, cfg.vocab_size)
    out = {n: grads[n] for n in W}
    if ad is not None:
        out.update((n, grads[n]) for n in ad.params)
    return loss, out
