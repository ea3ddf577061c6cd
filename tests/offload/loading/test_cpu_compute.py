"""Layers computed on the CPU where their weights lie (plan compute "cpu"): decode steps read the weights in
place (no copy through the ring) and attend on the CPU, prefill chunks still stream them; the tokens are
transformers' and the all-resident path's, in every family, quantized layout, ragged batch and session."""
from __future__ import annotations

import pytest
import torch

import offload
import placement
from placement import PlanError
from placement.plans import LayerPlan
from tests.offload.builders import hf_greedy
from tests.offload.loading.test_offload_parity import LONG, PROMPTS

NUM_NEW = 10


def _load(path, **kwargs):
    return offload.load(path, dtype="float32", max_batch_size=3, max_seq_len=48, prefill_chunk_size=5,
                        progress=False, **kwargs)


@pytest.mark.parametrize("variant", ["llama", "qwen2_tied", "mistral_window", "opt", "qwen3", "gemma2", "gemma3",
                                     "phi3_longrope", "mixtral_window", "qwen2_moe", "qwen3_moe"])
def test_cpu_computed_layers_decode_transformers_tokens(checkpoint_factory, variant):
    path, hf = checkpoint_factory(variant)
    model = _load(path, gpu_layers=1, kv_gpu_layers=1, cpu_compute=True)
    assert [l.compute for l in model.plan.layers][1:] == ["cpu"] * (model.arch.num_layers - 1)
    assert model.plan.layers[0].compute == "gpu"
    for prompt in PROMPTS[:2]:
        assert model.generate([prompt], max_new_tokens=NUM_NEW)[0] == hf_greedy(hf, prompt, NUM_NEW), prompt
    # ragged batch, then a prefill again (leaving decode restarts the ring's cycle): the same as one device
    resident = _load(path)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == resident.generate(PROMPTS, max_new_tokens=NUM_NEW)
    torch.testing.assert_close(model.forward([LONG]), resident.forward([LONG]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_decode_steps_copy_nothing_of_the_cpu_layers(llama5, quantize):
    streamed = _load(llama5, gpu_layers=2, kv_gpu_layers=2, cpu_compute=False, quantize=quantize)
    on_cpu = _load(llama5, gpu_layers=2, kv_gpu_layers=2, cpu_compute=True, quantize=quantize)
    want = streamed.generate(PROMPTS, max_new_tokens=NUM_NEW)
    on_cpu.engine.weights.reset_stats()
    assert on_cpu.generate(PROMPTS, max_new_tokens=NUM_NEW) == want
    layers = [l for l in on_cpu.plan.layers if l.compute == "cpu"]
    assert len(layers) == 3
    # prefill (chunks of 5 tokens) streams them; the decode steps copy only the LM head
    weights = on_cpu.engine.weights
    size = {item: weights.prefetcher.items[k].num_bytes for k, item in enumerate(weights.streamed_items)}
    num_chunks = -(-max(map(len, PROMPTS)) // 5)
    expected = num_chunks * sum(size[l.index] for l in layers) + NUM_NEW * size["lm_head"]
    assert weights.stats.bytes_copied == expected
    # again, after decode steps: leaving decode restarts the ring (its run-ahead copies for a next decode
    # step are dropped, at most one ring's worth), and the prefill's own skips of the head still hold
    weights.reset_stats()
    assert on_cpu.generate(PROMPTS, max_new_tokens=NUM_NEW) == want
    ring = weights.prefetch_depth * max(size.values())
    assert expected <= weights.stats.bytes_copied <= expected + ring


def test_a_session_keeps_its_cache_across_turns(llama5):
    resident = _load(llama5).session()
    on_cpu = _load(llama5, gpu_layers=1, kv_gpu_layers=0, cpu_compute=True).session()
    for turn in (PROMPTS[0], PROMPTS[1], PROMPTS[2]):
        assert on_cpu.generate(turn, max_new_tokens=6) == resident.generate(turn, max_new_tokens=6)


def test_plans_say_where_decode_runs(llama5):
    spec = placement.load_spec("llama-3.1-8b")
    hw = placement.Hardware.from_gpu_preset("rtx-4090", cpu_memory="64GiB", gpu_memory="8GiB")
    workload = placement.Workload(batch_size=1, prompt_len=512, gen_len=128)
    plans = {mode: placement.plan(spec, hw, workload, cpu_compute=mode) for mode in (False, None, True)}
    total = {mode: p.predicted.prefill_s + workload.gen_len / p.predicted.decode_tokens_per_s
             for mode, p in plans.items()}
    assert not any(l.compute == "cpu" for l in plans[False].layers)
    assert all(l.compute == "cpu" for l in plans[True].layers if (l.weights, l.kv, l.attention) == ("cpu",) * 3)
    # auto: some layers decode on the CPU while the others stream, and the whole workload is predicted faster
    assert 0 < sum(l.compute == "cpu" for l in plans[None].layers) and total[None] < min(total[False], total[True])
    assert "decode on" in plans[None].summary()
    again = placement.Plan.from_json(plans[None].to_json())
    assert [l.compute for l in again.layers] == [l.compute for l in plans[None].layers]
    with pytest.raises(PlanError, match="layer 3: computing on the cpu needs its weights, kv and attention on the cpu"):
        LayerPlan(index=3, weights="cpu", kv="gpu", attention="gpu", weight_bytes=1, kv_bytes=1, compute="cpu")
    with pytest.raises(ValueError, match="cpu_compute must be True, False or None, got 'yes'"):
        _load(llama5, gpu_layers=1, cpu_compute="yes")


def test_an_engine_refuses_cpu_layers_it_cannot_compute_there(llama5):
    """A cpu layer needs host attention and its weights kept in host memory (streamed)."""
    from offload.generation.engine import Engine
    model = _load(llama5, gpu_layers=2, kv_gpu_layers=0, cpu_compute=False)     # layers 0-1 resident, all KV cpu
    e = model.engine
    args = dict(arch=e.arch, model=e.model, weights=e.weights, backends=e.backends, device=e.device, dtype=e.dtype,
                max_seq_len=e.max_seq_len, max_batch_size=3)
    with pytest.raises(ValueError, match="layer 0 is computed on the cpu: its weights must be streamed"):
        Engine(**args, cpu_layers=[0])
    resident_kv = _load(llama5, gpu_layers=2, kv_gpu_layers=5, cpu_compute=False).engine
    with pytest.raises(ValueError, match="layer 3 is computed on the cpu: it needs host attention"):
        Engine(**{**args, "backends": resident_kv.backends}, cpu_layers=[3])
    assert Engine(**args, cpu_layers=[2, 3, 4]).cpu_layers == {2, 3, 4}


@pytest.mark.parametrize("variant", ["llama", "gemma2", "phi3", "qwen3_moe"])
def test_verification_passes_compute_the_cpu_layers_where_they_lie(checkpoint_factory, variant):
    """A speculative decoding pass runs as a decode step does: the layers computed on the CPU run there on all
    the pass's tokens (chains and trees), so a pass copies what a plain step copies (here the LM head), not the
    layers as a prefill chunk would; the tokens are plain greedy's (transformers')."""
    from tests.offload.generation.test_speculative import PROMPT, _drafts
    path, hf = checkpoint_factory(variant)
    model = _load(path, gpu_layers=1, kv_gpu_layers=1, cpu_compute=True)
    plain = model.generate([PROMPT], max_new_tokens=NUM_NEW)[0]
    assert plain == hf_greedy(hf, PROMPT, NUM_NEW)[:len(plain)]
    weights = model.engine.weights
    head = weights.prefetcher.items[weights.streamed_items.index("lm_head")].num_bytes
    for name in ("perfect", "every 3rd wrong", "tree"):
        assert model.generate([PROMPT], max_new_tokens=NUM_NEW, draft=_drafts(plain)[name],
                              speculate="always")[0] == plain, name
        stats = model.stats
        assert stats.num_verify_passes > 0
        # one LM head a pass or plain step: the decode tokens less the drafted ones kept
        assert stats.host_to_device_bytes - stats.prefill_host_to_device_bytes == \
            head * (stats.num_decode_tokens - stats.num_accepted_tokens), name
