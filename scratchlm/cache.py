"""KVCache: the keys and values of every past position, preallocated once per generation.

Decoding one token then costs one new row per layer instead of recomputing the whole prefix.
The cache may be kept in float16 (`dtype`): half the memory (Llama 3 8B at 8192 positions: 1 GB
instead of 2 GB), at the price of converting the positions read back to float32 at every step.
Each layer's buffers live with its block (devices.py): on the block's device, in its compute dtype.
"""

from __future__ import annotations

from .ops import array_namespace, device


class KVCache:
    """Per layer, k and v buffers of shape [B, K, S_max, Hd], filled left to right.

    `like`: an array whose namespace, device and dtype the buffers take, or one such array per layer
    (blocks placed on different devices). `dtype`: "f16" to store keys and values in float16, or None
    for each layer's compute dtype."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, like, dtype=None):
        likes = list(like) if isinstance(like, (list, tuple)) else [like] * n_layers
        if len(likes) != n_layers:
            raise ValueError(f"KVCache needs one array per layer to place it by, got {len(likes)} for {n_layers} layers")
        shape = (batch, n_kv_heads, max_len, head_dim)  # [B,K,S_max,Hd]
        self.k, self.v, self._compute = [], [], []
        for a in likes:
            xp = array_namespace(a)
            store = a.dtype if dtype is None else (xp.float16 if dtype == "f16" else dtype)
            self.k.append(xp.zeros(shape, dtype=store, device=device(a)))
            self.v.append(xp.zeros(shape, dtype=store, device=device(a)))
            self._compute.append(a.dtype)  # what attention reads
        self.dtype = self.k[0].dtype if n_layers else None  # what is stored
        self.compute_dtype = self._compute[0] if n_layers else None
        self.max_len = max_len
        self.length = 0  # positions filled (the same for every layer after a full forward)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.k + self.v)

    def update(self, layer: int, k, v, start: int):
        """Write k, v [B,K,T,Hd] at positions start..start+T-1; return all keys/values so far [B,K,start+T,Hd]."""
        T = k.shape[2]
        end = start + T
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        k, v = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if k.dtype != self._compute[layer]:  # kept in float16: widened for the attention's matmuls
            xp = array_namespace(k)
            k, v = xp.astype(k, self._compute[layer]), xp.astype(v, self._compute[layer])
        return k, v
