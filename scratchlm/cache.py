"""KVCache: the keys and values of every past position, preallocated once per generation.

Decoding one token then costs one new row per layer instead of recomputing the whole prefix.
The cache may be kept in float16 (`dtype`): half the memory (Llama 3 8B at 8192 positions: 1 GB
instead of 2 GB), at the price of converting the positions read back to float32 at every step.
"""

from __future__ import annotations

from .ops import array_namespace


class KVCache:
    """Per layer, k and v buffers of shape [B, K, S_max, Hd], filled left to right."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int, like, dtype=None):
        xp = array_namespace(like)
        shape = (batch, n_kv_heads, max_len, head_dim)  # [B,K,S_max,Hd]
        self.dtype = like.dtype if dtype is None else dtype  # what is stored
        self.compute_dtype = like.dtype  # what attention reads
        self.k = [xp.zeros(shape, dtype=self.dtype) for _ in range(n_layers)]
        self.v = [xp.zeros(shape, dtype=self.dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # positions filled (the same for every layer after a full forward)

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in self.k + self.v)

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
        if self.dtype != self.compute_dtype:  # kept in float16: widened for the attention's matmuls
            xp = array_namespace(k)
            k, v = xp.astype(k, self.compute_dtype), xp.astype(v, self.compute_dtype)
        return k, v
