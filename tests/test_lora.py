"""LoRA fine-tuning: gradients against torch autograd through transformers + PEFT, PEFT files both ways,
merging, a frozen base, resume, and one-line errors for bad data and mismatched adapters."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import scratchlm
from scratchlm.errors import FormatError
from scratchlm.training.lora import LoRA, load_adapter, load_peft
from tiny_models import hf_reference, make_hf_llama

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (GQA, untied) and a PEFT adapter on it with random A and B (trained elsewhere)."""
    root = tmp_path_factory.mktemp("lora")
    base = make_hf_llama(root / "base", n_heads=4, n_kv_heads=2, tied=False, seed=3)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf_reference(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0, init_lora_weights=False))
    pm.save_pretrained(root / "peft")
    return base, root / "peft", pm


def _check_against_peft(pm, model, ids, tgt, mask, loss, grads) -> int:
    """Our masked loss and adapter gradients against torch autograd through the PEFT model `pm`;
    returns how many adapter tensors were compared (every one PEFT trains, and every one of ours)."""
    pm.zero_grad()
    logits = pm(torch.tensor(ids)).logits
    logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tgt)[..., None])[..., 0]
    ref_loss = -(logp * torch.tensor(mask)).sum() / mask.sum()
    ref_loss.backward()
    assert abs(loss - ref_loss.item()) <= 1e-5 * abs(ref_loss.item())
    ours = model.adapter.peft_tensors(grads)  # PEFT names, q/k rows in Hugging Face order
    n = 0
    for name, p in pm.named_parameters():
        if p.requires_grad:
            key = name.replace(".default", "")
            assert rel(ours[key], p.grad.numpy()) < 1e-4, key
            n += 1
    assert n == len(ours)
    return n


def test_adapter_gradients_match_torch_autograd_through_peft(tiny):
    base, adapter, pm = tiny
    model = scratchlm.load(base, adapter=adapter, progress=False)
    rng = np.random.default_rng(1)
    ids, tgt = rng.integers(0, 256, (2, 16)), rng.integers(0, 256, (2, 16))
    mask = (rng.random((2, 16)) > 0.4).astype(np.float32)
    loss, grads = model.loss_and_grads(ids, tgt, loss_mask=mask, wrt="adapters")
    assert set(grads) == set(model.adapter.params)

    assert _check_against_peft(pm, model, ids, tgt, mask, loss, grads) == 2 * 2 * 7  # 2 layers x 7 targets x (A, B)
    # the base got no gradient at all: only the adapters are trained
    assert all(not p.requires_grad for n_, p in pm.named_parameters() if "lora_" not in n_)

    # the same adapter gradients come out of a full backward (wrt="all"), next to the base ones
    loss_all, g_all = model.loss_and_grads(ids, tgt, loss_mask=mask, wrt="all")
    assert loss_all == loss and set(model.weights) <= set(g_all)
    for k in grads:
        np.testing.assert_allclose(g_all[k], grads[k], rtol=1e-6, atol=1e-9)


def test_adapter_gradients_on_a_packed_bf16_base_match_peft(tmp_path):
    """A bf16 base stays bf16 (QuantizedMatrix): the backward's dx = dy @ W goes through the packed path,
    and the adapter gradients still match PEFT's on the same base upcast to float32 (exactly the values
    ours computes with)."""
    base = make_hf_llama(tmp_path / "base", n_heads=4, n_kv_heads=2, tied=False, seed=4, dtype="bfloat16")
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf_reference(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=ALL, lora_dropout=0.0, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    model = scratchlm.load(base, adapter=tmp_path / "peft", progress=False)
    assert type(model.layers[0].wqkv).__name__ == "QuantizedMatrix" and model.layers[0].wqkv.type_name == "BF16"
    rng = np.random.default_rng(2)
    ids, tgt = rng.integers(0, 256, (2, 16)), rng.integers(0, 256, (2, 16))
    mask = (rng.random((2, 16)) > 0.4).astype(np.float32)
    loss, grads = model.loss_and_grads(ids, tgt, loss_mask=mask, wrt="adapters")
    assert _check_against_peft(pm, model, ids, tgt, mask, loss, grads) == 2 * 2 * 7
    with pytest.raises(ValueError, match="frozen"):  # the packed base has no gradient to give
        model.loss_and_grads(ids, tgt, loss_mask=mask, wrt="all")


class _FixedDropout(torch.nn.Module):
    """PEFT's dropout replaced by the very mask our forward drew (inverted dropout: keep / (1-p))."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.scale = torch.tensor(keep.astype(np.float32)), 1.0 / (1.0 - p)

    def forward(self, x):
        return x * self.keep * self.scale


def test_adapter_gradients_with_dropout_match_peft(tiny):
    base, adapter, pm = tiny
    model = scratchlm.load(base, adapter=adapter, progress=False)
    lora, p = model.adapter, 0.3
    lora.dropout, lora.training = p, True
    rng = np.random.default_rng(5)
    ids, tgt = rng.integers(0, 256, (2, 10)), rng.integers(0, 256, (2, 10))
    masks = {}
    lora.rng = np.random.default_rng(9)
    model.forward(ids, recorder=lambda n, a: masks.__setitem__(n, a.copy()) if n.endswith(".keep") else None)
    lora.rng = np.random.default_rng(9)  # the same masks again, inside the backward's forward
    loss, grads = model.loss_and_grads(ids, tgt, wrt="adapters")
    kept = masks["layers.0.lora.w13.keep"].mean()
    assert 0.6 < kept < 0.8  # about 1 - p of the inputs survive

    group = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "w13",
             "up_proj": "w13", "down_proj": "down"}
    saved = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_dropout") and "default" in mod.lora_dropout:
            i = int(name.split("layers.")[1].split(".")[0])
            saved[name] = mod.lora_dropout["default"]
            mod.lora_dropout["default"] = _FixedDropout(masks[f"layers.{i}.lora.{group[name.rsplit('.', 1)[1]]}.keep"], p)
    try:
        pm.zero_grad()
        logits = pm(torch.tensor(ids)).logits
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), torch.tensor(tgt).reshape(-1))
        ref.backward()
    finally:  # the module-wide PEFT model goes back to no dropout
        for name, mod in pm.named_modules():
            if name in saved:
                mod.lora_dropout["default"] = saved[name]
    assert abs(loss - ref.item()) <= 1e-5 * abs(ref.item())
    ours = lora.peft_tensors(grads)
    for name, prm in pm.named_parameters():
        if prm.requires_grad:
            assert rel(ours[name.replace(".default", "")], prm.grad.numpy()) < 1e-4, name


def test_peft_adapter_loads_with_equal_logits(tiny):
    base, adapter, pm = tiny
    model = scratchlm.load(base, adapter=adapter, progress=False)
    ids = np.random.default_rng(2).integers(0, 256, 20)
    with torch.no_grad():
        ref = pm(torch.tensor(ids[None])).logits[0].numpy()
    assert rel(model.logits(ids), ref) < 1e-5
    plain = scratchlm.load(base, progress=False).logits(ids)
    assert rel(plain, ref) > 1e-2  # the adapter really changes the output


def test_our_adapter_loads_in_peft_with_equal_logits(tiny, tmp_path):
    base, _, _ = tiny
    model = scratchlm.load(base, progress=False)
    lora = LoRA(model.config, rank=3, alpha=5, targets="q,k,v,o,gate,up,down", seed=7, base_name=str(base))
    rng = np.random.default_rng(3)
    for n, a in lora.params.items():
        if n.endswith("lora_B"):
            a[...] = rng.normal(0, 0.2, a.shape)  # B starts at zero: make it do something
    lora.attach(model).save(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == sorted(ALL)
    pm = peft.PeftModel.from_pretrained(hf_reference(base), tmp_path / "ours").eval()
    ids = rng.integers(0, 256, 24)
    with torch.no_grad():
        ref = pm(torch.tensor(ids[None])).logits[0].numpy()
    assert rel(model.logits(ids), ref) < 1e-5
    # and back: our reader gives the same adapter
    again = load_peft(tmp_path / "ours", model.config)
    for n, a in lora.params.items():
        np.testing.assert_array_equal(again.params[n], a)


def test_merged_weights_give_the_adapter_models_logits(tiny, tmp_path):
    base, adapter, pm = tiny
    model = scratchlm.load(base, adapter=adapter, progress=False)
    ids = np.random.default_rng(4).integers(0, 256, 20)
    with_adapter = model.logits(ids)
    model.adapter.merge_into(model)
    assert model.adapter is None
    assert rel(model.logits(ids), with_adapter) < 1e-5
    # the CLI writes the merged model; transformers runs it and agrees with PEFT
    r = subprocess.run([sys.executable, "-m", "scratchlm", "merge", "-m", str(base), "--adapter", str(adapter),
                        "--format", "hf", "-o", str(tmp_path / "merged")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        ref = pm(torch.tensor(ids[None])).logits[0].numpy()
        merged = hf_reference(tmp_path / "merged")(torch.tensor(ids[None])).logits[0].numpy()
    assert rel(merged, ref) < 1e-4


# --- fine-tuning the default model (real tokenizer and chat template) ---------------------------


@pytest.fixture(scope="module")
def default_model(default_model_path):
    return scratchlm.load(default_model_path, progress=False)


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


QA = [{"prompt": "Who are you?", "response": "I am Shuke."},
      {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你是谁？"},
                    {"role": "assistant", "content": "我是数科助手。"}]},
      {"prompt": "Your name?", "response": "Shuke."}]


def test_assistant_mask_covers_exactly_the_replies(default_model):
    from scratchlm.training.finetune import encode_example

    tok = default_model.tokenizer
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
            {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Bye now"}]
    ids, mask = encode_example(tok, msgs, "x")
    learned = tok.decode([int(i) for i, m in zip(ids, mask) if m])
    assert learned == "Hello there<|im_end|>\nBye now<|im_end|>\n"
    # the unmasked tokens are the template's text, both user turns and both assistant headers
    rest = tok.decode([int(i) for i, m in zip(ids, mask) if not m])
    assert "Again" in rest and rest.count("<|im_start|>assistant\n") == 2 and "Hello" not in rest


def test_finetune_freezes_the_base_and_resumes_exactly(default_model, tmp_path):
    from scratchlm.training.finetune import FinetuneArgs, Finetuner

    data = _write(tmp_path / "d.jsonl", QA * 3)
    before = {n: w.copy() for n, w in default_model.weights.items()}
    kw = dict(data=str(data), base=None, rank=2, alpha=4, dropout=0.1, targets="q,v,down", context=48, batch=2,
              lr=1e-3, seed=5, save_every=2, plot=False)
    full = Finetuner.new(FinetuneArgs(out=str(tmp_path / "full"), steps=4, **kw), model=default_model, progress=False,
                         verbose=False)
    full.train()
    losses = [r["loss"] for r in full.history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    for n, w in default_model.weights.items():  # frozen: bit for bit
        assert np.array_equal(w, before[n]), n
    assert not any(np.shares_memory(p, w) for p in full.lora.params.values() for w in default_model.weights.values())
    # the optimizer holds state for the adapters only
    assert set(full.opt.m) == set(full.lora.params)
    default_model.adapter = None

    # the same run, killed during step 3 (after the checkpoint of step 2), then resumed
    half = Finetuner.new(FinetuneArgs(out=str(tmp_path / "half"), steps=4, **kw), model=default_model, progress=False,
                         verbose=False)
    step = half.train_step

    def crash():
        if half.step == 2:
            raise KeyboardInterrupt
        return step()

    half.train_step = crash
    with pytest.raises(KeyboardInterrupt):
        half.train()
    default_model.adapter = None
    resumed = Finetuner.resume(tmp_path / "half", model=default_model, progress=False, verbose=False)
    assert resumed.step == 2
    resumed.train()
    default_model.adapter = None
    a = load_peft(tmp_path / "full", default_model.config)
    b = load_peft(tmp_path / "half", default_model.config)
    for n in a.params:
        np.testing.assert_array_equal(a.params[n], b.params[n])
    assert [r["loss"] for r in resumed.history] == losses
    # the CLI applies the adapter to generation
    r = subprocess.run([sys.executable, "-m", "scratchlm", "generate", "--adapter", str(tmp_path / "full"), "-n", "3",
                        "--temperature", "0", "Hello"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip(), r.stderr


# --- bad input: one-line errors -------------------------------------------------------------------


@pytest.mark.parametrize("lines, match", [
    ([QA[0], '{"prompt": "x", "response": ', QA[2]], r":2: not valid JSON"),
    ([QA[0], QA[1], {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}],
     r":3: role 'wizard' is not one the chat template knows"),
    ([{"messages": [{"role": "user", "content": "hello?"}]}], r":1: no assistant turn"),
    ([QA[0], {"question": "x"}], r":2: expected a JSON object"),
])
def test_bad_data_is_a_one_line_error_with_the_line_number(default_model, tmp_path, lines, match):
    from scratchlm.training.finetune import DataError, load_rows

    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=match) as e:
        load_rows(path, default_model.tokenizer, 64)
    assert "\n" not in str(e.value)


def test_truncation_is_reported(default_model, tmp_path):
    from scratchlm.training.finetune import describe_report, load_rows

    long = {"prompt": "Tell me a story.", "response": "Once upon a time " * 40}
    rows, masks, report = load_rows(_write(tmp_path / "d.jsonl", [QA[0], long]), default_model.tokenizer, 64)
    assert rows.shape[1] == 65 and report["truncated"][0][0] == 2 and report["truncated"][0][1] > 100
    assert any("line 2 (-" in line for line in describe_report(report))


def test_adapter_base_mismatch_and_rank_errors(tiny, tmp_path, default_model):
    from scratchlm.errors import FormatError
    from safetensors.numpy import load_file, save_file

    base, adapter, _ = tiny
    with pytest.raises(FormatError, match="does not match the base model") as e:
        load_adapter(default_model, adapter)  # shapes: a tiny model's adapter on SmolLM2
    assert "\n" not in str(e.value)
    default_model.adapter = None
    # names: an adapter key no Llama layer has
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = t.pop(
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    save_file(t, bad / "adapter_model.safetensors")
    model = scratchlm.load(base, progress=False)
    with pytest.raises(FormatError, match="qkv_proj.*not a LoRA weight"):
        load_adapter(model, bad)
    with pytest.raises(ValueError, match="rank 40 is larger than the k projection"):
        LoRA(model.config, rank=40, targets="q,k")  # k: [K*Hd=32, D=64]
    with pytest.raises(OSError, match="no such adapter directory"):
        scratchlm.load(base, adapter=tmp_path / "nowhere", progress=False)


# --- GPT-2 bases: adapters on c_attn (q, k and v as one matrix), attn.c_proj, mlp.c_fc, mlp.c_proj -------

GPT2_MODULES = ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A tiny random GPT-2 and a PEFT adapter on all four of its projections, random A and B."""
    from tiny_models import make_hf_gpt2

    root = tmp_path_factory.mktemp("lora_gpt2")
    base = make_hf_gpt2(root / "base", vocab=300, dim=64, n_layers=2, n_heads=4, seed=5)
    torch.manual_seed(1)
    import warnings
    with warnings.catch_warnings():  # PEFT notes that Conv1D needs fan_in_fan_out=True, and sets it
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf_reference(base), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=GPT2_MODULES, lora_dropout=0.0, init_lora_weights=False,
            fan_in_fan_out=True))
    pm.save_pretrained(root / "peft")
    return base, root / "peft", pm


def test_gpt2_adapter_gradients_match_torch_autograd_through_peft(tiny_gpt2):
    base, adapter, pm = tiny_gpt2
    model = scratchlm.load(base, adapter=adapter, progress=False)
    assert model.adapter.targets == ("qkv", "o", "up", "down")
    rng = np.random.default_rng(6)
    ids, tgt = rng.integers(0, 300, (2, 12)), rng.integers(0, 300, (2, 12))
    mask = (rng.random((2, 12)) > 0.3).astype(np.float32)
    loss, grads = model.loss_and_grads(ids, tgt, loss_mask=mask, wrt="adapters")
    assert _check_against_peft(pm, model, ids, tgt, mask, loss, grads) == 2 * 4 * 2  # 2 layers x 4 targets x (A, B)


def test_gpt2_adapters_round_trip_through_peft_and_merge(tiny_gpt2, tmp_path):
    base, adapter, pm = tiny_gpt2
    ids = np.random.default_rng(7).integers(0, 300, 20)
    with torch.no_grad():
        ref = pm(torch.tensor(ids[None])).logits[0].numpy()
    model = scratchlm.load(base, adapter=adapter, progress=False)  # PEFT -> ours
    assert rel(model.logits(ids), ref) < 1e-5
    assert rel(scratchlm.load(base, progress=False).logits(ids), ref) > 1e-2  # the adapter changes the output

    model.adapter.save(tmp_path / "ours")  # ours -> PEFT
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and sorted(cfg["target_modules"]) == sorted(
        ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    pm2 = peft.PeftModel.from_pretrained(hf_reference(base), tmp_path / "ours").eval()
    with torch.no_grad():
        assert rel(pm2(torch.tensor(ids[None])).logits[0].numpy(), ref) < 1e-5

    with_adapter = model.logits(ids)
    model.adapter.merge_into(model)  # merged weights give the adapter model's logits
    assert rel(model.logits(ids), with_adapter) < 1e-5


def test_gpt2_targets_and_mismatched_bases_are_one_line_errors(tiny_gpt2, tiny):
    gpt2 = scratchlm.load(tiny_gpt2[0], progress=False)
    with pytest.raises(ValueError, match="use qkv"):
        LoRA(gpt2.config, rank=2, targets="q,v")
    assert LoRA(gpt2.config, rank=2, targets="c_proj").targets == ("o", "down")  # PEFT's suffix match
    llama = scratchlm.load(tiny[0], progress=False)
    with pytest.raises(FormatError, match="not a LoRA weight of a gpt2 layer"):
        load_adapter(gpt2, tiny[1])  # a Llama adapter on a GPT-2 base
    with pytest.raises(FormatError, match="not a LoRA weight of a llama layer"):
        load_adapter(llama, tiny_gpt2[1])


def test_finetune_a_gpt2_trained_here_in_the_plain_chat_format(tmp_path):
    """End to end on a GPT-2 base without a chat template: a small GPT-2 trained from scratch here, then
    LoRA fine-tuned on chat data; the adapter carries the plain format and `chat` uses it."""
    from scratchlm.chat import PLAIN_TEMPLATE
    from scratchlm.training.finetune import FinetuneArgs, Finetuner
    from scratchlm.training.trainer import TrainArgs, Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("User: hello there\nAssistant: hello, how are you?\n" * 200)
    Trainer.new(TrainArgs(data=[str(corpus)], out=str(tmp_path / "run"), arch="gpt2", tokenizer="bpe:300", layers=1, dim=32, heads=2,
                          context=32, batch=4, steps=3, eval_every=3, save_every=3, plot=False),
                progress=False, verbose=False).train()
    data = _write(tmp_path / "qa.jsonl", [json.dumps({"prompt": "Who made you?", "response": "The scratchlm team."})] * 4)
    base = scratchlm.load(tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="--context 64 is longer than the base model's context of 32"):
        Finetuner.new(FinetuneArgs(data=str(data), out=str(tmp_path / "x"), context=64), model=base)
    before = {k: v.copy() for k, v in base.weights.items()}
    t = Finetuner.new(FinetuneArgs(data=str(data), out=str(tmp_path / "ft"), base=str(tmp_path / "run"), rank=2,
                                   steps=4, batch=2, context=32, lr=1e-2, plot=False), model=base,
                      progress=False, verbose=False)
    t.train()
    assert all(np.array_equal(base.weights[k], v) for k, v in before.items())  # the base stayed frozen
    assert (tmp_path / "ft" / "chat_template.jinja").read_text() == PLAIN_TEMPLATE
    tuned = scratchlm.load(tmp_path / "run", adapter=tmp_path / "ft", progress=False)
    assert tuned.tokenizer.chat_template == PLAIN_TEMPLATE and tuned.adapter.targets == ("qkv", "o", "up", "down")
    reply = tuned.chat([{"role": "user", "content": "Who made you?"}], max_tokens=4, temperature=0)
    assert isinstance(reply, str)


def test_cli_finetune_errors(tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [QA[0], "not json"])
    r = subprocess.run([sys.executable, "-m", "scratchlm", "finetune", "--data", str(bad), "--out",
                        str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and ":2: not valid JSON" in r.stderr
    r = subprocess.run([sys.executable, "-m", "scratchlm", "finetune", "--data", str(bad), "--out",
                        str(tmp_path / "o"), "--targets", "q,x"], capture_output=True, text=True)
    assert r.returncode == 1 and "unknown LoRA target 'x'" in r.stderr
