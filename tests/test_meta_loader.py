"""Meta's layout (params.json + consolidated.NN.pth): our restricted .pth reader against torch.load,
shard merging and the key map against the Hugging Face twin of the same network, logits against
transformers, and refusal of pickles that would run code."""

import json
import os
import pickle
import shutil
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from scratchlm.errors import FormatError, ModelNotFoundError, UnsupportedError  # noqa: E402
from scratchlm.formats.meta import ffn_hidden_dim, load_meta_dir, read_pth  # noqa: E402
from tests.tiny_models import (META_ROPE_SCALING, as_arrays, hf_llama_to_meta_names, hf_logits, hf_reference,  # noqa: E402
                               hf_state_dict, make_hf_llama, make_meta_from_hf)

IDS = [5, 17, 200, 3, 99, 250, 1, 0, 42, 128, 7, 77, 33, 201, 11, 9, 64, 180, 2, 255, 6, 31]


def one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    return msg


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("meta")
    # Llama 3.1 style (scaled rope, theta 500000), stored in bf16 so the Meta copy holds the same values.
    hf = make_hf_llama(root / "hf", rope_scaling=META_ROPE_SCALING, rope_theta=500000.0, max_pos=131072,
                       dtype="bfloat16", seed=7)
    hf_tied = make_hf_llama(root / "hf_tied", tied=True, vocab=300, n_kv_heads=4, dtype="bfloat16", seed=8)
    rope_freqs = {"rope.freqs": torch.ones(8, dtype=torch.bfloat16)}  # what Llama 2 checkpoints carry
    return {
        "hf": hf, "hf_tied": hf_tied,
        "one": make_meta_from_hf(hf, root / "one"),
        "two": make_meta_from_hf(hf, root / "two", n_shards=2),
        "two_llama2_embed": make_meta_from_hf(hf, root / "two_l2", n_shards=2, embed_split_dim=1, extra_tensors=rope_freqs),
        "tied_f32": make_meta_from_hf(hf_tied, root / "tied", dtype="float32"),
    }


@pytest.fixture(scope="module")
def loaded(dirs):
    return {k: load_meta_dir(p) for k, p in dirs.items() if not k.startswith("hf")}


# --- the restricted .pth reader ----------------------------------------------------------------

def test_read_pth_matches_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g).bfloat16()
    sd = {"bf16": base, "row_view": base[3], "tail_view": base[4:], "f16": torch.randn(4, 3, generator=g).half(),
          "f32": torch.randn(2, 3, 4, generator=g), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3),
          "size1_dims": torch.randn(3, 1, generator=g)}
    torch.save(sd, tmp_path / "x.pth")
    ref = torch.load(tmp_path / "x.pth", weights_only=True)
    ours = read_pth(tmp_path / "x.pth")
    assert set(ours) == set(ref)
    for k, v in ref.items():
        assert ours[k].dtype == np.float32 and ours[k].shape == tuple(v.shape), k
        np.testing.assert_array_equal(ours[k], v.float().numpy(), err_msg=k)


def test_non_contiguous_tensor_refused(tmp_path):
    torch.save({"t": torch.randn(4, 3).t()}, tmp_path / "x.pth")
    with pytest.raises(UnsupportedError) as e:
        read_pth(tmp_path / "x.pth")
    assert "non-contiguous" in one_line(e)


def test_unsupported_storage_type_refused(tmp_path):
    torch.save({"t": torch.arange(4)}, tmp_path / "x.pth")  # int64: torch.LongStorage is not admitted
    with pytest.raises(FormatError) as e:
        read_pth(tmp_path / "x.pth")
    assert "torch.LongStorage" in one_line(e)


def pth_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
    return path


class _Call:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def payloads(marker):
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": pickle.dumps(_Call(os.system, f"touch {marker}"), protocol=2),
        "builtins.eval": pickle.dumps(_Call(eval, touch), protocol=2),
        "builtins.exec": pickle.dumps(_Call(exec, touch), protocol=4),  # STACK_GLOBAL
        # protocol 0's INST opcode names the callable inline
        "inst opcode": b"(S'touch " + str(marker).encode() + b"'\nios\nsystem\n.",
        "nested in a state dict": pickle.dumps({"tok_embeddings.weight": _Call(eval, touch)}, protocol=2),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "builtins.exec", "inst opcode", "nested in a state dict"])
def test_pickle_payload_refused(tmp_path, name):
    marker = tmp_path / "pwned"
    payload = payloads(marker)[name]
    # The payload is live: a plain unpickler runs it (in a subprocess-free way: it just creates the marker).
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()
    p = pth_with_pickle(tmp_path / "evil.pth", payload)
    with pytest.raises(FormatError) as e:
        read_pth(p)
    assert "refusing to load global" in one_line(e)
    assert not marker.exists()


def test_payload_inside_real_torch_checkpoint_refused(tmp_path):
    """torch.save itself pickles the call next to real tensors; loading must stop at the foreign global."""
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "x": _Call(os.system, f"touch {marker}")}, tmp_path / "evil.pth")
    with pytest.raises(FormatError) as e:
        read_pth(tmp_path / "evil.pth")
    assert "posix.system" in one_line(e) or "os.system" in str(e.value)
    assert not marker.exists()
    # a Meta directory whose shard carries it is refused the same way
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(tmp_path / "evil.pth", d / "consolidated.00.pth")
    (d / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 8}))
    with pytest.raises(FormatError):
        load_meta_dir(d)
    assert not marker.exists()


def test_malformed_pth_files(tmp_path):
    (tmp_path / "legacy.pth").write_bytes(pickle.dumps({"a": 1}))  # not a zip
    with pytest.raises(UnsupportedError):
        read_pth(tmp_path / "legacy.pth")
    torch.save({"w": torch.randn(8, 8)}, tmp_path / "ok.pth")
    raw = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    with pytest.raises((FormatError, UnsupportedError)) as e:
        read_pth(tmp_path / "trunc.pth")
    one_line(e)
    pth_with_pickle(tmp_path / "list.pth", pickle.dumps([1, 2]))
    with pytest.raises(FormatError) as e:
        read_pth(tmp_path / "list.pth")
    assert "expected a state dict" in one_line(e)
    pth_with_pickle(tmp_path / "junk.pth", b"\x80\x02junk")
    with pytest.raises(FormatError) as e:
        read_pth(tmp_path / "junk.pth")
    one_line(e)
    # a storage entry shorter than the pickle says
    with zipfile.ZipFile(tmp_path / "ok.pth") as z, zipfile.ZipFile(tmp_path / "short.pth", "w") as out:
        for zi in z.infolist():
            data = z.read(zi)
            out.writestr(zi, data[:100] if zi.filename.endswith("data/0") else data)
    with pytest.raises(FormatError) as e:
        read_pth(tmp_path / "short.pth")
    assert "expected 256" in one_line(e)


# --- params.json and shard merging --------------------------------------------------------------

def test_ffn_hidden_dim_of_real_models():
    # (dim, multiple_of, ffn_dim_multiplier) from Meta's published params.json -> their ffn width
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama 2 7B
    assert ffn_hidden_dim(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert ffn_hidden_dim(8192, 4096, 1.3) == 28672  # Llama 2/3 70B
    assert ffn_hidden_dim(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert ffn_hidden_dim(64, 32, 0.75) == 128  # the tiny models here


def test_config(dirs, loaded):
    ref = transformers.AutoConfig.from_pretrained(dirs["hf"])
    for name in ("one", "two", "two_llama2_embed"):
        cfg = loaded[name][0]
        assert (cfg.arch, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_dim) == (
            "llama", ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads,
            ref.vocab_size, ref.intermediate_size)
        assert cfg.norm_eps == ref.rms_norm_eps and cfg.rope_theta == 500000.0 and not cfg.tie_embeddings
        assert cfg.rope_scaling == META_ROPE_SCALING and cfg.max_seq_len == 131072
    assert loaded["tied_f32"][0].tie_embeddings and loaded["tied_f32"][0].rope_scaling is None
    assert loaded["one"][2]["torch_dtype"] == "bfloat16" and loaded["tied_f32"][2]["torch_dtype"] == "float32"
    assert len(loaded["two"][2]["files"]) == 2


def test_vocab_size_minus_one_from_embedding(dirs, tmp_path):
    d = shutil.copytree(dirs["two_llama2_embed"], tmp_path / "d")
    p = json.loads((d / "params.json").read_text())
    (d / "params.json").write_text(json.dumps(dict(p, vocab_size=-1)))
    assert load_meta_dir(d)[0].vocab_size == 256


@pytest.mark.parametrize("name", ["one", "two", "two_llama2_embed", "tied_f32"])
def test_weights_equal_hf_twin(dirs, loaded, name):
    cfg, w, _ = loaded[name]
    w = as_arrays(w, stored_16bit=name != "tied_f32")
    src = dirs["hf_tied" if name == "tied_f32" else "hf"]
    want = hf_llama_to_meta_names({k: v.float() for k, v in hf_state_dict(src).items()}, cfg.n_heads, cfg.n_kv_heads)
    assert set(w) == set(want)  # rope.freqs dropped
    for k, v in want.items():
        assert w[k].dtype == np.float32 and w[k].flags.c_contiguous, k
        np.testing.assert_array_equal(w[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("name", ["one", "two", "two_llama2_embed", "tied_f32"])
def test_logits_match_transformers(dirs, loaded, name):
    from scratchlm.model import Model

    cfg, w, _ = loaded[name]
    ids = [i % cfg.vocab_size for i in IDS]
    ours = Model(cfg, dict(w)).logits(ids)
    ref = hf_logits(hf_reference(dirs["hf_tied" if name == "tied_f32" else "hf"]), ids)
    assert float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref))) < 1e-4


# --- bad directories ------------------------------------------------------------------------

def copy_dir(dirs, name, tmp_path):
    return shutil.copytree(dirs[name], tmp_path / name)


def edit_params(d, **changes):
    p = json.loads((d / "params.json").read_text())
    for k, v in changes.items():
        if v is None:
            p.pop(k, None)
        else:
            p[k] = v
    (d / "params.json").write_text(json.dumps(p))


@pytest.mark.parametrize("change, err, text", [
    ({"dim": None}, FormatError, "missing key 'dim'"),
    ({"n_layers": 2.0}, FormatError, "'n_layers' must be an integer"),
    ({"use_scaled_rope": "yes"}, FormatError, "'use_scaled_rope' must be true or false"),
    ({"ffn_dim_multiplier": 1.3}, FormatError, "'layers.0.feed_forward.w1.weight' has shape [128, 64], expected [224, 64]"),
    ({"n_heads": 8}, FormatError, "'layers.0.attention.wk.weight' has shape [32, 64], expected [16, 64]"),
    ({"n_layers": 3}, FormatError, "missing tensor 'layers.2.attention_norm.weight'"),
    ({"n_layers": 1}, FormatError, "unexpected tensor 'layers.1."),
])
def test_bad_params(dirs, tmp_path, change, err, text):
    d = copy_dir(dirs, "one", tmp_path)
    edit_params(d, **change)
    with pytest.raises(err) as e:
        load_meta_dir(d)
    assert text in one_line(e)


def resave(path, fn):
    sd = torch.load(path, weights_only=True)
    fn(sd)
    torch.save(sd, path)


@pytest.mark.parametrize("edit, text", [
    (lambda sd: sd.update({"layers.0.attention.wq.weight": torch.zeros(60, 64, dtype=torch.bfloat16)}),
     "'layers.0.attention.wq.weight' has shape [60, 64], expected [64, 64]"),
    (lambda sd: sd.update({"layers.0.attention.q_norm.weight": torch.zeros(16, dtype=torch.bfloat16)}),
     "unexpected tensor 'layers.0.attention.q_norm.weight'"),
    (lambda sd: sd.pop("layers.1.feed_forward.w3.weight"), "missing tensor 'layers.1.feed_forward.w3.weight'"),
])
def test_bad_tensors(dirs, tmp_path, edit, text):
    d = copy_dir(dirs, "one", tmp_path)
    resave(d / "consolidated.00.pth", edit)
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert text in one_line(e)


def test_bad_shards(dirs, tmp_path):
    d = copy_dir(dirs, "two", tmp_path)
    os.rename(d / "consolidated.01.pth", d / "consolidated.02.pth")  # shard 01 missing
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert "consolidated.01.pth" in one_line(e)
    os.rename(d / "consolidated.02.pth", d / "consolidated.01.pth")
    resave(d / "consolidated.01.pth", lambda sd: sd.pop("norm.weight"))
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert "'norm.weight' is in one shard" in one_line(e)
    d = copy_dir(dirs, "two", tmp_path / "b")
    resave(d / "consolidated.01.pth", lambda sd: sd.update({"norm.weight": sd["norm.weight"] * 2}))
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert "replicated tensor 'norm.weight' differs" in one_line(e)
    resave(d / "consolidated.01.pth", lambda sd: sd.update({"layers.0.attention.wo.weight": torch.zeros(3, 32)}))
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert "'layers.0.attention.wo.weight' do not fit" in one_line(e)


def test_missing_files(dirs, tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_meta_dir(tmp_path / "nowhere")
    d = copy_dir(dirs, "one", tmp_path)
    (d / "params.json").write_text("[1]")
    with pytest.raises(FormatError):
        load_meta_dir(d)
    (d / "params.json").unlink()
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert "params.json" in one_line(e)
    d = copy_dir(dirs, "one", tmp_path / "b")
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(FormatError) as e:
        load_meta_dir(d)
    assert "consolidated" in one_line(e)
