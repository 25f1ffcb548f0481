"""Stateless math of the decoder, one readable function per op.

Every function takes arrays of any Array-API namespace (NumPy by default, torch, CuPy) and
computes with the namespace of its inputs, so the same model code runs on each backend.
Shape letters: B batch, T new tokens, S positions attended to, D model dim, H query heads,
K kv heads, G = H // K query heads per kv head, Hd head dim, F ffn hidden, V vocab.
"""

from __future__ import annotations

import functools
import math
import sys
import types

import numpy as np

from . import kernels
from .quant import QuantizedMatrix


def is_numpy_array(x) -> bool:
    return isinstance(x, np.ndarray)


def is_torch_array(x) -> bool:
    torch = sys.modules.get("torch")  # never imported here: a torch tensor means torch is loaded already
    return torch is not None and isinstance(x, torch.Tensor)


def device(x):
    """The device of an array ("cpu" for NumPy), as array_api_compat.device says it."""
    if isinstance(x, np.ndarray):
        return "cpu"
    from array_api_compat import device as _device
    return _device(x)


def _numpy_namespace():
    """NumPy's Array API namespace: NumPy 2's own functions (its main namespace follows the standard), with
    reshape and permute_dims as the plain array methods (the same results, without the ~2 us of a wrapper:
    a training chunk makes ~300 such calls). array_api_compat, which adapts older NumPy, costs ~100 ms of
    import, a tenth of the time to a first token, so it is imported only for NumPy 1 and other backends."""
    if int(np.__version__.split(".")[0]) < 2:
        from array_api_compat import array_namespace as _compat
        base = _compat(np.empty(0))
    else:
        base = np
    ns = types.SimpleNamespace(**{k: getattr(base, k) for k in dir(base) if not k.startswith("__")})

    def reshape(x, shape, copy=None):
        return x.reshape(shape) if copy is None else base.reshape(x, shape, copy=copy)

    ns.reshape = reshape
    ns.permute_dims = lambda x, axes: x.transpose(axes)
    return ns


_NUMPY = _numpy_namespace()


def array_namespace(*xs):
    """The Array API namespace of the arguments (array_api_compat's), with NumPy arrays answered at once:
    the general lookup costs ~9 us, paid by every op of a training step (~300 per chunk)."""
    if all(type(x) is np.ndarray for x in xs):
        return _NUMPY
    if _TORCH_NS and all(type(x) is _TORCH_NS[0] for x in xs):  # torch tensors: the same answer, looked up once
        return _TORCH_NS[1]
    from array_api_compat import array_namespace as _compat
    ns = _compat(*xs)
    if not _TORCH_NS and is_torch_array(xs[0]) and all(type(x) is type(xs[0]) for x in xs):
        _TORCH_NS[:] = [type(xs[0]), ns]
    return ns


_TORCH_NS = []  # [torch.Tensor, its array_api_compat namespace] once a torch tensor has been seen


def move(x, like):
    """x on the device of `like` (an empty array standing for a block's home: devices.py), floats in its
    dtype; x itself when it is there already. NumPy homes get a host float32 copy (sampling and the C
    kernels read those); a NumPy x going to torch is copied, never shared."""
    if type(x) is np.ndarray and type(like) is np.ndarray:
        return x
    if is_torch_array(like):
        if is_torch_array(x):
            if x.device == like.device and (x.dtype == like.dtype or not x.is_floating_point()):
                return x
        else:
            torch = sys.modules["torch"]
            x = torch.from_numpy(np.ascontiguousarray(x))
            return x.to(device=like.device, dtype=like.dtype if x.is_floating_point() else x.dtype, copy=True)
        return x.to(device=like.device, dtype=like.dtype if x.is_floating_point() else x.dtype)
    if is_torch_array(x):
        x = x.detach()
        return (x.float() if x.is_floating_point() else x).cpu().numpy()
    return np.asarray(x)


def concat(parts, axis: int = 0):
    """Arrays joined along `axis` (model.py's fused matrices). Torch tensors in page-locked host memory
    (devices.py's streamed blocks) stay page-locked, so their copies to the GPU can run asynchronously."""
    if is_torch_array(parts[0]) and parts[0].device.type == "cpu" and parts[0].is_pinned():
        torch = sys.modules["torch"]
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)
        out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
        return torch.cat(parts, dim=axis, out=out)
    return array_namespace(*parts).concat(parts, axis=axis)


# Speed note: on the CPU, element-wise work is bound by memory traffic. A fresh [.., D] result costs a
# new buffer that evicts the cache, so arrays this module has just made (never the caller's inputs)
# are updated in place (x -= m, _exp_), and a mean over the last axis is one dot per row (vecdot),
# which NumPy runs several times faster than a reduction over short rows.

def _exp_(x):
    """exp(x) in place: x must be a fresh array of the caller's own. NumPy and torch write into x;
    other namespaces (no in-place exp in the Array API) return a new array."""
    if is_numpy_array(x):
        return np.exp(x, out=x)
    if is_torch_array(x):
        return x.exp_()
    return array_namespace(x).exp(x)


def _column_sums(a):
    """Sums over the rows of a [N, D] array -> [D], as one matrix-vector product: BLAS does it in less
    than half the time of NumPy's reduction over axis 0 (measured on [512, 128])."""
    xp = array_namespace(a)
    return xp.ones((a.shape[0],), dtype=a.dtype, device=device(a)) @ a  # [N] @ [N,D] -> [D]


def _row_sums(a):
    """Sums over the last axis [..., n] -> [...], as a matrix-vector product: BLAS does it about 4x faster
    than NumPy's reduction over short rows (measured on attention scores, rows of 128)."""
    xp = array_namespace(a)
    return a @ xp.ones((a.shape[-1],), dtype=a.dtype, device=device(a))  # [..., n] @ [n] -> [...]


def _c_contiguous(x, scale: float = 1.0):
    """x * scale laid out row-major (a copy, the product made as it is laid out). BLAS runs a batch of
    [n, Hd] @ [Hd, b] products 1.4x faster from a row-major [Hd, b] than from the transposed view of a
    [b, Hd] (measured with Hd=32: 75 against 105-135 GFLOP/s)."""
    if is_numpy_array(x):
        return np.multiply(x, scale, out=np.empty(x.shape, x.dtype))  # one pass, written row-major
    if is_torch_array(x):
        return (x * scale).contiguous()
    return x * scale


def _tanh_(x):
    """tanh(x) in place, like _exp_."""
    if is_numpy_array(x):
        return np.tanh(x, out=x)
    if is_torch_array(x):
        return x.tanh_()
    return array_namespace(x).tanh(x)


def _small_f32(x, w) -> bool:
    """A few rows of NumPy float32 (a decode step), where kernels.py's C ops replace several NumPy calls."""
    return (type(x) is np.ndarray and x.dtype == np.float32 and type(w) is np.ndarray and w.dtype == np.float32
            and x.size <= kernels.SMALL_ROWS * x.shape[-1])


# --- normalisation ---------------------------------------------------------------------------

def rms_norm(x, w, eps: float):
    """RMSNorm (Llama): x / sqrt(mean(x^2) + eps) * w, over the last axis."""
    if kernels.C_OPS is not None and _small_f32(x, w):  # a decode step: one C call instead of 7 NumPy ones
        out = np.empty(x.shape, np.float32)
        kernels.C_OPS.rms_norm(np.ascontiguousarray(x), np.ascontiguousarray(w), eps, out)
        return out
    xp = array_namespace(x)
    ms = xp.vecdot(x, x)[..., None] / x.shape[-1]  # [..., D] -> [..., 1]: mean of squares, one dot per row
    y = x * (1.0 / xp.sqrt(ms + eps))  # [..., D]
    y *= w
    return y


def rms_norm_backward(dy, x, w, eps: float):
    """Gradients of rms_norm from the output gradient dy [..., D] and the forward's input x: (dx, dw).

    With r = 1/sqrt(mean(x^2) + eps), xh = x*r and g = dy*w: dw = sum over rows of dy*xh, and
    dx = r * (g - xh * mean(g*xh)): the second term removes what would only change the rms.
    Both come from one product dy*x: dw = r @ (dy*x) over the rows, and mean(g*xh) = r/D * (dy*x) @ w,
    so dx = r*g - x * (r^3/D * (dy*x) @ w), two matrix-vector products instead of passes over [..., D].
    """
    xp = array_namespace(x)
    D = x.shape[-1]
    r = 1.0 / xp.sqrt(xp.vecdot(x, x)[..., None] / D + eps)  # [..., D] -> [..., 1]
    dyx = dy * x  # [..., D]
    dw = xp.reshape(r, (-1,)) @ xp.reshape(dyx, (-1, D))  # [N] @ [N,D] -> [D]: sum over rows of dy*x*r
    c = (dyx @ w)[..., None]  # [..., D] @ [D] -> [..., 1]: sum of dy*w*x per row
    c *= r * r * r / D  # r * mean(g*xh)
    g = dy * w  # [..., D]
    g *= r
    g -= x * c  # dx
    return g, dw


def layer_norm(x, w, b, eps: float):
    """LayerNorm (GPT-2): (x - mean) / sqrt(var + eps) * w + b, over the last axis."""
    xp = array_namespace(x)
    xc = x - _row_sums(x)[..., None] / x.shape[-1]  # [..., D] - [..., 1]: centred, a fresh array
    r = 1.0 / xp.sqrt(xp.vecdot(xc, xc)[..., None] / x.shape[-1] + eps)  # [..., 1]: 1/std
    xc *= r
    xc *= w
    xc += b
    return xc


def layer_norm_backward(dy, x, w, eps: float):
    """Gradients of layer_norm from dy [..., D] and the forward's input x: (dx, dw, db).

    With xc = x - mean, r = 1/std, xh = xc * r and g = dy*w: dx = r * (g - mean(g) - xh * mean(g*xh)),
    the mean and the variance each taking their share back out of g. As in rms_norm_backward, the
    sums come from one product dy*xc and matrix-vector products: dw = r @ (dy*xc) over the rows,
    mean(g) = (dy @ w) / D and mean(g*xh) = r/D * (dy*xc) @ w, so dx = r*(g - mean(g)) - xc * r^3/D * (dy*xc) @ w.
    """
    xp = array_namespace(x)
    D = x.shape[-1]
    xc = x - _row_sums(x)[..., None] / D  # [..., D]
    r = 1.0 / xp.sqrt(xp.vecdot(xc, xc)[..., None] / D + eps)  # [..., 1]
    dyxc = dy * xc  # [..., D]
    dw = xp.reshape(r, (-1,)) @ xp.reshape(dyxc, (-1, D))  # [N] @ [N,D] -> [D]: sum over rows of dy*xh
    db = _column_sums(xp.reshape(dy, (-1, D)))  # [N,D] -> [D]
    c = (dyxc @ w)[..., None]  # [..., D] @ [D] -> [..., 1]: sum of dy*w*xc per row
    c *= r * r * r / D  # r * mean(g*xh)
    g = dy * w  # [..., D]
    g -= (dy @ w)[..., None] / D  # - mean(g)
    g *= r
    g -= xc * c  # dx
    return g, dw, db


# --- activations -----------------------------------------------------------------------------

def sigmoid(x):
    """1 / (1 + e^-x), in one fresh array."""
    s = _exp_(-x)
    s += 1.0
    if is_numpy_array(s):
        return np.reciprocal(s, out=s)
    if is_torch_array(s):
        return s.reciprocal_()
    return 1.0 / s


def swiglu(gate, up, sig=None):
    """SwiGLU's gating (Llama's FFN): silu(x W1) * (x W3) = gate * sigmoid(gate) * up; the caller
    applies W2. `sig`: sigmoid(gate) when the caller has computed it (the model keeps it for the backward)."""
    y = gate * (sigmoid(gate) if sig is None else sig)  # silu(gate), fresh
    y *= up
    return y


def swiglu_halves(gate_up):
    """swiglu of the two halves of [..., 2F] (gate, then up: one fused projection's output) -> [..., F]."""
    F = gate_up.shape[-1] // 2
    if kernels.C_OPS is not None and _small_f32(gate_up, gate_up) and gate_up.flags.c_contiguous:
        out = np.empty((*gate_up.shape[:-1], F), np.float32)  # a decode step: one C call instead of 5 NumPy ones
        kernels.C_OPS.swiglu(gate_up.reshape(-1, 2 * F), out.reshape(-1, F))
        return out
    return swiglu(gate_up[..., :F], gate_up[..., F:])


def swiglu_backward(dy, gate, up, sig=None):
    """Gradients of swiglu(gate, up) = silu(gate) * up from dy [..., F]: (dgate, dup), each [..., F].

    With s = sigmoid(gate) (`sig`, the forward's, or recomputed) and p = dy * s: dup = dy * gate * s = p * gate,
    and dgate = dy * up * silu'(gate) with silu'(gate) = s (1 + gate (1 - s)), so dgate = up * (p - dup (s - 1)):
    6 passes over [..., F] in three fresh arrays."""
    s = sigmoid(gate) if sig is None else sig
    p = dy * s
    dup = p * gate
    q = s - 1.0
    q *= dup
    p -= q
    p *= up  # dgate
    return p, dup


_GELU_C = math.sqrt(2.0 / math.pi)


def gelu_tanh_phi(x):
    """Phi(x) ~ 0.5 (1 + tanh(c (x + 0.044715 x^3))), c = sqrt(2/pi): the normal CDF in GPT-2's tanh form,
    the factor GELU multiplies x by (the model keeps it for the backward). One fresh array, updated in place."""
    p = x * x
    p *= _GELU_C * 0.044715
    p += _GELU_C
    p *= x  # c (x + 0.044715 x^3), as x * (c + c*0.044715 x^2)
    p = _tanh_(p)
    p += 1.0
    p *= 0.5
    return p


def gelu_tanh(x, phi=None):
    """GELU, tanh approximation (GPT-2's "gelu_new"): x * Phi(x) (gelu_tanh_phi; `phi` when the caller has it)."""
    return x * (gelu_tanh_phi(x) if phi is None else phi)


def gelu_tanh_backward(dy, x, phi=None):
    """dy * d/dx [x Phi(x)] = dy * (Phi + x Phi'), with Phi = `phi` (the forward's, or recomputed).

    With t = tanh(c (x + 0.044715 x^3)) = 2 Phi - 1: Phi' = 0.5 (1 - t^2) c (1 + 3*0.044715 x^2) and
    1 - t^2 = 4 Phi (1 - Phi), so the derivative is Phi + Phi (1 - Phi) * 2c x (1 + 3*0.044715 x^2): from Phi
    and x alone, in two fresh arrays updated in place (9 passes over [..., F])."""
    p = gelu_tanh_phi(x) if phi is None else phi
    w = x * x
    w *= 2.0 * _GELU_C * 3.0 * 0.044715
    w += 2.0 * _GELU_C
    w *= x  # 2c x (1 + 3*0.044715 x^2)
    g = 1.0 - p
    g *= p
    g *= w
    g += p  # d gelu / dx
    g *= dy
    return g


def softmax(x, axis: int = -1, inplace: bool = False):
    """Numerically stable softmax: subtract the max so exp never overflows. inplace=True overwrites x
    (a fresh array of the caller's own, like attention scores) and saves two passes over memory."""
    xp = array_namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    if inplace:
        x -= m
        e = _exp_(x)
    else:
        e = _exp_(x - m)
    e /= xp.sum(e, axis=axis, keepdims=True)
    return e


def softmax_backward(dy, y, axis: int = -1):
    """Gradient of softmax from dy and the forward's output y: y * (dy - sum(dy * y)) along `axis`."""
    xp = array_namespace(y)
    return y * (dy - xp.sum(dy * y, axis=axis, keepdims=True))


def log_softmax(x, axis: int = -1):
    """log(softmax(x)) computed as x - logsumexp(x), without overflow or log(0)."""
    xp = array_namespace(x)
    z = x - xp.max(x, axis=axis, keepdims=True)  # a fresh array: shifted in place below
    z -= xp.log(xp.sum(xp.exp(z), axis=axis, keepdims=True))
    return z


def _one_hot(targets, V: int, like):
    """[..., V] booleans, True at each target id (a comparison: integer-array writes are not in the Array API)."""
    xp = array_namespace(like)
    return targets[..., None] == xp.arange(V, device=device(like))  # [...,1] == [V] -> [..., V]


def cross_entropy(logits, targets, logp=None):
    """Mean over all tokens of -log softmax(logits)[target]: logits [..., V] float, targets [...] int -> 0-d.
    `logp`, the caller's log_softmax(logits) when it has one, saves recomputing it."""
    xp = array_namespace(logits)
    logp = log_softmax(logits) if logp is None else logp  # [..., V]
    picked = xp.take_along_axis(logp, targets[..., None], axis=-1)  # [..., V] -> [..., 1]: log p of each target
    return -xp.mean(picked)


def cross_entropy_backward(logits, targets, dloss: float = 1.0, logp=None):
    """Gradient of cross_entropy with respect to the logits: (softmax(logits) - onehot(targets)) * dloss / N,
    N the number of tokens (the loss is a mean). [..., V]. With `logp` (log_softmax(logits), shared with
    the loss) the softmax is one exp instead of a second max/exp/sum/divide."""
    xp = array_namespace(logits)
    V = logits.shape[-1]
    n = math.prod(logits.shape[:-1])
    g = softmax(logits) if logp is None else xp.exp(logp)  # [..., V], a fresh array: safe to update in place
    g -= xp.astype(_one_hot(targets, V, logits), g.dtype)
    g *= dloss / n
    return g


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


def rope_rotation(cos, sin):
    """e^(i*angle) [T, 1, Hd/2] complex64 for rope on NumPy (None on other namespaces): computed once per
    forward and shared by every layer's rope instead of once per layer."""
    if not is_numpy_array(cos):
        return None
    return (cos + 1j * sin).astype(np.complex64)[:, None, :]  # [T,Hd/2] -> [T,1,Hd/2]


def rope(x, cos, sin, inplace: bool = False, rot=None):
    """Rotate each pair (x[2i], x[2i+1]) of every head by its angle (Meta's interleaved layout).

    x: [B, T, N, Hd] (N heads), cos/sin: [T, Hd/2]  ->  [B, T, N, Hd]

    Each pair is a complex number x[2i] + i*x[2i+1] multiplied by e^(i*angle), as in Meta's reference.
    On NumPy the pairs are viewed as complex64 (one complex multiply: 4x faster than the four real
    products below); other namespaces use the real form. inplace=True writes the result into x (an
    array of the caller's own, or a view into one) and returns it. `rot`: rope_rotation(cos, sin), when the
    caller has it (float32 x).
    """
    if is_numpy_array(x) and x.dtype in (np.float32, np.float64) and x.strides[-1] == x.itemsize:
        cdt = np.complex64 if x.dtype == np.float32 else np.complex128
        if rot is None or x.dtype != np.float32:
            rot = (cos + 1j * sin).astype(cdt)[:, None, :]  # [T,1,Hd/2], e^(i*angle), broadcast over B and N
        xc = x.view(cdt)  # [B,T,N,Hd] real -> [B,T,N,Hd/2] complex, the same memory
        if inplace:
            xc *= rot
            return x
        return (xc * rot).view(x.dtype)  # [B,T,N,Hd/2] complex -> [B,T,N,Hd] real
    if inplace:
        x[...] = rope(x, cos, sin)
        return x
    xp = array_namespace(x)
    B, T, N, Hd = x.shape
    xr = xp.reshape(x, (B, T, N * Hd // 2, 2))  # [B,T,N,Hd] -> [B,T,N*Hd/2,2]: every head's pairs in one row
    x0, x1 = xr[..., 0], xr[..., 1]  # [B,T,N*Hd/2] each
    c, s = xp.tile(cos, (1, N)), xp.tile(sin, (1, N))  # [T,Hd/2] -> [T,N*Hd/2]: long rows run faster than N short ones
    out = xp.stack((x0 * c - x1 * s, x0 * s + x1 * c), axis=-1)  # [B,T,N*Hd/2,2]
    return xp.reshape(out, (B, T, N, Hd))


def rope_backward(dy, cos, sin, inplace: bool = False):
    """Gradient of rope: the transpose of a rotation is the rotation by the opposite angle.

    dy: [B, T, N, Hd], cos/sin: [T, Hd/2] -> [B, T, N, Hd] (written into dy with inplace=True)
    """
    return rope(dy, cos, -sin, inplace=inplace)


# --- attention -------------------------------------------------------------------------------

def causal_mask(T: int, S: int) -> np.ndarray:
    """[T, S] float32 added to the scores: 0 where query t (absolute position S-T+t) may see key s
    (s <= S-T+t), -inf where it may not (the future)."""
    visible = np.arange(S)[None, :] <= np.arange(S - T, S)[:, None]  # [T,S]
    return np.where(visible, 0.0, -np.inf).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _diagonal_mask(block: int) -> np.ndarray:
    """causal_mask(block, block), made once per block size for causal_attention (which only reads it)."""
    return causal_mask(block, block)


def attention(q, k, v, mask=None, record=None, record_scores: bool = True):
    """Causal grouped-query attention.

    q: [B, H, T, Hd]; k, v: [B, K, S, Hd] (S = cached + new positions); mask: [T, S] additive or None
    (None when every key is visible, as for a single new token). Query head h reads kv head h // G.
    Returns [B, H, T, Hd]. `record(name, array)`, when given, receives the scaled scores (unless
    record_scores=False: they cost a copy, and the backward needs only the probabilities) and the
    probabilities, both [B, H, T, S].
    """
    xp = array_namespace(q)
    B, H, T, Hd = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    if (T == 1 and B == 1 and mask is None and record is None and kernels.C_OPS is not None
            and all(type(a) is np.ndarray and a.dtype == np.float32 for a in (q, k, v))):
        # a decode step: the same softmax(q.k / sqrt(Hd)) @ v in one C call instead of ~12 NumPy ones
        out = np.empty((H, Hd), np.float32)
        kernels.C_OPS.attend(np.ascontiguousarray(q.reshape(H, Hd)), k[0], v[0], 1.0 / math.sqrt(Hd), out)
        return out.reshape(B, H, T, Hd)  # [H,Hd] -> [1,H,1,Hd]
    qg = xp.reshape(q * (1.0 / math.sqrt(Hd)), (B, K, G, T, Hd))  # [B,H,T,Hd] -> [B,K,G,T,Hd], scaled here: Hd < S
    kt = xp.permute_dims(k, (0, 1, 3, 2))[:, :, None]  # [B,K,S,Hd] -> [B,K,1,Hd,S]
    scores = qg @ kt  # [B,K,G,T,Hd] @ [B,K,1,Hd,S] -> [B,K,G,T,S]: (q/sqrt(Hd)) . k, a fresh array
    if mask is not None:
        scores += mask  # -inf on future positions
    if record is not None and record_scores:
        record("scores", xp.reshape(xp.asarray(scores, copy=True), (B, H, T, S)))  # [B,K,G,T,S] -> [B,H,T,S]
    p = softmax(scores, axis=-1, inplace=True)  # [B,K,G,T,S], in the scores' memory
    if record is not None:
        record("probs", xp.reshape(p, (B, H, T, S)))
    out = p @ v[:, :, None]  # [B,K,G,T,S] @ [B,K,1,S,Hd] -> [B,K,G,T,Hd]
    return xp.reshape(out, (B, H, T, Hd))


# exp(s) without subtracting the row max first gives the same softmax up to float rounding as long as
# nothing overflows and each row keeps weight: row sums inside these bounds guarantee that (and keep e @ v
# far from float32's 3e38; an entry far below its row's largest may still underflow, as with the max, to
# ~1e-19 of the row's weight), otherwise the block is redone with the max subtracted. The max pass and its
# subtraction cost a third of a block's softmax.
_SUM_LOW, _SUM_HIGH = 1e-30, 1e30


def _subtract_row_max(s):
    """s - max(s) along the last axis, in place on a fresh array: exp of it cannot overflow."""
    s -= array_namespace(s).max(s, axis=-1, keepdims=True)
    return s


def causal_attention(q, k, v, block: int = 64):
    """Causal attention of a whole sequence (no cache: T == S), one block of query rows at a time.

    Block [a, b) reads keys [0, b) only, so the future (the upper triangle, all -inf) is never computed:
    for T = n blocks that is (n+1)/2n of the full [T, T] work (3/4 at T=128, 5/8 at T=256), and only the
    block's diagonal square needs the mask. The same numbers as attention() with the causal mask (up to
    float rounding), with the softmax taken apart as in FlashAttention: e = exp(scores - c) and its row
    sums l, so that probs = e / l; the division goes on the block's output [.., Hd] instead of on e [.., b].

    q: [B, H, T, Hd]; k, v: [B, K, T, Hd]  ->  (out [B, H, T, Hd], saved: one (e [B, K, G, b-a, b],
    1/l [B, K, G, b-a, 1]) per block, what causal_attention_backward needs). out is a view of [B, T, H, Hd]
    memory, so that the caller's [B, T, H*Hd] for the output projection needs no copy.
    """
    xp = array_namespace(q)
    B, H, T, Hd = q.shape
    K = k.shape[1]
    G = H // K
    qg = xp.reshape(q, (B, K, G, T, Hd))  # [B,H,T,Hd] -> [B,K,G,T,Hd]
    # k^T / sqrt(Hd), row-major: the scores' scale rides on the copy that lays k^T out for BLAS
    kt = _c_contiguous(xp.permute_dims(k, (0, 1, 3, 2)), 1.0 / math.sqrt(Hd))[:, :, None]  # [B,K,1,Hd,T]
    vg = v[:, :, None]  # [B,K,1,T,Hd]
    tri = move(_diagonal_mask(block), q)  # [block, block]: the diagonal square's mask, on q's device and dtype

    def scores(a, b):
        s = qg[:, :, :, a:b] @ kt[..., :b]  # [B,K,G,b-a,Hd] @ [B,K,1,Hd,b] -> [B,K,G,b-a,b], fresh
        s[..., a:b] += tri[:b - a, :b - a]  # the future inside the diagonal square
        return s

    out = xp.empty((B, T, H, Hd), dtype=q.dtype, device=device(q))  # filled block by block
    og = xp.permute_dims(xp.reshape(out, (B, T, K, G, Hd)), (0, 2, 3, 1, 4))  # a view: [B,K,G,T,Hd]
    saved = []
    for a in range(0, T, block):
        b = min(a + block, T)
        e = _exp_(scores(a, b))  # c = 0
        l = _row_sums(e)[..., None]  # [B,K,G,b-a,1]
        if not bool(xp.all((l > _SUM_LOW) & (l < _SUM_HIGH))):  # some row overflowed or vanished: c = row max
            e = _exp_(_subtract_row_max(scores(a, b)))
            l = _row_sums(e)[..., None]
        inv_l = 1.0 / l
        o = e @ vg[:, :, :, :b]  # [B,K,G,b-a,b] @ [B,K,1,b,Hd] -> [B,K,G,b-a,Hd]
        o *= inv_l  # softmax's division, on the narrow side
        og[:, :, :, a:b] = o
        saved.append((e, inv_l))
    return xp.permute_dims(out, (0, 2, 1, 3)), saved  # [B,T,H,Hd] -> [B,H,T,Hd]


def causal_attention_backward(dout, q, k, v, out, saved, block: int = 64, grads=None):
    """Gradients of causal_attention from dout [B, H, T, Hd], its inputs q [B, H, T, Hd], k, v [B, K, T, Hd],
    its output `out` [B, H, T, Hd] and what it saved per block: (dq, dk, dv), block by block as
    attention_backward does it whole. A block's keys [0, b) get gradient from its rows only; dk and dv
    add up over the blocks. grads: three arrays shaped like q, k and v to write the gradients into (views
    of the caller's fused buffer, say) instead of new ones.

    With p = e / l: the softmax backward p * (dp - sum(dp * p)) needs the row sum sum_j dp_j p_j, which
    equals dout . out (dp_j = dout . v_j and out = sum_j p_j v_j): a dot over Hd instead of over b. The
    1/l goes on dout's rows first, so e is used as it was saved.
    """
    xp = array_namespace(q)
    B, H, T, Hd = q.shape
    K = k.shape[1]
    G = H // K
    scale = 1.0 / math.sqrt(Hd)
    do = xp.reshape(dout, (B, K, G, T, Hd))  # [B,H,T,Hd] -> [B,K,G,T,Hd]
    og = xp.reshape(out, (B, K, G, T, Hd))
    qg = xp.reshape(q, (B, K, G, T, Hd))
    if grads is None:
        grads = tuple(xp.empty(a.shape, dtype=a.dtype, device=device(a)) for a in (q, k, v))
    dq, dk_out, dv_out = grads  # [B,H,T,Hd], [B,K,T,Hd], [B,K,T,Hd]
    dqg = xp.reshape(dq, (B, K, G, T, Hd))  # a view: H splits into K groups of G
    vt = _c_contiguous(xp.permute_dims(v, (0, 1, 3, 2)))  # [B,K,T,Hd] -> [B,K,Hd,T], row-major
    dk = dv = None  # dk and dv add up over the blocks, in arrays of their own (`grads` may be strided views)
    starts = list(range(0, T, block))
    for j in reversed(range(len(starts))):  # the last block first: it reaches every key and sets dk and dv
        a = starts[j]
        b = min(a + block, T)
        n = G * (b - a)  # the block's rows of every query head sharing a kv head, stacked
        e, inv_l = saved[j]
        e = xp.reshape(e, (B, K, n, b))  # [B,K,G,b-a,b] -> [B,K,G*(b-a),b]
        do_j = xp.reshape(do[:, :, :, a:b] * inv_l, (B, K, n, Hd))  # dout / l: [B,K,G,b-a,Hd] -> [B,K,G*(b-a),Hd]
        o_j = xp.reshape(og[:, :, :, a:b], (B, K, n, Hd))
        q_j = xp.reshape(qg[:, :, :, a:b], (B, K, n, Hd))
        dv_j = xp.permute_dims(e, (0, 1, 3, 2)) @ do_j  # [B,K,b,n] @ [B,K,n,Hd] -> [B,K,b,Hd]
        ds = do_j @ vt[..., :b]  # [B,K,n,Hd] @ [B,K,Hd,b] -> [B,K,n,b]: dp / l
        ds -= xp.vecdot(do_j, o_j)[..., None]  # - sum(dp * p) / l, as dout . out / l: [B,K,n,1]
        ds *= e  # = p * (dp - sum(dp * p))
        dq_j = ds @ k[:, :, :b]  # [B,K,n,b] @ [B,K,b,Hd] -> [B,K,n,Hd]
        dq_j *= scale
        dqg[:, :, :, a:b] = xp.reshape(dq_j, (B, K, G, b - a, Hd))  # [B,K,G*(b-a),Hd] -> [B,K,G,b-a,Hd]
        dk_j = xp.permute_dims(ds, (0, 1, 3, 2)) @ q_j  # [B,K,b,n] @ [B,K,n,Hd] -> [B,K,b,Hd], unscaled
        if dk is None:  # b == T
            dk, dv = dk_j, dv_j
        else:
            dk[:, :, :b] += dk_j
            dv[:, :, :b] += dv_j
    dk *= scale  # the scores' scale, once for all blocks
    dk_out[...], dv_out[...] = dk, dv
    return dq, dk_out, dv_out


def attention_backward(dout, q, k, v, probs):
    """Gradients of causal grouped-query attention from dout [B, H, T, Hd], the forward's inputs
    q [B, H, T, Hd], k, v [B, K, S, Hd] and its probabilities probs [B, H, T, S]: (dq, dk, dv).

    The G query heads sharing a kv head are stacked along the rows ([B,K,G*T,...]) so that each
    product is one batched matmul and the kv gradients sum over the group inside the matmul.
    Masked positions have probability 0, so the softmax backward gives them no gradient.
    """
    xp = array_namespace(q)
    B, H, T, Hd = q.shape
    K, S = k.shape[1], k.shape[2]
    G = H // K
    scale = 1.0 / math.sqrt(Hd)
    p = xp.reshape(probs, (B, K, G * T, S))  # [B,H,T,S] -> [B,K,G*T,S]
    do = xp.reshape(dout, (B, K, G * T, Hd))  # [B,H,T,Hd] -> [B,K,G*T,Hd]
    qg = xp.reshape(q, (B, K, G * T, Hd))  # [B,H,T,Hd] -> [B,K,G*T,Hd]
    dv = xp.permute_dims(p, (0, 1, 3, 2)) @ do  # [B,K,S,G*T] @ [B,K,G*T,Hd] -> [B,K,S,Hd]
    dp = do @ xp.permute_dims(v, (0, 1, 3, 2))  # [B,K,G*T,Hd] @ [B,K,Hd,S] -> [B,K,G*T,S]
    # softmax backward, in place on the fresh dp: p * (dp - sum(dp * p))
    ds = dp
    ds -= xp.vecdot(dp, p)[..., None]  # [B,K,G*T,S] - [B,K,G*T,1]: sum over S of dp*p, one dot per row
    ds *= p
    # the scores were (q @ k^T) * scale: the scale goes on dq and dk, [.., Hd] wide where ds is [.., S]
    dq = ds @ k  # [B,K,G*T,S] @ [B,K,S,Hd] -> [B,K,G*T,Hd]
    dq *= scale
    dk = xp.permute_dims(ds, (0, 1, 3, 2)) @ qg  # [B,K,S,G*T] @ [B,K,G*T,Hd] -> [B,K,S,Hd]
    dk *= scale
    return xp.reshape(dq, (B, H, T, Hd)), dk, dv


# --- embedding and linear layers ---------------------------------------------------------------

def embedding(table, ids):
    """Rows of `table` [V, D] for token ids [...] -> [..., D] (only those rows are dequantized when the
    table is a QuantizedMatrix)."""
    if isinstance(table, QuantizedMatrix):
        return table.take_rows(ids).reshape(*ids.shape, table.shape[1])  # [N,D] -> [...,D]
    xp = array_namespace(table)
    return xp.reshape(xp.take(table, xp.reshape(ids, (-1,)), axis=0), (*ids.shape, table.shape[-1]))  # [N,D] -> [...,D]


def _index_add_rows(out, ids, src):
    """out[ids[n]] += src[n] for every n, repeated ids adding up: [V, D] += scatter of [N, D].

    The Array API has no scatter-add, so this is the one namespace-specific helper. NumPy sorts the
    rows by id and sums each run of equal ids in one reduceat (3x faster than np.add.at on a training
    chunk); torch's index_add_ does it directly; any other namespace gets a one-hot matmul, in chunks
    of rows so the [chunk, V] one-hot stays small.
    """
    if is_numpy_array(out):
        if not ids.size:
            return out
        order = np.argsort(ids, kind="stable")  # [N]: rows with equal ids side by side
        sorted_ids = ids[order]
        starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))  # first row of each id
        out[sorted_ids[starts]] += np.add.reduceat(src[order], starts, axis=0)  # [n_ids,D], each id once
        return out
    if is_torch_array(out):
        return out.index_add_(0, ids, src)
    xp = array_namespace(out)
    V = out.shape[0]
    rows = xp.arange(V, device=device(out))
    for a in range(0, ids.shape[0], 1024):
        oh = xp.astype(ids[a:a + 1024, None] == rows, src.dtype)  # [n,1] == [V] -> [n,V]
        out = out + xp.permute_dims(oh, (1, 0)) @ src[a:a + 1024]  # [V,n] @ [n,D] -> [V,D]
    return out


def embedding_backward(dy, ids, vocab_size: int, out=None):
    """Gradient of embedding with respect to the table: the rows of dy [..., D] added up per token
    id -> [V, D]. With `out` (a [V, D] gradient already holding another use of the same table, as
    with a tied output head) the rows are added into it in place."""
    xp = array_namespace(dy)
    D = dy.shape[-1]
    if out is None:
        out = xp.zeros((vocab_size, D), dtype=dy.dtype, device=device(dy))
    return _index_add_rows(out, xp.reshape(ids, (-1,)), xp.reshape(dy, (-1, D)))  # [N], [N,D] -> [V,D]


def linear(x, w, b=None):
    """x @ W.T (+ b) with W in [out, in] layout: [..., in] -> [..., out].

    W is an array, or a QuantizedMatrix (weights kept as ggml blocks): then the product is computed
    from the blocks by kernels.py. The leading axes are folded into one first: NumPy runs a 3-D @ 2-D
    product as one matmul per batch row, and a [1,1,D] decode step then costs twice a plain 2-D one (measured)."""
    if type(w) is QuantizedMatrix:
        y = kernels.linear(x, w)  # [..., in] -> [..., out], from the blocks
        return y if b is None else y + b
    xp = array_namespace(x)
    n_out, n_in = w.shape
    y = xp.reshape(x, (-1, n_in)) @ w.T  # [N,in] @ [in,out] -> [N,out], N = all leading axes
    y = xp.reshape(y, (*x.shape[:-1], n_out))  # [N,out] -> [...,out]
    return y if b is None else y + b


def linear_backward(dy, x, w, bias: bool = False, weight_grad: bool = True):
    """Gradients of linear from dy [..., out] and the forward's input x [..., in]: (dx, dw, db), db None
    without a bias. dw is one [out, N] @ [N, in] matmul over all B*T rows at once; with
    weight_grad=False (a frozen weight, as under LoRA) dw is None and that matmul is skipped."""
    if isinstance(w, tuple):  # matrices side by side (q, k and v packed in different types): dx adds up
        if weight_grad:
            raise ValueError("a weight kept as quantized blocks is frozen (LoRA trains on it); "
                             "load the model with dtype='f32' to train every weight")
        dx, lo = None, 0
        for part in w:
            hi = lo + part.shape[0]
            d_part = linear_backward(dy[..., lo:hi], x, part, weight_grad=False)[0]  # [..., in]
            dx = d_part if dx is None else dx + d_part
            lo = hi
        db = _column_sums(np.reshape(dy, (-1, lo))) if bias else None
        return dx, None, db
    if isinstance(w, QuantizedMatrix):  # a packed base (LoRA): only dx, through the blocks
        if weight_grad:
            raise ValueError("a weight kept as quantized blocks is frozen (LoRA trains on it); "
                             "load the model with dtype='f32' to train every weight")
        db = _column_sums(np.reshape(dy, (-1, w.shape[0]))) if bias else None  # [N,out] -> [out]
        return kernels.linear_t(dy, w), None, db  # [..., out] @ [out, in] -> [..., in]
    xp = array_namespace(x)
    n_out, n_in = w.shape
    dy2 = xp.reshape(dy, (-1, n_out))  # [...,out] -> [N,out]
    x2 = xp.reshape(x, (-1, n_in))  # [...,in] -> [N,in]
    dx = xp.reshape(dy2 @ w, (*dy.shape[:-1], n_in))  # [N,out] @ [out,in] -> [N,in] -> [..., in]: one big matmul
    dw = xp.permute_dims(dy2, (1, 0)) @ x2 if weight_grad else None  # [out,N] @ [N,in] -> [out,in]
    db = _column_sums(dy2) if bias else None  # [N,out] -> [out]
    return dx, dw, db


# --- the encoder-decoder Transformer's extra pieces (seq2seq.py) ---------------------------------

def sinusoidal_encoding(T: int, D: int, dtype=np.float32) -> np.ndarray:
    """The fixed positional encoding of "Attention Is All You Need": [T, D], with
    pe[t, 2i] = sin(t / 10000^(2i/D)) and pe[t, 2i+1] = cos(t / 10000^(2i/D)).
    It has no parameters, so its backward is nothing: the gradient stops at the sum embedding + pe.
    Computed in float64 and rounded once, so float32 and float64 models see the same table."""
    if D % 2:
        raise ValueError(f"the sinusoidal encoding needs an even model dimension, got {D}")
    inv_freq = np.exp(np.arange(0, D, 2, dtype=np.float64) * (-math.log(10000.0) / D))  # [D/2]: 10000^(-2i/D)
    angle = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T,1] * [1,D/2] -> [T,D/2]
    pe = np.empty((T, D), np.float64)
    pe[:, 0::2] = np.sin(angle)
    pe[:, 1::2] = np.cos(angle)
    return pe.astype(dtype)


def padding_mask(pad, dtype=np.float32):
    """An additive attention mask from key padding flags pad [B, S] (True where the key is padding):
    [B, 1, 1, 1, S], -inf on padded keys, to add to attention()'s scores [B, K, G, T, S]. A query row
    must keep one real key (every sequence here starts with a real token), or its softmax is 0/0."""
    xp = array_namespace(pad)
    m = xp.where(pad, -math.inf, 0.0)  # [B,S]
    return xp.astype(m, dtype)[:, None, None, None, :]  # [B,S] -> [B,1,1,1,S]


def relu(x):
    """max(x, 0): the original Transformer's (and torch.nn.Transformer's default) FFN activation."""
    return array_namespace(x).maximum(x, 0)


def relu_backward(dy, y):
    """Gradient of relu from dy and the forward's output y: dy where y > 0, else 0."""
    xp = array_namespace(y)
    return xp.where(y > 0, dy, xp.zeros_like(dy))
