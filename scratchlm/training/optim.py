"""AdamW, the learning-rate schedule and gradient clipping, in NumPy.

Parameters are the arrays of `model.weights` (some are views into fused matrices), so every
update happens in place: the model sees new values without any re-fusing.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import FormatError


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_lr: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup` steps to
    max_lr, then a cosine from max_lr down to min_lr at step `total`, and min_lr after that."""
    if step < warmup:
        return max_lr * (step + 1) / warmup  # step 0 already moves a little, as in nanoGPT
    if step >= total or total <= warmup:
        return min_lr
    progress = (step - warmup) / (total - warmup)  # 0 -> 1 over the decay
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def global_norm(grads) -> float:
    """sqrt of the sum of squares of every gradient entry (float64 accumulation)."""
    total = 0.0
    for g in grads.values():
        g = g.reshape(-1)
        total += float(np.dot(g, g))  # a BLAS dot: no temporary g*g array
    return math.sqrt(total)


def clip_grad_norm(grads, max_norm: float) -> float:
    """Scale all gradients in place so their global norm is at most max_norm; return the norm before.

    Same rule as torch.nn.utils.clip_grad_norm_: factor max_norm / (norm + 1e-6), never above 1.
    """
    norm = global_norm(grads)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads.values():
            g *= np.float32(coef)
    return norm


def decays(name: str, shape) -> bool:
    """Weight decay applies to matrices only: not to norms, biases or any other 1-D parameter."""
    return len(shape) >= 2 and not name.endswith(".bias") and "norm" not in name.rsplit(".", 2)[-2]


class AdamW:
    """Adam with decoupled weight decay (Loshchilov & Hutter), the update torch.optim.AdamW makes:

        p <- p * (1 - lr * wd)                      (decay, matrices only)
        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params: dict, *, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.1):
        self.params = params
        self.b1, self.b2 = float(betas[0]), float(betas[1])
        self.eps, self.wd = float(eps), float(weight_decay)
        self.t = 0  # steps taken
        self.m = {n: np.zeros(p.shape, np.float32) for n, p in params.items()}
        self.v = {n: np.zeros(p.shape, np.float32) for n, p in params.items()}
        self.decay = {n: decays(n, p.shape) for n, p in params.items()}
        # one scratch buffer per shape, reused by every parameter of that shape
        self._tmp = {}

    def _scratch(self, shape, k: int):
        key = (tuple(shape), k)
        if key not in self._tmp:
            self._tmp[key] = np.empty(shape, np.float32)
        return self._tmp[key]

    def step(self, grads: dict, lr: float) -> None:
        self.t += 1
        b1, b2, t = self.b1, self.b2, self.t
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        for n, p in self.params.items():
            g, m, v = grads[n], self.m[n], self.v[n]
            if self.decay[n] and self.wd:
                p *= np.float32(1.0 - lr * self.wd)
            # m <- m + (1-b1)(g - m): the same moving average, written as torch's lerp rounds it
            d = np.subtract(g, m, out=self._scratch(g.shape, 0))
            d *= np.float32(1.0 - b1)
            m += d
            v *= np.float32(b2)
            g2 = np.multiply(g, g, out=d)
            g2 *= np.float32(1.0 - b2)
            v += g2
            denom = np.sqrt(v, out=self._scratch(g.shape, 1))
            denom /= np.float32(bc2_sqrt)
            denom += np.float32(self.eps)
            upd = np.divide(m, denom, out=denom)
            upd *= np.float32(step_size)
            p -= upd

    # --- checkpointing -----------------------------------------------------------------------

    def state_tensors(self) -> dict:
        """The moment estimates as named arrays (saved to optimizer.safetensors)."""
        out = {}
        for n in self.params:
            out["m." + n] = self.m[n]
            out["v." + n] = self.v[n]
        return out

    def state_meta(self) -> dict:
        return {"t": self.t, "betas": [self.b1, self.b2], "eps": self.eps, "weight_decay": self.wd}

    def load_state(self, tensors: dict, meta: dict, source: str) -> None:
        want = set(self.state_tensors())
        if set(tensors) != want:
            missing = sorted(want - set(tensors))
            extra = sorted(set(tensors) - want)
            raise FormatError(f"{source}: optimizer state does not match the model "
                              f"(missing {missing[:1]}, unexpected {extra[:1]})")
        for n in self.params:
            for store, key in ((self.m, "m." + n), (self.v, "v." + n)):
                a = tensors[key]
                if a.shape != store[n].shape or a.dtype != np.float32:
                    raise FormatError(f"{source}: {key} has shape {list(a.shape)} {a.dtype}, "
                                      f"expected {list(store[n].shape)} float32")
                store[n][...] = a
        t = meta.get("t")
        if not isinstance(t, int) or t < 0:
            raise FormatError(f"{source}: bad optimizer step count {t!r}")
        self.t = t
