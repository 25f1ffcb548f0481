"""Hugging Face directories: our safetensors reader against the safetensors package, the key map against
the state dicts transformers wrote (mapped here by an independent expression), logits against
transformers, and every malformed-input case giving a one-line error."""

import json
import shutil
import struct

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file as st_load_np  # noqa: E402
from safetensors.numpy import save_file as st_save_np  # noqa: E402

from scratchlm.errors import FormatError, ModelNotFoundError, UnsupportedError  # noqa: E402
from scratchlm.formats.permute import hf_to_meta, meta_to_hf  # noqa: E402
from scratchlm.formats.safetensors_hf import SafetensorsFile, bf16_to_f32, load_hf_dir, read_safetensors  # noqa: E402
from tests.tiny_models import (as_arrays,  # noqa: E402
                               META_ROPE_SCALING, SMALL_ROPE_SCALING, hf_llama_to_meta_names, hf_logits,  # noqa: E402
                               hf_reference, hf_state_dict, make_hf_gpt2, make_hf_llama)

IDS = [5, 17, 200, 3, 99, 250, 1, 0, 42, 128, 7, 77, 33, 201, 11, 9, 64, 180, 2, 255, 6, 31]


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "gqa_untied_f32": make_hf_llama(root / "a"),
        "tied_f16_legacy": make_hf_llama(root / "b", tied=True, vocab=300, dtype="float16", legacy_config=True, seed=2),
        "scaled_bf16": make_hf_llama(root / "c", rope_scaling=SMALL_ROPE_SCALING, dtype="bfloat16", seed=3),
        "sharded_llama31": make_hf_llama(root / "d", rope_scaling=META_ROPE_SCALING, rope_theta=500000.0,
                                         max_pos=131072, shard=True, legacy_config=True, n_kv_heads=1, seed=4),
        "gpt2": make_hf_gpt2(root / "g"),
        "gpt2_untied_f16": make_hf_gpt2(root / "g2", tied=False, dtype="float16", seed=5),
    }


@pytest.fixture(scope="module")
def loaded(dirs):
    return {k: load_hf_dir(p) for k, p in dirs.items()}


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


# --- the permutation -----------------------------------------------------------------------

def test_permutation_round_trip_and_bias():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
    assert np.array_equal(meta_to_hf(hf_to_meta(w, 3, 8), 3, 8), w)
    assert np.array_equal(hf_to_meta(meta_to_hf(w, 3, 8), 3, 8), w)
    b = rng.standard_normal(3 * 8).astype(np.float32)
    assert np.array_equal(hf_to_meta(b, 3, 8), hf_to_meta(b[:, None], 3, 8)[:, 0])
    # Head 0 of Hd=8 in HF order is [a0 a1 a2 a3 b0 b1 b2 b3]; Meta's is [a0 b0 a1 b1 ...].
    assert hf_to_meta(np.arange(8.0), 1, 8).tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    with pytest.raises(FormatError):
        hf_to_meta(w, 4, 8)


def test_permutation_commutes_with_rope():
    """Rotate-half RoPE (transformers' own) on HF rows == interleaved RoPE (Meta's complex form) on permuted rows."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    H, Hd, T, theta = 3, 16, 7, 10000.0
    x = torch.randn(1, H, T, Hd)
    inv = 1.0 / theta ** (torch.arange(0, Hd, 2).float() / Hd)  # [Hd/2]
    ang = torch.arange(T).float()[:, None] * inv[None]  # [T, Hd/2]
    emb = torch.cat([ang, ang], dim=-1)
    hf_rot, _ = apply_rotary_pos_emb(x, x, emb.cos()[None], emb.sin()[None])  # [1,H,T,Hd]
    # Meta: consecutive pairs are complex numbers, multiplied by e^{i*angle}.
    xm = torch.from_numpy(hf_to_meta(x[0].permute(0, 2, 1).reshape(H * Hd, T).numpy(), H, Hd))  # rows in Meta order
    xm = xm.reshape(H, Hd, T).permute(0, 2, 1)  # [H,T,Hd]
    meta_rot = torch.view_as_real(torch.view_as_complex(xm.reshape(H, T, Hd // 2, 2).contiguous())
                                  * torch.polar(torch.ones_like(ang), ang)).reshape(H, T, Hd)
    want = hf_to_meta(hf_rot[0].permute(0, 2, 1).reshape(H * Hd, T).numpy(), H, Hd).reshape(H, Hd, T)
    np.testing.assert_allclose(meta_rot.permute(0, 2, 1).numpy(), want, atol=1e-5)


# --- the safetensors reader ------------------------------------------------------------------

def test_bf16_conversion_matches_torch():
    vals = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.14159, 1e-40, -1e38, float("inf"), float("-inf"), 65504.0])
    vals = torch.cat([vals, torch.randn(1000) * 100]).bfloat16()
    ours = bf16_to_f32(vals.view(torch.int16).numpy().view(np.uint16))
    np.testing.assert_array_equal(ours, vals.float().numpy())
    nan = bf16_to_f32(torch.tensor([float("nan")]).bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.isnan(nan).all()


def test_reader_matches_safetensors_package(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": rng.standard_normal(7).astype(np.float16),
               "empty": np.zeros((0, 5), np.float32), "scalar": np.array(2.5, np.float32),
               "c": rng.standard_normal((2, 3, 2)).astype(np.float16)}
    st_save_np(tensors, tmp_path / "x.safetensors", metadata={"format": "np"})
    ref = st_load_np(tmp_path / "x.safetensors")
    ours = read_safetensors(tmp_path / "x.safetensors")
    assert set(ours) == set(ref)
    for k in ref:
        assert ours[k].dtype == np.float32 and ours[k].flags.c_contiguous and ours[k].shape == ref[k].shape
        np.testing.assert_array_equal(ours[k], ref[k].astype(np.float32))
    assert SafetensorsFile(tmp_path / "x.safetensors").metadata == {"format": "np"}


def test_reader_bf16_file_matches_torch(dirs):
    from safetensors.torch import load_file

    f = next(dirs["scaled_bf16"].glob("*.safetensors"))
    ref = load_file(f)
    ours = read_safetensors(f)
    for k, v in ref.items():
        assert v.dtype == torch.bfloat16
        np.testing.assert_array_equal(ours[k], v.float().numpy())


def st_file(path, header, data=b"", raw_header=None, n=None):
    """A safetensors file built by hand: [n: u64 LE][header JSON][data]."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_FILES = {
    "too short": lambda p: p.write_bytes(b"\x01\x00"),
    "header past end": lambda p: st_file(p, {"a": F32x2}, b"\0" * 8, n=10_000),
    "absurd header length": lambda p: st_file(p, {"a": F32x2}, b"\0" * 8, n=1 << 62),
    "bad json": lambda p: st_file(p, None, b"", raw_header=b'{"a": {"dtype": '),
    "not utf-8": lambda p: st_file(p, None, b"", raw_header=b'{"\xff": 1}'),
    "not an object": lambda p: st_file(p, [1, 2], b""),
    "unknown dtype": lambda p: st_file(p, {"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "size mismatch": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "huge shape": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 8]}}, b"\0" * 8),
    "past the end": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "overlap": lambda p: st_file(p, {"a": F32x2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "gap": lambda p: st_file(p, {"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}}, b"\0" * 16),
    "uncovered tail": lambda p: st_file(p, {"a": F32x2}, b"\0" * 12),
    "not starting at 0": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "duplicate name": lambda p: st_file(p, None, b"\0" * 16, raw_header=(
        b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
        b' "a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}')),
    "negative dim": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "bool dim": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, b"\0" * 8),
    "reversed offsets": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"\0" * 8),
    "missing field": lambda p: st_file(p, {"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
    "metadata not strings": lambda p: st_file(p, {"__metadata__": {"x": 1}, "a": F32x2}, b"\0" * 8),
}


BAD_FILE_REASONS = {
    "too short": "not a safetensors file", "header past end": "header length 10000 is impossible",
    "absurd header length": "is impossible", "bad json": "not valid JSON", "not utf-8": "not valid JSON",
    "not an object": "not a JSON object", "unknown dtype": "unknown dtype 'F33'", "size mismatch": "needs 12 bytes",
    "huge shape": "data_offsets give 8", "past the end": "past the end", "overlap": "overlaps",
    "gap": "gap of 4 bytes", "uncovered tail": "cover 8 bytes but the data section has 12",
    "not starting at 0": "gap of 4 bytes", "duplicate name": "duplicate key 'a'", "negative dim": "bad shape",
    "bool dim": "bad shape", "reversed offsets": "bad data_offsets", "missing field": "must have exactly",
    "metadata not strings": "__metadata__",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_safetensors(tmp_path, case):
    p = tmp_path / "bad.safetensors"
    BAD_FILES[case](p)
    # the reference library refuses each of these files too
    with pytest.raises(Exception):
        st_load_np(p)
    with pytest.raises(FormatError) as e:
        read_safetensors(p)
    assert str(p) in one_line(e) and BAD_FILE_REASONS[case] in str(e.value)


def test_unsupported_dtype_is_refused_on_read(tmp_path):
    st_save_np({"i": np.arange(3, dtype=np.int64)}, tmp_path / "i.safetensors")
    f = SafetensorsFile(tmp_path / "i.safetensors")  # the header itself is valid
    with pytest.raises(UnsupportedError) as e:
        f.read("i")
    assert "I64" in one_line(e)


# --- directories: config, weights, info, logits ------------------------------------------------

@pytest.mark.parametrize("name", ["gqa_untied_f32", "tied_f16_legacy", "scaled_bf16", "sharded_llama31"])
def test_llama_config(dirs, loaded, name):
    ref = transformers.AutoConfig.from_pretrained(dirs[name])
    cfg = loaded[name][0]
    assert (cfg.arch, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_dim, cfg.max_seq_len) == (
        "llama", ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
        ref.vocab_size, ref.intermediate_size, ref.max_position_embeddings)
    assert cfg.head_dim == ref.head_dim and cfg.norm_eps == ref.rms_norm_eps
    assert cfg.tie_embeddings == ref.tie_word_embeddings
    rp = ref.rope_parameters
    assert cfg.rope_theta == rp["rope_theta"]
    if rp.get("rope_type", "default") == "default":
        assert cfg.rope_scaling is None
    else:
        assert cfg.rope_scaling == {k: rp[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                                       "original_max_position_embeddings")}


@pytest.mark.parametrize("name", ["gqa_untied_f32", "tied_f16_legacy", "scaled_bf16", "sharded_llama31"])
def test_llama_weights_equal_hf_state_dict(dirs, loaded, name):
    cfg, w, info = loaded[name]
    sd = hf_state_dict(dirs[name])
    w = as_arrays(w, stored_16bit=next(iter(sd.values())).dtype != torch.float32)
    want = hf_llama_to_meta_names({k: v.float() for k, v in sd.items()}, cfg.n_heads, cfg.n_kv_heads)
    assert set(w) == set(want)
    for k, v in want.items():
        assert w[k].dtype == np.float32 and w[k].flags.c_contiguous, k
        np.testing.assert_array_equal(w[k], v.numpy(), err_msg=k)
    # and the other way round: our wq taken back to HF's order is q_proj
    q = sd["model.layers.1.self_attn.q_proj.weight"].float().numpy()
    np.testing.assert_array_equal(meta_to_hf(w["layers.1.attention.wq.weight"], cfg.n_heads, cfg.head_dim), q)


@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied_f16"])
def test_gpt2_config_and_weights(dirs, loaded, name):
    cfg, w, info = loaded[name]
    w = as_arrays(w, stored_16bit=name.endswith("f16"))
    ref = transformers.AutoConfig.from_pretrained(dirs[name])
    assert (cfg.arch, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.max_seq_len, cfg.ffn_dim) == (
        "gpt2", ref.n_embd, ref.n_layer, ref.n_head, ref.vocab_size, ref.n_positions, 4 * ref.n_embd)
    assert cfg.norm_eps == ref.layer_norm_epsilon and cfg.tie_embeddings == ref.tie_word_embeddings
    sd = {k.removeprefix("transformer."): v.float().numpy() for k, v in hf_state_dict(dirs[name]).items()}
    D = cfg.dim
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}.", f"h.{i}."
        c_attn = sd[h + "attn.c_attn.weight"]  # Conv1D: [in=D, out=3D]
        for j, x in enumerate("qkv"):
            np.testing.assert_array_equal(w[p + f"attention.w{x}.weight"], c_attn[:, j * D:(j + 1) * D].T)
            np.testing.assert_array_equal(w[p + f"attention.w{x}.bias"], sd[h + "attn.c_attn.bias"][j * D:(j + 1) * D])
        np.testing.assert_array_equal(w[p + "attention.wo.weight"], sd[h + "attn.c_proj.weight"].T)
        np.testing.assert_array_equal(w[p + "feed_forward.w1.weight"], sd[h + "mlp.c_fc.weight"].T)
        np.testing.assert_array_equal(w[p + "feed_forward.w2.weight"], sd[h + "mlp.c_proj.weight"].T)
        np.testing.assert_array_equal(w[p + "feed_forward.w2.bias"], sd[h + "mlp.c_proj.bias"])
        np.testing.assert_array_equal(w[p + "ffn_norm.bias"], sd[h + "ln_2.bias"])
    np.testing.assert_array_equal(w["pos_embeddings.weight"], sd["wpe.weight"])
    np.testing.assert_array_equal(w["norm.bias"], sd["ln_f.bias"])
    assert ("output.weight" in w) == (not ref.tie_word_embeddings)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in w.values())


def test_info(dirs, loaded, tmp_path):
    assert loaded["tied_f16_legacy"][2]["torch_dtype"] == "float16"  # legacy key torch_dtype
    assert loaded["scaled_bf16"][2]["torch_dtype"] == "bfloat16"  # transformers 5 key dtype
    assert loaded["gqa_untied_f32"][2]["eos_token_id"] == 2 and loaded["gqa_untied_f32"][2]["bos_token_id"] == 1
    d = shutil.copytree(dirs["gqa_untied_f32"], tmp_path / "x")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1}))
    assert load_hf_dir(d)[2]["eos_token_id"] == [2, 7]  # generation_config.json wins, as in HF generate
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(FormatError):
        load_hf_dir(d)


@pytest.mark.parametrize("name", sorted(["gqa_untied_f32", "tied_f16_legacy", "scaled_bf16", "sharded_llama31",
                                         "gpt2", "gpt2_untied_f16"]))
def test_logits_match_transformers(dirs, loaded, name):
    from scratchlm.model import Model

    cfg, w, _ = loaded[name]
    ids = [i % cfg.vocab_size for i in IDS]
    ours = Model(cfg, dict(w)).logits(ids)
    ref = hf_logits(hf_reference(dirs[name]), ids)  # the same file, upcast to float32 by transformers
    assert ours.shape == ref.shape == (len(ids), cfg.vocab_size)
    assert rel_err(ours, ref) < 1e-4


# --- bad directories ------------------------------------------------------------------------

def copy_dir(dirs, name, tmp_path):
    return shutil.copytree(dirs[name], tmp_path / name)


def edit_config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (d / "config.json").write_text(json.dumps(c))


def edit_tensors(d, fn):
    f = d / "model.safetensors"
    t = st_load_np(f)
    fn(t)
    st_save_np(t, f)


def test_missing_shard(dirs, tmp_path):
    d = copy_dir(dirs, "sharded_llama31", tmp_path)
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert victim.name in one_line(e) and "missing" in str(e.value)


def test_index_inconsistencies(dirs, tmp_path):
    d = copy_dir(dirs, "sharded_llama31", tmp_path)
    ip = d / "model.safetensors.index.json"
    index = json.loads(ip.read_text())
    bad = dict(index, weight_map=dict(index["weight_map"], **{"model.norm.weight": "../model.safetensors"}))
    ip.write_text(json.dumps(bad))
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "bad file name" in one_line(e)
    # a tensor listed in the index but stored in no shard
    bad = dict(index, weight_map=dict(index["weight_map"], **{"model.extra.weight": index["weight_map"]["model.norm.weight"]}))
    ip.write_text(json.dumps(bad))
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "model.extra.weight" in one_line(e)
    # a tensor stored in a shard the index does not list it for
    wm = dict(index["weight_map"])
    other = next(f for f in set(wm.values()) if f != wm["model.norm.weight"])
    wm["model.norm.weight"] = other
    ip.write_text(json.dumps(dict(index, weight_map=wm)))
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "model.norm.weight" in one_line(e)
    ip.unlink()
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "model.safetensors.index.json" in one_line(e)


@pytest.mark.parametrize("change, err, text", [
    ({"hidden_size": None}, FormatError, "missing key 'hidden_size'"),
    ({"num_hidden_layers": "2"}, FormatError, "'num_hidden_layers' must be an integer"),
    ({"vocab_size": True}, FormatError, "'vocab_size' must be an integer"),
    ({"model_type": "mistral"}, UnsupportedError, "model_type 'mistral'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, UnsupportedError, "'yarn'"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, UnsupportedError, "'linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e4}}, FormatError, "low_freq_factor"),
    ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act"),
    ({"attention_bias": True}, UnsupportedError, "attention_bias"),
    ({"num_key_value_heads": 3}, FormatError, "multiple of n_kv_heads"),
])
def test_bad_config(dirs, tmp_path, change, err, text):
    d = copy_dir(dirs, "gqa_untied_f32", tmp_path)
    edit_config(d, **change)
    with pytest.raises(err) as e:
        load_hf_dir(d)
    assert text in one_line(e)


def test_bad_config_json_and_missing_files(dirs, tmp_path):
    d = copy_dir(dirs, "gqa_untied_f32", tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    one_line(e)
    (d / "config.json").unlink()
    with pytest.raises(FormatError):
        load_hf_dir(d)
    with pytest.raises(ModelNotFoundError):
        load_hf_dir(tmp_path / "nowhere")
    d = copy_dir(dirs, "gpt2", tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "no model.safetensors" in one_line(e)


@pytest.mark.parametrize("edit, text", [
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": np.zeros((60, 64), np.float32)}),
     "'layers.0.attention.wq.weight' has shape [60, 64], expected [64, 64]"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.zeros(16, np.float32)}),
     "unknown tensor 'model.layers.0.self_attn.q_norm.weight'"),
    (lambda t: t.update({"model.layers.2.input_layernorm.weight": np.zeros(64, np.float32)}),
     "unexpected tensor 'layers.2.attention_norm.weight'"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor 'layers.1.feed_forward.w3.weight'"),
    (lambda t: t.pop("lm_head.weight"), "missing tensor 'output.weight'"),
    (lambda t: t.update({"model.layers.01.input_layernorm.weight": np.zeros(64, np.float32)}), "unknown tensor"),
])
def test_bad_tensors(dirs, tmp_path, edit, text):
    d = copy_dir(dirs, "gqa_untied_f32", tmp_path)
    edit_tensors(d, edit)
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert text in one_line(e)


def test_ignored_buffers_and_tied_head(dirs, loaded, tmp_path):
    d = copy_dir(dirs, "gqa_untied_f32", tmp_path)
    edit_tensors(d, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
                                        "model.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    w = load_hf_dir(d)[1]
    assert set(w) == set(loaded["gqa_untied_f32"][1])
    # tied, with lm_head.weight stored anyway: accepted when it is the embedding, refused otherwise
    d = copy_dir(dirs, "tied_f16_legacy", tmp_path)
    edit_tensors(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    assert "output.weight" not in load_hf_dir(d)[1]
    edit_tensors(d, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] * 2}))
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "tie_word_embeddings" in one_line(e)


def test_gpt2_old_names_and_buffers(dirs, loaded, tmp_path):
    """The original hub GPT-2 has no 'transformer.' prefix and stores attn.bias / attn.masked_bias buffers."""
    d = copy_dir(dirs, "gpt2", tmp_path)

    def old_style(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        t["h.0.attn.bias"] = np.tril(np.ones((1, 1, 128, 128), np.float32))
        t["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    edit_tensors(d, old_style)
    w = load_hf_dir(d)[1]
    ref = loaded["gpt2"][1]
    assert set(w) == set(ref) and all(np.array_equal(w[k], ref[k]) for k in ref)
    edit_tensors(d, lambda t: t.update({"h.0.attn.c_attn.weight": np.zeros((64, 190), np.float32)}))
    with pytest.raises(FormatError) as e:
        load_hf_dir(d)
    assert "h.0.attn.c_attn.weight" in one_line(e)
