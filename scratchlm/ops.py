"""Stateless math of the decoder, one readable function per op.

Every function takes arrays of any Array-API namespace (NumPy by default, torch, CuPy) and
computes with the namespace of its inputs, so the same model code runs on each backend.
Shape letters: B batch, T new tokens, S positions attended to, D model dim, H query heads,
K kv heads, G = H // K query heads per kv head, Hd head dim, F ffn hidden, V vocab.
"""

from __future__ import annotations

import math

import numpy as np
from array_api_compat import array_namespace


# --- normalisation ---------------------------------------------------------------------------

def rms_norm(x, w, eps: float):
    """RMSNorm (Llama): x / sqrt(mean(x^2) + eps) * w, over the last axis."""
    xp = array_namespace(x)
    ms = xp.mean(x * x, axis=-1, keepdims=True)  # [..., D] -> [..., 1]
    return x * (1.0 / xp.sqrt(ms + eps)) * w


def layer_norm(x, w, b, eps: float):
    """LayerNorm (GPT-2): (x - mean) / sqrt(var + eps) * w + b, over the last axis."""
    xp = array_namespace(x)
    mu = xp.mean(x, axis=-1, keepdims=True)  # [..., D] -> [..., 1]
    xc = x - mu
    var = xp.mean(xc * xc, axis=-1, keepdims=True)  # [..., 1]
    return xc * (1.0 / xp.sqrt(var + eps)) * w + b


# --- activations -----------------------------------------------------------------------------

def silu(x):
    """SiLU / swish: x * sigmoid(x)."""
    xp = array_namespace(x)
    return x / (1.0 + xp.exp(-x))


def swiglu(gate, up):
    """SwiGLU's gating (Llama's FFN): silu(x W1) * (x W3); the caller applies W2."""
    return silu(gate) * up


def gelu_tanh(x):
    """GELU, tanh approximation (GPT-2's "gelu_new")."""
    xp = array_namespace(x)
    return 0.5 * x * (1.0 + xp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))))


def softmax(x, axis: int = -1):
    """Numerically stable softmax: subtract the max so exp never overflows."""
    xp = array_namespace(x)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


# --- RoPE ------------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies of rotary embeddings, [Hd/2] float32 (host-side, computed once).

    inv_freq[i] = theta^(-2i/Hd). Llama 3.1's "llama3" scaling leaves high frequencies alone,
    divides low frequencies (long wavelengths) by `factor`, and blends smoothly in between,
    so the model reaches a longer context without retraining its short-range heads.
    """
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))  # [Hd/2]
    inv = inv.astype(np.float32)
    if not scaling:
        return inv
    kind = scaling.get("rope_type")
    if kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)  # long wavelengths: slow down
        smooth = (old_ctx / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    if kind == "freq_factors":  # GGUF's rope_freqs tensor: divide each inverse frequency by its factor
        return (inv / np.asarray(scaling["factors"], dtype=np.float32)).astype(np.float32)
    raise ValueError(f"unknown rope scaling type {kind!r}")


def rope_cos_sin(inv_freq: np.ndarray, start: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of the rotation angles pos * inv_freq for positions start..start+T-1: [T, Hd/2] each."""
    pos = np.arange(start, start + T, dtype=np.float32)
    angles = np.outer(pos, inv_freq).astype(np.float32)  # [T] x [Hd/2] -> [T, Hd/2]
    return np.cos(angles), np.sin(angles)


def rope(x, cos, sin):
    """Rotate each pair (x[2i], x[2i+1]) of every head by its angle (Meta's interleaved layout).

    x: [B, T, N, Hd] (N heads), cos/sin: [T, Hd/2]  ->  [B, T, N, Hd]
    """
    xp = array_namespace(x)
    B, T, N, Hd = x.shape
    xr = xp.reshape(x, (B, T, N, Hd // 2, 2))  # [B,T,N,Hd] -> [B,T,N,Hd/2,2]
    x0, x1 = xr[..., 0], xr[..., 1]  # [B,T,N,Hd/2] each
    c, s = cos[:, None, :], sin[:, None, :]  # [T,1,Hd/2], broadcast over B and N
    out = xp.stack((x0 * c - x1 * s, x0 * s + x1 * c), axis=-1)  # [B,T,N,Hd/2,2]
    return xp.reshape(out, (B, T, N, Hd))


# --- attention -------------------------------------------------------------------------------

def causal_mask(T: int, S: int) -> np.ndarray:
    """[T, S] float32 added to the scores: 0 where query t (absolute position S-T+t) may see key s
    (s <= S-T+t), -inf where it may not (the future)."""
    visible = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]  # [T,S]
    return np.where(visible, 0.0, -np.inf).astype(np.float32)


def attention(q, k, v, mask=None, record=None):
    """Causal grouped-query attention.

    q: [B, H, T, Hd]; k, v: [B, K, S, Hd] (S = cached + new positions); mask: [T, S] additive or None
    (None when every key is visible, as for a single new token). Query head h reads kv head h // G.
    Returns [B, H, T, Hd]. `record(name, array)`, when given, receives the scaled scores and the
    probabilities, both [B, H, T, S].
    """
    xp = array_namespace(q)
    B, H, T, Hd = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    qg = xp.reshape(q, (B, K, G, T, Hd))  # [B,H,T,Hd] -> [B,K,G,T,Hd]: heads sharing a kv head side by side
    kt = xp.permute_dims(k, (0, 1, 3, 2))[:, :, None]  # [B,K,S,Hd] -> [B,K,1,Hd,S]
    scores = (qg @ kt) * (1.0 / math.sqrt(Hd))  # [B,K,G,T,Hd] @ [B,K,1,Hd,S] -> [B,K,G,T,S]
    if mask is not None:
        scores = scores + mask  # -inf on future positions
    p = softmax(scores, axis=-1)  # [B,K,G,T,S]
    if record is not None:
        record("scores", xp.reshape(scores, (B, H, T, S)))  # [B,K,G,T,S] -> [B,H,T,S]
        record("probs", xp.reshape(p, (B, H, T, S)))
    out = p @ v[:, :, None]  # [B,K,G,T,S] @ [B,K,1,S,Hd] -> [B,K,G,T,Hd]
    return xp.reshape(out, (B, H, T, Hd))
