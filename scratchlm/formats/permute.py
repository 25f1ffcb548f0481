"""The one q/k row permutation between Hugging Face's and Meta's RoPE layouts.

RoPE rotates pairs of coordinates inside each head. The two layouts pick the pairs differently:

* Meta (and GGUF) use the *interleaved* order: within a head of Hd rows, rows (0,1), (2,3), ...,
  (Hd-2, Hd-1) form the rotated pairs, pair j using frequency j.
* Hugging Face uses the *rotate-half* order: row j pairs with row j + Hd/2.

Both describe the same network once the rows of wq and wk (and their biases) are reordered, head by
head. Write a head's Meta rows as pairs (a0, b0), (a1, b1), ...; Hugging Face stores the same head
as a0, a1, ..., then b0, b1, ... So, per head:

    meta_to_hf: [Hd/2, 2] rows -> transpose -> [2, Hd/2]   (collect the first halves, then the seconds)
    hf_to_meta: [2, Hd/2] rows -> transpose -> [Hd/2, 2]   (interleave the halves back)

wv, wo and everything else are not touched: only the vectors that RoPE rotates (q and k) differ.
The functions work on weights [n*Hd, D] and on biases [n*Hd]; they return new C-contiguous arrays.
"""

from __future__ import annotations

import numpy as np

from ..errors import FormatError


def _check(w: np.ndarray, n_heads: int, head_dim: int) -> None:
    if w.ndim not in (1, 2) or head_dim % 2 or w.shape[0] != n_heads * head_dim:
        raise FormatError(f"q/k permutation: {n_heads} heads of {head_dim} rows do not fit an array of shape {list(w.shape)}")


def hf_to_meta(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Hugging Face rotate-half rows -> Meta interleaved rows. w: [n*Hd, D] or [n*Hd]."""
    _check(w, n_heads, head_dim)
    rest = w.shape[1:]  # (D,) for a weight, () for a bias
    x = w.reshape(n_heads, 2, head_dim // 2, *rest)  # [n*Hd, ...] -> [n, 2, Hd/2, ...]
    x = x.swapaxes(1, 2)  # [n, 2, Hd/2, ...] -> [n, Hd/2, 2, ...]
    return np.ascontiguousarray(x.reshape(w.shape))  # [n, Hd/2, 2, ...] -> [n*Hd, ...]


def meta_to_hf(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Meta interleaved rows -> Hugging Face rotate-half rows (the inverse of hf_to_meta)."""
    _check(w, n_heads, head_dim)
    rest = w.shape[1:]
    x = w.reshape(n_heads, head_dim // 2, 2, *rest)  # [n*Hd, ...] -> [n, Hd/2, 2, ...]
    x = x.swapaxes(1, 2)  # [n, Hd/2, 2, ...] -> [n, 2, Hd/2, ...]
    return np.ascontiguousarray(x.reshape(w.shape))  # [n, 2, Hd/2, ...] -> [n*Hd, ...]
