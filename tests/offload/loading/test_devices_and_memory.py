"""The GPU path's rules, checked on the CPU: devices compared in one spelling, host memory given back on
close, and no activation memory outside the plan's workspace (forward's logits, prefill's hidden states)."""
from __future__ import annotations

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

import offload
from offload.weights import host_memory
from offload.devices import canonical_device, resolve_device, same_device
from tests.offload.offload_plans import EVERY_BACKEND, layout_plan
from tests.offload.loading.test_offload_parity import LONG, NUM_NEW, PROMPTS, reference




def test_devices_are_normalised_to_what_tensors_report():
    assert torch.zeros(1, device="cpu:0").device == torch.device("cpu") != torch.device("cpu:0")
    assert resolve_device("cpu:0") == resolve_device("cpu") == torch.device("cpu")
    assert canonical_device(torch.device("cpu", 0)) == torch.device("cpu")
    assert same_device("cpu:0", torch.zeros(1).device)
    assert same_device(torch.device("cuda", 1), "cuda:1") and not same_device("cuda:0", "cuda:1")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_cpu_0_runs_every_backend(llama5):
    """`device="cpu:0"`: the CPU spelled with an index, as "cuda" without one is spelled on a GPU."""
    plan = layout_plan(llama5, **EVERY_BACKEND)
    model = offload.load(llama5, plan=plan, device="cpu:0", progress=False)
    assert model.device == torch.device("cpu")
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]


def test_close_gives_the_host_memory_back(llama5):
    """Packed streamed weights, the attached KV of GPU-attended layers, CPU-attended caches: all freed."""
    gc.collect()
    before = host_memory.host_bytes_in_use()
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False)
    model.generate(PROMPTS, max_new_tokens=2)
    held = host_memory.host_bytes_in_use() - before
    assert held >= model.engine.weights.streamed_bytes_per_cycle > 0
    model.close()
    gc.collect()
    assert host_memory.host_bytes_in_use() == before


def test_a_model_dropped_without_close_gives_its_memory_back(llama5):
    gc.collect()
    before = host_memory.host_bytes_in_use()
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False)
    model.generate(PROMPTS, max_new_tokens=2)
    thread_engine = model.engine.weights.prefetcher.copy_engine
    del model
    gc.collect()
    assert host_memory.host_bytes_in_use() == before
    assert not thread_engine.is_alive


def test_forward_computes_logits_a_workspace_at_a_time(llama5):
    """The workspace holds the logits of max_batch_size positions, or of a speculative decoding pass's
    MAX_VERIFY_TOKENS when more: forward() never asks the head for more."""
    from placement.workspace import MAX_VERIFY_TOKENS
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND, batch_size=2), progress=False)
    assert model.engine.max_logit_rows == max(model.max_batch_size, MAX_VERIFY_TOKENS) == 16
    head, sizes = model.engine.model.head, []

    def counting_head(w_norm, w_head, h):
        sizes.append(h.shape[0] * h.shape[1])
        return head(w_norm, w_head, h)

    model.engine.model.head = counting_head
    rows = [LONG, PROMPTS[2]]
    logits = model.forward(rows)
    assert logits.shape == (2, len(LONG), model.arch.vocab_size) and logits.device.type == "cpu"
    assert max(sizes) <= 16 and sum(sizes) == 2 * len(LONG) and len(sizes) > 1
    model.engine.model.head = head
    torch.testing.assert_close(logits, model.forward(rows), atol=0, rtol=0)   # the same numbers


def test_prefill_keeps_no_chunk_hidden_states_alive(llama5):
    """Only each row's last hidden state survives its chunk (a view would keep the whole [B, T, H])."""
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False)
    engine, chunks_h = model.engine, []
    run_layers, logits = engine.run_layers, engine.logits

    def recording_run_layers(*args, **kwargs):
        h = run_layers(*args, **kwargs)
        chunks_h.append(StorageWeakRef(h.untyped_storage()))          # the memory, not the Python object
        return h

    def checking_logits(h, **kwargs):
        assert all(ref.expired() for ref in chunks_h), "a chunk's hidden states are still alive"
        return logits(h, **kwargs)

    engine.run_layers, engine.logits = recording_run_layers, checking_logits
    assert model.generate(PROMPTS, max_new_tokens=1) == [r[:1] for r in reference(llama5)[1]]
    assert len(chunks_h) == -(-max(map(len, PROMPTS)) // model.engine.prefill_chunk_size) >= 2


def test_announced_head_skips_never_copy_a_held_layer_ahead_of_its_kv_write_back(llama5):
    """A streamed head with a CPU KV cache attended on the GPU and a ring deeper than the other streamed
    items: passing over the head of chunks without logits must not let the layer's next copy start
    before its new k/v are written back (a multi-chunk prompt, then decode)."""
    plan = layout_plan(llama5, weights="ggggg", kv="agggg", lm_head="cpu", prefetch_depth=2)
    model = offload.load(llama5, plan=plan, progress=False)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]
