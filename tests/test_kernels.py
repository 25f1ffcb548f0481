"""The compiled kernels (kernels.py: the C build _kernels.c where it is built, and the numba build
kernels_numba.py) against their reference: quant.py's NumPy dequantization, then a float64 matmul.

Tolerance: the kernels sum in float32, in a different order than the reference (block by block, SIMD
lanes, the block offsets applied through sums of x). The error of a float32 sum of n terms is bounded
by ~n * eps * sum|w_i x_i|, and is ~sqrt(n) * eps * that in practice, so each output is compared to
the float64 product relative to sum|w_i x_i| of its own row (1e-5: n is 256-8192, eps = 6e-8).
"""

import numpy as np
import pytest

from scratchlm import kernels, ops, quant
from scratchlm.quant import GGML_TYPE_IDS, QuantizedMatrix
from tests.test_quant import random_blocks

BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
BUILDS = ["numba"] + (["c"] if kernels.C_TYPES else [])


def random_matrix(name: str, rows: int, cols: int, seed: int = 0) -> QuantizedMatrix:
    t = quant.GGML_TYPES[GGML_TYPE_IDS[name]]
    raw = random_blocks(name, rows * cols // t.block_size, np.random.default_rng(seed))  # [blocks, bytes]
    return QuantizedMatrix(raw.reshape(rows, -1), GGML_TYPE_IDS[name], (rows, cols))


def f16_matrix(name: str, rows: int, cols: int) -> QuantizedMatrix:
    f = np.random.default_rng(2).standard_normal((rows, cols)).astype(np.float32)
    raw = (f.astype(np.float16).view(np.uint8) if name == "F16"
           else (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8))
    return QuantizedMatrix(raw, GGML_TYPE_IDS[name], (rows, cols))


def check_product(y, x, w_f32, what):
    ref = x.astype(np.float64) @ w_f32.T.astype(np.float64)  # [N, rows]
    scale = np.abs(x).astype(np.float64) @ np.abs(w_f32).T.astype(np.float64)  # sum |w x| per output
    err = np.abs(y - ref) / np.maximum(scale, 1e-30)
    assert y.dtype == np.float32 and y.shape == ref.shape, what
    assert err.max() < 1e-5, f"{what}: worst relative error {err.max():.2e}"


def test_c_kernels_are_built_here():
    """The C kernels build wherever gcc and an x86-64 CPU with AVX2 are (this project's machines); the
    numba fallback is what runs elsewhere. A machine with both must have built them."""
    import platform
    import shutil
    if platform.machine() != "x86_64" or not shutil.which("gcc"):
        pytest.skip("no x86-64 gcc here: the numba kernels are the ones in use")
    flags = open("/proc/cpuinfo").read()
    if " avx2" not in flags:
        pytest.skip("this CPU has no AVX2")
    assert kernels.C_TYPES >= {GGML_TYPE_IDS[n] for n in BLOCK_TYPES + ["F16", "BF16"]}


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("name", BLOCK_TYPES)
@pytest.mark.parametrize("rows,n_x", [(1, 1), (37, 1), (64, 3), (200, 8)])
def test_matvec_matches_dequantized(name, rows, n_x, build):
    bs = quant.GGML_TYPES[GGML_TYPE_IDS[name]].block_size
    cols = bs * (3 if bs == 256 else 7)  # an odd number of blocks per row
    w = random_matrix(name, rows, cols, seed=rows)
    x = np.random.default_rng(1).standard_normal((n_x, cols)).astype(np.float32)
    y = kernels.matvec(x, w, kind=build)
    what = f"{name} [{rows},{cols}] x {n_x} ({build})"
    if build == "numba":
        check_product(y, x, w.dequantize(), what)
        return
    # The C kernels write x as two 8-bit terms per 4 values (x_hat) for their integer dot products and
    # apply the block offsets (mins, -8, -32) through exact float sums of x; so each output differs from the
    # float product by at most sum_j |w_j - offset_j| |x_j - x_hat_j|, with |w_j - offset_j| <= |w_j| + max|w|
    # of the row (the offset is minus the weight of quant value 0), plus float rounding.
    x_hat = kernels.round_activations(x)
    amax = np.abs(x.reshape(n_x, -1, 4)).max(axis=2, keepdims=True)  # per group of 4
    # half a step of d/254 = amax/64516, up to a full step where float rounding makes q2 clip at 127
    assert (np.abs(x_hat - x).reshape(n_x, -1, 4) <= amax / 32258).all(), what
    wf = w.dequantize().astype(np.float64)
    ref = x.astype(np.float64) @ wf.T
    bound = (np.abs(x - x_hat).astype(np.float64) @ (np.abs(wf) + np.abs(wf).max(axis=1, keepdims=True)).T
             + 1e-5 * (np.abs(x).astype(np.float64) @ np.abs(wf).T))
    assert y.shape == ref.shape and (np.abs(y - ref) <= bound).all(), f"{what}: worst {np.abs(y - ref).max():.3g}"


@pytest.mark.skipif(not kernels.C_TYPES, reason="the C kernels are not built here")
@pytest.mark.parametrize("name", BLOCK_TYPES + ["F16", "BF16"])
def test_c_dequantize_matches_reference(name):
    """The C decode of every chunk gives quant.py's values: bit for bit where the formula has one rounding,
    within 1 ulp where the C fuses a multiply-add that NumPy rounds twice (Q4_1, Q5_1, the k-quants' mins)."""
    bs = quant.GGML_TYPES[GGML_TYPE_IDS[name]].block_size
    w = f16_matrix(name, 23, 512) if name in ("F16", "BF16") else random_matrix(name, 23, bs * 3, seed=9)
    ref = w.dequantize()
    got = kernels.dequantize_rows(w, 2, 21)
    assert got.shape == (19, w.shape[1])
    np.testing.assert_allclose(got, ref[2:21], rtol=2.5e-7, atol=np.abs(ref).max() * 2.5e-7)


@pytest.mark.parametrize("name", BLOCK_TYPES + ["F16", "BF16"])
def test_linear_both_regimes_and_transpose(name):
    """ops.linear on a packed matrix equals the product with its dequantized float32 matrix, in both regimes
    (few rows: kernels; many rows: dequantized tiles and BLAS), and linear_t gives dy @ W."""
    bs = quant.GGML_TYPES[GGML_TYPE_IDS[name]].block_size
    rows, cols = 150, (512 if bs == 256 else 96)
    if name in ("F16", "BF16"):
        w = f16_matrix(name, rows, cols)
    else:
        w = random_matrix(name, rows, cols, seed=3)
    wf = w.dequantize()
    old = kernels._TILE_WEIGHTS
    kernels._TILE_WEIGHTS = 40 * cols  # several tiles, the last one partial
    try:
        for n_x in (1, 5, 33):
            x = np.random.default_rng(n_x).standard_normal((2, n_x, cols)).astype(np.float32)  # [B,T,cols]
            y = ops.linear(x, w)
            assert y.shape == (2, n_x, rows)
            if kernels.backend(w.ggml_type) == "c" and name in BLOCK_TYPES and 2 * n_x <= kernels.MATVEC_MAX_ROWS:
                # the integer matrix-vector path (bounded in test_matvec_matches_dequantized): within 1e-4
                err = np.abs(y.reshape(-1, rows) - x.reshape(-1, cols).astype(np.float64) @ wf.T.astype(np.float64))
                assert err.max() <= 1e-4 * (np.abs(x).reshape(-1, cols) @ np.abs(wf).T).max(), name
            else:
                check_product(y.reshape(-1, rows), x.reshape(-1, cols), wf, f"{name} linear, T={n_x}")
            dy = np.random.default_rng(n_x + 7).standard_normal((2, n_x, rows)).astype(np.float32)
            dx, dw, db = ops.linear_backward(dy, x, w, weight_grad=False)
            assert dw is None and db is None
            check_product(dx.reshape(-1, cols), dy.reshape(-1, rows), wf.T, f"{name} linear_t, T={n_x}")
    finally:
        kernels._TILE_WEIGHTS = old


def test_packed_weight_refuses_a_weight_gradient():
    w = random_matrix("Q8_0", 4, 32)
    with pytest.raises(ValueError, match="frozen"):
        ops.linear_backward(np.ones((1, 4), np.float32), np.ones((1, 32), np.float32), w)


def test_quantized_matrix_rows_and_concat():
    w = random_matrix("Q4_K", 10, 512, seed=5)
    wf = w.dequantize()
    assert np.array_equal(w[3:7].dequantize(), wf[3:7])
    assert np.array_equal(w.take_rows([9, 0, 9]), wf[[9, 0, 9]])
    assert np.array_equal(QuantizedMatrix.concat([w[:4], w[4:]]).dequantize(), wf)
    with pytest.raises(ValueError):
        QuantizedMatrix.concat([w, random_matrix("Q8_0", 2, 512)])


@pytest.mark.skipif(kernels.C_OPS is None, reason="the C kernels are not built here")
def test_decode_ops_match_numpy(monkeypatch):
    """The C RMSNorm, single-query attention and SwiGLU (decode steps) against ops.py's NumPy versions."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 200)).astype(np.float32) * 3
    w = rng.standard_normal(200).astype(np.float32)
    fast = ops.rms_norm(x, w, 1e-5)
    for H, K, S in ((8, 2, 1), (9, 3, 37), (4, 4, 600)):
        q = rng.standard_normal((1, H, 1, 64)).astype(np.float32)
        cache = rng.standard_normal((2, 1, K, S + 5, 64)).astype(np.float32)  # k, v of a longer cache: views
        k, v = cache[0][:, :, :S], cache[1][:, :, :S]
        got = ops.attention(q, k, v)
        monkeypatch.setattr(kernels, "C_OPS", None)
        want = ops.attention(q, k, v)
        monkeypatch.undo()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    gu = rng.standard_normal((1, 1, 2 * 300)).astype(np.float32) * 6
    gu[0, 0, :3] = [-120.0, 95.0, 0.0]  # exp's clamped range
    fast_act = ops.swiglu_halves(gu)
    monkeypatch.setattr(kernels, "C_OPS", None)
    np.testing.assert_allclose(fast, ops.rms_norm(x, w, 1e-5), rtol=1e-6, atol=1e-6)
    with np.errstate(over="ignore"):  # NumPy's exp(120) overflows to inf: sigmoid 0, as it should
        np.testing.assert_allclose(fast_act, ops.swiglu_halves(gu), rtol=1e-5, atol=1e-6)
