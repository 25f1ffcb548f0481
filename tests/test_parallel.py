"""The chunked training step (training/parallel.py): a batch cut into chunks of rows run over threads gives
the whole batch's loss and gradients, the same bit for bit with thread counts that cut it alike; LoRA dropout draws each row's masks from its own
generator. chunk_tokens is set small here so that these tiny batches are cut at all."""

from __future__ import annotations

import numpy as np
import pytest

import scratchlm
from scratchlm.training.lora import LoRA
from scratchlm.training.parallel import parallel_loss_and_grads, resolve_threads, usable_cores
from tests.test_backward import batch, build
from tests.tiny_models import make_hf_llama


def close(a, b, rel=1e-5, floor=1e-7) -> bool:
    """Equal up to float32 rounding: within rel of b's largest entry, or `floor` for a gradient that is
    exactly zero in exact arithmetic (GPT-2's key bias: softmax ignores a shift shared by all keys)."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - b))) <= rel * float(np.max(np.abs(b))) + floor


def test_resolve_threads():
    assert resolve_threads(3) == 3
    assert resolve_threads(0) == usable_cores() >= 1
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="--threads must be a non-negative integer"):
            resolve_threads(bad)


@pytest.mark.parametrize("case", ["llama-gqa-scaled-tied", "gpt2"])
@pytest.mark.parametrize("threads,chunk_tokens", [(1, 16), (2, 16), (2, 40), (3, 32)])
def test_chunks_give_the_whole_batch_loss_and_gradients(case, threads, chunk_tokens):
    _, model, _ = build(case)
    ids, tgt = batch(model.config, B=5, T=16, seed=1)
    loss, grads = model.loss_and_grads(ids, tgt)
    loss_s, grads_s = parallel_loss_and_grads(model, ids, tgt, threads=threads, chunk_tokens=chunk_tokens)
    assert abs(loss_s - loss) <= 1e-6 * abs(loss)
    assert grads_s.keys() == grads.keys()
    for name, g in grads.items():
        assert grads_s[name].shape == g.shape
        assert close(grads_s[name], g), name
    # deterministic, and the same bit for bit with other thread counts that cut the batch alike (every count
    # here, at these chunk sizes): the chunks are summed in their order
    for n_threads in {threads, 1, 4}:
        again = parallel_loss_and_grads(model, ids, tgt, threads=n_threads, chunk_tokens=chunk_tokens)
        assert again[0] == loss_s and all(np.array_equal(again[1][n], grads_s[n]) for n in grads), n_threads


def test_masked_shards_weigh_by_the_targets_they_count():
    _, model, _ = build("llama-gqa-scaled-untied")
    ids, tgt = batch(model.config, B=4, T=12, seed=2)
    mask = np.zeros(ids.shape, np.int64)
    mask[2, 3:] = 1  # chunk 2 of 2 counts 9 + 2 targets, chunk 1 none at all
    mask[3, :2] = 1
    loss, grads = model.loss_and_grads(ids, tgt, loss_mask=mask)
    loss_s, grads_s = parallel_loss_and_grads(model, ids, tgt, loss_mask=mask, threads=2, chunk_tokens=24)
    assert abs(loss_s - loss) <= 1e-6 * abs(loss)
    for name, g in grads.items():
        assert close(grads_s[name], g), name
    mask[1, 0] = 1  # now both chunks count targets, unequally (1 and 11)
    loss, grads = model.loss_and_grads(ids, tgt, loss_mask=mask)
    loss_s, grads_s = parallel_loss_and_grads(model, ids, tgt, loss_mask=mask, threads=2, chunk_tokens=24)
    assert abs(loss_s - loss) <= 1e-6 * abs(loss)
    for name, g in grads.items():
        assert close(grads_s[name], g), name


def test_a_small_batch_is_cut_into_a_chunk_per_thread(monkeypatch):
    _, model, _ = build("llama-gqa-scaled-tied")
    ids, tgt = batch(model.config, B=6, T=8, seed=4)
    calls = []
    real = model.loss_and_grads
    monkeypatch.setattr(model, "loss_and_grads", lambda x, *a, **k: calls.append(x.shape[0]) or real(x, *a, **k))
    for threads, chunks in ((1, [6]), (2, [3, 3]), (4, [2, 2, 2])):  # 48 tokens fit one chunk of 64
        calls.clear()
        loss_s, _ = parallel_loss_and_grads(model, ids, tgt, threads=threads, chunk_tokens=64)
        assert calls == chunks, threads
        assert abs(loss_s - real(ids, tgt)[0]) <= 1e-6 * loss_s


def test_a_slow_chunk_holds_back_at_most_one_result_per_thread_and_a_failing_one_stops_all(monkeypatch):
    import time

    from scratchlm.training import parallel

    _, model, _ = build("llama-gqa-scaled-tied")
    ids, tgt = batch(model.config, B=24, T=8, seed=5)
    real = model.loss_and_grads
    waiting, add = [], parallel._InOrderSum.add

    def slow_first(x, *a, **k):
        if np.array_equal(x, ids[:1]):
            time.sleep(0.3)  # chunk 0 finishes last: the others' results wait for its turn
        return real(x, *a, **k)

    def counting_add(self, *a):
        add(self, *a)
        waiting.append(len(self._waiting))

    monkeypatch.setattr(parallel._InOrderSum, "add", counting_add)
    monkeypatch.setattr(model, "loss_and_grads", slow_first)
    loss_s, _ = parallel_loss_and_grads(model, ids, tgt, threads=3, chunk_tokens=8)  # 24 chunks of one row
    assert abs(loss_s - real(ids, tgt)[0]) <= 1e-6 * loss_s
    assert max(waiting) <= 2  # threads - 1 full gradient sets at most, not 23

    calls = []

    def failing(x, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("chunk failed")
        return real(x, *a, **k)

    monkeypatch.setattr(model, "loss_and_grads", failing)
    with pytest.raises(ValueError, match="chunk failed"):  # raised, not a hang of the threads waiting their turn
        parallel_loss_and_grads(model, ids, tgt, threads=3, chunk_tokens=8)
    assert len(calls) < 24


def test_one_row_is_the_plain_call_and_errors_stay_one_line():
    _, model, _ = build("gpt2")
    ids, tgt = batch(model.config, B=1, T=8)
    loss, grads = model.loss_and_grads(ids, tgt)
    loss_s, grads_s = parallel_loss_and_grads(model, ids, tgt, threads=4, chunk_tokens=1)
    assert loss_s == loss and all(np.array_equal(grads_s[n], grads[n]) for n in grads)
    with pytest.raises(ValueError, match="loss_mask selects no target"):
        parallel_loss_and_grads(model, *batch(model.config, B=2, T=8), loss_mask=np.zeros((2, 8)), threads=2,
                               chunk_tokens=8)
    with pytest.raises(ValueError, match="target_ids has shape"):
        parallel_loss_and_grads(model, ids.repeat(2, 0), tgt, threads=2, chunk_tokens=8)


def test_lora_shards_match_the_plain_adapter_gradients_and_dropout_is_deterministic(tmp_path):
    base = make_hf_llama(tmp_path / "base", n_heads=4, n_kv_heads=2, tied=False, seed=3)
    model = scratchlm.load(base, progress=False)
    lora = LoRA(model.config, rank=4, targets="q,v,o,up,down", seed=1).attach(model)
    for name, a in lora.params.items():  # B off zero, so every gradient is non-trivial
        if name.endswith("lora_B"):
            a[...] = np.random.default_rng(len(name)).standard_normal(a.shape).astype(np.float32) * 0.1
    rng = np.random.default_rng(4)
    ids, tgt = rng.integers(0, 256, (4, 10)), rng.integers(0, 256, (4, 10))
    loss, grads = model.loss_and_grads(ids, tgt, wrt="adapters")
    loss_s, grads_s = parallel_loss_and_grads(model, ids, tgt, wrt="adapters", threads=2, chunk_tokens=10)
    assert abs(loss_s - loss) <= 1e-6 * abs(loss)
    assert grads_s.keys() == grads.keys() == lora.params.keys()
    for name, g in grads.items():
        assert close(grads_s[name], g), name

    lora.dropout, lora.training = 0.3, True
    runs = []
    for threads in (2, 2, 1, 3):  # the masks are drawn per row: the same whatever cuts the batch
        lora.rng = np.random.default_rng(7)
        runs.append(parallel_loss_and_grads(model, ids, tgt, wrt="adapters", threads=threads, chunk_tokens=10))
    assert abs(runs[0][0] - loss) > 1e-6  # not the dropout-free loss
    for run in runs[1:]:  # the same masks again
        assert run[0] == runs[0][0] and all(np.array_equal(runs[0][1][n], run[1][n]) for n in grads)
    lora.training = False


def test_grad_scale_scales_every_gradient_and_not_the_loss():
    _, model, _ = build("gpt2")
    ids, tgt = batch(model.config, B=2, T=8, seed=3)
    loss, grads = model.loss_and_grads(ids, tgt)
    loss_s, grads_s = model.loss_and_grads(ids, tgt, grad_scale=0.25)
    assert loss_s == loss
    for name, g in grads.items():
        np.testing.assert_allclose(grads_s[name], 0.25 * g, rtol=1e-6, atol=1e-12, err_msg=name)
