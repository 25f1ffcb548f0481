"""Our quantizers and `scratchlm quantize`, checked against gguf-py (bit for bit), ggml's own quantizer
(digests of its output, measured by hand with llama.cpp's libggml), transformers (logits of the files we
write) and, where installed, llama.cpp itself.

The error measure quoted for k-quants is the relative RMSE of a round trip: RMS(dequantize(quantize(w)) - w)
divided by RMS(w), per tensor. llama.cpp is the reference: our k-quant bytes are the same as
ggml_quantize_chunk's (quantize_row_q*_K_ref) on the inputs below, so our error equals llama.cpp's, and the
digests pin that here where llama.cpp is not installed.
"""

from __future__ import annotations

import hashlib
import sysconfig
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import scratchlm
from scratchlm.cli import build_parser
from scratchlm.cli import main as cli_main
from scratchlm.config import ModelConfig, expected_shapes
from scratchlm.errors import FormatError, UnsupportedError
from scratchlm.formats.export import export_gguf, gguf_plan, quantize_model, write_gguf
from scratchlm.formats.gguf import read_gguf
from scratchlm.model import Model
from scratchlm.quant import GGML_TYPE_IDS, GGML_TYPES, dequantize
from scratchlm.quantize import (FILE_TYPES, QUANT_TYPES, _fp16, _use_more_bits, quantize, rel_rmse, tensor_types)
from scratchlm.tokenizer.train import train_bpe

gguf = pytest.importorskip("gguf")
from gguf.quants import quantize as gguf_quantize  # noqa: E402

Q = GGML_TYPE_IDS  # name -> ggml type id
CORPUS = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")


def hard_rows(rng, cols: int = 1024) -> np.ndarray:
    """Rows that stress every branch: zeros, constants, fp16 overflow and underflow of the scales, spikes,
    ties of +-max, heavy tails, one-signed rows, sparse and constant sub-blocks, exact small integers."""
    def g(s=1.0):
        return (s * rng.standard_normal(cols)).astype(np.float32)

    rows = [g(), g(0.02), np.zeros(cols, np.float32), np.full(cols, 0.7, np.float32), np.full(cols, -0.7, np.float32),
            g(1e5), g(3e4), g(1e-30), g(1e-35), g(1e-6)]
    spike = np.zeros(cols, np.float32)
    spike[::32] = 5.0
    rows.append(spike)
    ties = g()
    ties[0::32], ties[1::32] = 3.0, -3.0
    rows.append(ties)
    rows.append(rng.standard_t(2, cols).astype(np.float32))
    rows.append(np.abs(g()) + 1)
    rows.append(-np.abs(g()) - 1)
    sparse = g()
    sparse[(np.arange(cols) // 32) % 2 == 0] = 0
    rows.append(sparse)
    half = g()
    half[(np.arange(cols) // 16) % 2 == 0] = 0.25
    rows.append(half)
    rows.append(rng.integers(-3, 4, cols).astype(np.float32))
    rows.append(rng.laplace(0, 0.1, cols).astype(np.float32))
    mixed = g()
    mixed[:256] *= 1e4
    mixed[256:512] *= 1e-4
    rows.append(mixed)
    return np.stack(rows)  # [20, cols]


def gaussian() -> np.ndarray:
    return (0.02 * np.random.default_rng(0).standard_normal((32, 1024))).astype(np.float32)  # [32, 1024]


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


# --- 32-weight blocks and plain floats: bit for bit with gguf-py ------------------------------------

@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "BF16", "F32"])
def test_equal_to_gguf_py_bit_for_bit(name):
    x = np.concatenate([hard_rows(np.random.default_rng(1), 512), gaussian()[:, :512]])
    ours = quantize(x, name)
    with np.errstate(all="ignore"):
        ref = np.ascontiguousarray(gguf_quantize(x, gguf.GGMLQuantizationType[name])).view(np.uint8)
    np.testing.assert_array_equal(ours, ref.reshape(ours.shape))


def test_bf16_of_any_bit_pattern_equals_gguf_py():
    """NaNs stay NaNs (quieted), infinities stay, everything else rounds to nearest even."""
    u = np.random.default_rng(2).integers(0, 2**32, size=1 << 16, dtype=np.uint64).astype(np.uint32)
    u[:4] = [0x7F800000, 0xFF800000, 0x7F800001, 0xFFFFFFFF]
    x = u.view(np.float32).reshape(64, -1)
    ref = np.ascontiguousarray(gguf_quantize(x, gguf.GGMLQuantizationType.BF16)).view(np.uint8)
    np.testing.assert_array_equal(quantize(x, "BF16"), ref.reshape(64, -1))


def test_fp16_rounding_in_the_kernels_equals_numpy():
    """The kernels' fp16 conversion (scales are stored as fp16): every finite fp16 value, every midpoint
    between neighbours (ties to even) and one float32 step either side of it, the overflow edge."""
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)  # all finite non-negative fp16
    mid = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)  # exact in float32
    vals = np.concatenate([h, mid, np.nextafter(mid, 0), np.nextafter(mid, 1),
                           np.float32([65504, 65519.99, 65520, 1e10, 2.0**-25, 2.0**-26, 1e-30])])
    vals = np.concatenate([vals, -vals[::97]])
    with np.errstate(over="ignore"):
        want = vals.astype(np.float16)
    for v, w in zip(vals, want):
        r, bits = _fp16(v)
        assert bits == w.view(np.uint16) and (r == np.float32(w) or np.isinf(w)), v


# --- k-quants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K"])
def test_kernels_equal_their_numpy_version(name):
    """The numba kernels and the NumPy versions beside them give the same bytes (42 super-blocks: not a
    multiple of the kernels' chunk of 8)."""
    x = np.concatenate([hard_rows(np.random.default_rng(3), 512), gaussian()[:1, :512]])  # [21, 512]
    np.testing.assert_array_equal(quantize(x, name), quantize(x, name, reference=True))


# sha256 of ggml_quantize_chunk's output (libggml-base 0.25.3 from llama-cpp-python 0.3.36, measured by hand)
# on gaussian() and hard_rows(default_rng(0), 1024); and the inputs' own digests, so a changed random
# stream is reported as such rather than as a quantizer bug.
GAUSSIAN_SHA = "17293d4313d4b4cd36505760e6bc16574a145a0371a6e889d13300b2b514655d"
HARD_SHA = "562ee4a052a34db99ff45bc7381fcfe05c434fa71bd4728992ba6c8bfd918692"
GGML_GAUSSIAN = {
    "Q8_0": "1500fa08d6f78409fb46fe4d0a24e002b269cd5669ed8f87e6e25bdb3efdea03",
    "Q4_0": "c2f3537b6d5ce6b3bfb6fbaf9cba4699599b40f2b3d6061e9f07773932d95e57",
    "Q4_1": "11bb81cb266f5f402dd7de944220ad1024a52b4ff7d47345eb017d730e65bdf6",
    "Q5_0": "db3af73961345b70badbe68cd2830b81c70e7cf01a25918b207296e0b00e5eae",
    "Q5_1": "57efd16923a7bd91fd140c1c5e97bc5f8dccc4c4f89b0270c84da1976eccfa6f",
    "Q4_K": "682bfb55dabbf59c9f1cb3d690a7133fdaca858952881d12ad03e67ffe04dc77",
    "Q5_K": "55f95130f26ba6db190acc52064d35404a4851f0b28de597ec581b4222b78883",
    "Q6_K": "5e887a0523656b31661e01f8291b2fea80a3ae0049400d5cc04423b7a77af74c",
}
GGML_HARD = {
    "Q4_K": "23a17d757126b481b037fe5c999a658f4d9968f888fe7226ee622f7103aa4dc8",
    "Q5_K": "67c2afb4ff6805cd615ab0ff4faf0ea7b2ed8128b7bb3b15327e4001f203e4ed",
    "Q6_K": "b8d9838f3b67c6245d18ae7bdb2f94d7f77777306d36bb66bdb0adc135fdbba7",
}
# llama.cpp's round-trip error on gaussian() (relative RMSE), measured with the same libggml
GGML_REL_RMSE = {"Q8_0": 0.005375, "Q4_0": 0.086485, "Q4_1": 0.078235, "Q5_0": 0.042844, "Q5_1": 0.038130,
                 "Q4_K": 0.071389, "Q5_K": 0.036406, "Q6_K": 0.017803}


@pytest.mark.parametrize("name", list(GGML_GAUSSIAN))
def test_same_bytes_and_error_as_llama_cpp(name):
    x = gaussian()
    if sha(x) != GAUSSIAN_SHA:
        pytest.skip("NumPy's random stream changed: the pinned digests no longer describe this input")
    blocks = quantize(x, name)
    assert sha(blocks) == GGML_GAUSSIAN[name]
    err = rel_rmse(x, dequantize(blocks, Q[name]).reshape(x.shape))
    assert err <= GGML_REL_RMSE[name] + 5e-7  # equal, to the printed digits
    if name in GGML_HARD:
        h = hard_rows(np.random.default_rng(0))
        assert sha(h) == HARD_SHA
        assert sha(quantize(h, name)) == GGML_HARD[name]


@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "F16", "BF16", "F32"])
def test_quant_py_reads_back_what_we_write(name):
    """Round trips through quant.py's dequantizers: zeros come back as zeros, and every super-block of 256
    weights (of the rows whose scales fit in fp16) within 2.5x the Gaussian error of the type, heavy tails
    included; the Gaussian error where llama.cpp's is."""
    x = hard_rows(np.random.default_rng(4), 512)
    back = dequantize(quantize(x, name), Q[name]).reshape(x.shape)
    assert np.all(back[2] == 0)  # the all-zero row
    rows = [0, 1, 3, 4, 10, 11, 12, 13, 14, 15, 16, 17, 18]
    err = (back[rows] - x[rows]).reshape(len(rows), -1, 256)  # [rows, super-blocks, 256]
    ref = x[rows].reshape(err.shape)
    per_block = np.sqrt((err**2).mean(-1) / (ref**2).mean(-1))
    assert per_block.max() <= {"F32": 0, "F16": 1e-3, "BF16": 5e-3}.get(name, 2.5 * GGML_REL_RMSE.get(name, 0))
    if name == "F32":
        np.testing.assert_array_equal(back, x)
    g = gaussian()
    err = rel_rmse(g, dequantize(quantize(g, name), Q[name]).reshape(g.shape))
    bound = {"F32": 0, "F16": 3e-4, "BF16": 2e-3}.get(name, GGML_REL_RMSE.get(name))
    assert err <= bound + 5e-7


def test_bad_input_is_refused():
    with pytest.raises(UnsupportedError, match="whole number of Q4_K blocks"):
        quantize(np.zeros((2, 320), np.float32), "Q4_K")
    with pytest.raises(FormatError, match="NaN or infinite"):
        quantize(np.full((1, 32), np.inf, np.float32), "Q8_0")
    with pytest.raises(UnsupportedError, match="not implemented"):
        quantize(np.zeros((1, 256), np.float32), "Q2_K")
    with pytest.raises(UnsupportedError, match="unknown ggml type"):
        quantize(np.zeros((1, 256), np.float32), "Q7_X")


# --- llama.cpp's tensor-type mix -----------------------------------------------------------------

def llama_shapes(**kw) -> dict[str, tuple[int, ...]]:
    return {n: s for n, s, _ in gguf_plan(ModelConfig(arch="llama", **kw), {})}


LLAMA3_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim=14336, max_seq_len=8192)
SMOLLM2 = dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, ffn_dim=1536, max_seq_len=8192,
               tie_embeddings=True)


def mix(file_type, shapes, **kw) -> dict[str, int]:
    types = tensor_types(file_type, shapes, **kw)
    return dict(Counter(GGML_TYPES[t].name for t in types.values()))


def test_the_layer_rule():
    assert [i for i in range(32) if _use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_llama3_8b_mix_is_llama_cpps():
    """llama-quantize's Q4_K_M of Llama-3-8B reports q4_K 193, q6_K 33, f32 65 tensors."""
    shapes = llama_shapes(**LLAMA3_8B)
    kw = dict(n_layers=32, n_heads=32, n_kv_heads=8)
    assert mix("Q4_K_M", shapes, **kw) == {"Q4_K": 193, "Q6_K": 33, "F32": 65}
    assert mix("Q5_K_M", shapes, **kw) == {"Q5_K": 193, "Q6_K": 33, "F32": 65}
    assert mix("Q6_K", shapes, **kw) == {"Q6_K": 226, "F32": 65}
    assert mix("Q4_0", shapes, **kw) == {"Q4_0": 225, "Q6_K": 1, "F32": 65}  # output.weight gets Q6_K
    assert mix("Q8_0", shapes, **kw) == {"Q8_0": 226, "F32": 65}
    t = tensor_types("Q4_K_M", shapes, **kw)
    assert [i for i in range(32) if t[f"blk.{i}.attn_v.weight"] == Q["Q6_K"]] == [i for i in range(32) if _use_more_bits(i, 32)]
    assert t["token_embd.weight"] == Q["Q4_K"] and t["output.weight"] == Q["Q6_K"] and t["output_norm.weight"] == Q["F32"]
    # a 70B-shaped Llama (80 layers, grouped-query): the other attn_v get Q5_K
    t70 = tensor_types("Q4_K_M", llama_shapes(**dict(LLAMA3_8B, n_layers=80)), n_layers=80, n_heads=32, n_kv_heads=8)
    assert {t70[f"blk.{i}.attn_v.weight"] for i in range(80)} == {Q["Q5_K"], Q["Q6_K"]}


def test_fallbacks_of_a_row_length_256_does_not_divide():
    """SmolLM2 (D=576): the k-types fall back to 32-blocks, the tied embedding gets Q8_0; ffn_down (rows of
    F=1536) keeps its k-types. These are the mixes llama-quantize writes for the default model."""
    shapes = llama_shapes(**SMOLLM2)
    kw = dict(n_layers=30, n_heads=9, n_kv_heads=3)
    assert mix("Q4_K_M", shapes, **kw) == {"Q5_0": 166, "F32": 61, "Q4_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert mix("Q5_K_M", shapes, **kw) == {"Q5_1": 166, "F32": 61, "Q5_K": 16, "Q8_0": 15, "Q6_K": 14}
    assert mix("Q6_K", shapes, **kw) == {"Q8_0": 181, "F32": 61, "Q6_K": 30}
    assert mix("Q4_1", shapes, **kw) == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    # rows that not even 32 divides (ffn_down of F=80): a k-type goes to F16, a legacy type is an error
    # (llama.cpp has no fallback for those), and so is D=80 for every type: output.weight needs Q8_0
    odd = llama_shapes(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_dim=80, max_seq_len=64)
    t = tensor_types("Q4_K_M", odd, n_layers=2)
    assert t["blk.0.ffn_down.weight"] == Q["F16"] and t["blk.0.ffn_up.weight"] == Q["Q4_K"]
    with pytest.raises(UnsupportedError, match="'blk.0.ffn_down.weight'.* not a whole number of Q8_0 blocks"):
        tensor_types("Q8_0", odd, n_layers=2)
    narrow = llama_shapes(dim=80, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=64, ffn_dim=256, max_seq_len=64)
    with pytest.raises(UnsupportedError, match="'output.weight'"):
        tensor_types("Q4_K_M", narrow, n_layers=1)
    with pytest.raises(UnsupportedError, match="unknown quantization type"):
        tensor_types("Q3_K_M", odd, n_layers=2)


def test_gpt2_mix():
    """GPT-2's fused attn_qkv follows the attn_v rule; its position embedding and biases stay F32."""
    cfg = ModelConfig(arch="gpt2", dim=256, n_layers=8, n_heads=4, n_kv_heads=4, vocab_size=512, ffn_dim=1024,
                      max_seq_len=256, tie_embeddings=True)
    t = tensor_types("Q4_K_M", {n: s for n, s, _ in gguf_plan(cfg, {})}, n_layers=8, arch="gpt2")
    assert [i for i in range(8) if t[f"blk.{i}.attn_qkv.weight"] == Q["Q6_K"]] == [i for i in range(8) if _use_more_bits(i, 8)]
    assert t["position_embd.weight"] == t["blk.0.attn_qkv.bias"] == Q["F32"] and t["token_embd.weight"] == Q["Q6_K"]


# --- writing files: the CLI, our loader, transformers, llama.cpp ------------------------------------

@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 300)


def random_model(tok, *, dim=256, ffn=512, n_layers=2, n_heads=4, n_kv_heads=2, vocab=300, seed=0) -> Model:
    cfg = ModelConfig(arch="llama", dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                      vocab_size=vocab, ffn_dim=ffn, max_seq_len=128, norm_eps=1e-5)
    rng = np.random.default_rng(seed)
    w = {n: ((1 + 0.2 * rng.standard_normal(s)) if len(s) == 1 else 0.1 * rng.standard_normal(s)).astype(np.float32)
         for n, s in expected_shapes(cfg).items()}
    return Model(cfg, w, tok)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, bpe):
    """f32 GGUFs of a model whose rows 256 divides (k-types) and of one it does not (D=160: fallbacks)."""
    d = tmp_path_factory.mktemp("src")
    export_gguf(random_model(bpe), d / "k.gguf")
    export_gguf(random_model(bpe, dim=160, ffn=512, n_heads=5, n_kv_heads=1, seed=1), d / "odd.gguf")
    return d


def test_cli_writes_what_our_loader_reads_back(sources, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    assert cli_main(["quantize", str(sources / "k.gguf"), str(out), "--type", "q4_k_m"]) == 0
    assert "Q4_K_M" in capsys.readouterr().out and not list(tmp_path.glob("*.tmp"))
    src = scratchlm.load(sources / "k.gguf")
    want = tensor_types("Q4_K_M", {n: s for n, s, _ in gguf_plan(src.config, src.weights)}, n_layers=2)
    f = read_gguf(out)
    assert {n: t.ggml_type for n, t in f.tensors.items()} == want
    assert Counter(GGML_TYPES[t].name for t in want.values()) == {"Q4_K": 13, "Q6_K": 3, "F32": 5}
    assert f.metadata["general.file_type"] == 15 and f.metadata["general.quantization_version"] == 2
    f.close()
    back = scratchlm.load(out)
    assert back.config.to_dict() | {"extra": {}} == src.config.to_dict() | {"extra": {}}
    assert back.tokenizer.encode(CORPUS[:500]) == src.tokenizer.encode(CORPUS[:500])
    blk0 = src.weights["layers.0.attention.wq.weight"]
    np.testing.assert_array_equal(back.weights["layers.0.attention.wq.weight"],
                                  dequantize(quantize(blk0, "Q4_K"), Q["Q4_K"]).reshape(blk0.shape))
    # a Hugging Face directory quantizes too
    from tests.tiny_models import make_hf_llama

    hf = make_hf_llama(tmp_path / "hf", dim=64)
    assert cli_main(["quantize", str(hf), str(tmp_path / "hf.gguf"), "--type", "Q8_0"]) == 0
    assert {t.ggml_type for t in read_gguf(tmp_path / "hf.gguf").tensors.values()} == {Q["Q8_0"], Q["F32"]}


def test_cli_errors_are_one_line(sources, tmp_path, capsys):
    for t in QUANT_TYPES:  # the CLI spells out quantize.QUANT_TYPES (so its parser need not import numba)
        assert build_parser().parse_args(["quantize", "m", "o.gguf", "--type", t.lower()]).type == t
    with pytest.raises(SystemExit) as e:  # argparse's error, one line and status 1 (cli._Parser)
        cli_main(["quantize", str(sources / "k.gguf"), str(tmp_path / "x.gguf"), "--type", "Q3_K_M"])
    assert e.value.code == 1 and len(capsys.readouterr().err.strip().splitlines()) == 1
    for argv in (["quantize", str(tmp_path / "missing"), str(tmp_path / "x.gguf"), "--type", "Q8_0"],
                 ["quantize", str(sources / "k.gguf"), str(tmp_path), "--type", "Q8_0"]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("scratchlm: error:") and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("source,file_type", [("k", "Q4_K_M"), ("k", "Q5_K_M"), ("k", "Q6_K"), ("k", "Q4_0"),
                                              ("odd", "Q4_K_M"), ("odd", "Q5_K_M")])
def test_transformers_runs_our_files_with_our_logits(sources, tmp_path, bpe, source, file_type):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, types = quantize_model(sources / f"{source}.gguf", tmp_path / "q.gguf", file_type, progress=False)
    assert len({t for t in types.values()}) >= 2
    ids = bpe.encode(CORPUS[:400])[:40]
    ours = scratchlm.load(path).logits(ids)
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="q.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hm(torch.tensor([ids])).logits[0].numpy()
    assert np.max(np.abs(ours - ref)) / np.max(np.abs(ref)) < 1e-4


def test_adapter_is_merged_before_quantizing(tmp_path):
    from scratchlm.training.lora import LoRA
    from tests.tiny_models import make_hf_llama

    base = make_hf_llama(tmp_path / "base", dim=64)
    model = scratchlm.load(base)
    lora = LoRA(model.config, rank=2, targets="q,v,down", seed=1, base_name=str(base))
    for n, a in lora.params.items():
        if n.endswith("lora_B"):
            a[...] = np.random.default_rng(5).normal(0, 0.3, a.shape)
    lora.attach(model).save(tmp_path / "ad")
    assert cli_main(["quantize", str(base), str(tmp_path / "m.gguf"), "--type", "Q8_0", "--adapter", str(tmp_path / "ad")]) == 0
    model.adapter.merge_into(model)
    back = scratchlm.load(tmp_path / "m.gguf")
    for n in ("layers.0.attention.wv.weight", "layers.1.feed_forward.w2.weight", "layers.0.attention.wk.weight"):
        w = model.weights[n]
        np.testing.assert_array_equal(back.weights[n], dequantize(quantize(w, "Q8_0"), Q["Q8_0"]).reshape(w.shape))


class OneAtATime(dict):
    """Weights handed out as fresh copies, checking that the writer let go of the last one first."""

    def __init__(self, weights):
        super().__init__(weights)
        self.last = None
        self.fetches = 0

    def __getitem__(self, name):
        assert self.last is None or self.last() is None, "the previous tensor is still alive"
        a = np.array(super().__getitem__(name))
        self.last = weakref.ref(a)
        self.fetches += 1
        return a


def test_the_writer_holds_one_tensor_at_a_time(bpe, tmp_path):
    model = random_model(bpe)
    weights = OneAtATime(model.weights)
    types = {n: (Q["Q4_K"] if len(s) == 2 else Q["F32"]) for n, s, _ in gguf_plan(model.config, weights)}
    write_gguf(tmp_path / "s.gguf", model.config, weights, bpe, types=types, file_type=FILE_TYPES["Q4_K_M"][1])
    assert weights.fetches == len(types)
    assert scratchlm.load(tmp_path / "s.gguf").config.dim == 256


@pytest.mark.slow
def test_default_model_quantizes_to_llama_cpps_bytes(default_model_path, tmp_path):
    """The default model (SmolLM2, dequantized from its Q4_1 file) through `quantize_model`: every tensor's
    bytes equal llama-quantize's on the same weights (sha256 over names and data, measured by hand)."""
    want = {"Q4_K_M": "213bb6ba4ae80b99feae98403292c8851ede313cf136a6b4c63a4bacc89de364",
            "Q6_K": "1101d2e2a1db0c70bfe24baefcc59f75a3b0224a8267f78bc6ade6ee220fefcb"}
    for file_type, digest in want.items():
        path, _ = quantize_model(default_model_path, tmp_path / f"{file_type}.gguf", file_type, progress=False)
        f = read_gguf(path)
        h = hashlib.sha256()
        for n in sorted(f.tensors):
            h.update(n.encode())
            h.update(f.raw(n).tobytes())
        f.close()
        assert h.hexdigest() == digest, file_type


def test_llama_cpp_runs_our_file(sources, tmp_path, bpe):
    """Only where llama-cpp-python is installed (not in the project venv): it loads the file and its
    logits agree with ours (llama.cpp rounds activations to 8 bits in its dot products: a loose bound)."""
    L = pytest.importorskip("llama_cpp")
    import ctypes

    path, _ = quantize_model(sources / "k.gguf", tmp_path / "q.gguf", "Q4_K_M", progress=False)
    ids = bpe.encode(CORPUS[:400])[:24]
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = False  # its AMX repacking crashes on some machines
    model = L.llama_model_load_from_file(str(path).encode(), mp)
    assert model
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_threads, cp.n_threads_batch = 128, 2, 2
    ctx = L.llama_init_from_model(model, cp)
    arr = (ctypes.c_int32 * len(ids))(*ids)
    assert L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) == 0
    theirs = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(300,)).copy()
    L.llama_free(ctx)
    L.llama_model_free(model)
    ours = scratchlm.load(path).logits(ids)[-1]
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)) < 0.05
