"""Routed experts kept on the CPU (plan experts "cpu", llama.cpp's --cpu-moe): decode steps compute them where
they lie (no copy), prefill chunks stream them through the ring; the tokens are transformers' and the
all-resident path's in every MoE family, with resident or streamed layers, CPU-computed layers, quantized
experts, ragged batches and sessions; the planner places them and says so."""
from __future__ import annotations

import pytest
import torch

import offload
import placement
from placement import PlanError
from placement.plans import LayerPlan
from tests.offload.builders import hf_greedy, hf_logits
from tests.offload.loading.test_offload_parity import LONG, PROMPTS

NUM_NEW = 8
MOE = ["mixtral_window", "qwen2_moe", "qwen3_moe"]


def _load(path, **kwargs):
    return offload.load(path, dtype="float32", max_batch_size=3, max_seq_len=48, prefill_chunk_size=5,
                        progress=False, **kwargs)


@pytest.mark.parametrize("placement_", ["cpu", "streamed"])
@pytest.mark.parametrize("variant", MOE)
def test_experts_kept_in_ram_decode_transformers_tokens(checkpoint_factory, variant, placement_):
    """Computed where they lie ("cpu") or the routed ones copied to the device each step ("streamed")."""
    path, hf = checkpoint_factory(variant)
    model = _load(path, experts=placement_)
    arch = model.arch
    assert [l.experts == placement_ for l in model.plan.layers] == [i in arch.moe_layers
                                                                   for i in range(arch.num_layers)]
    engine = model.engine
    assert {"cpu": engine.cpu_experts, "streamed": engine.streamed_experts}[placement_] == frozenset(arch.moe_layers)
    assert engine.experts_apart == frozenset(arch.moe_layers)
    torch.testing.assert_close(model.forward([LONG])[0], hf_logits(hf, LONG), atol=1e-4, rtol=0)
    for prompt in PROMPTS[:2]:
        assert model.generate([prompt], max_new_tokens=NUM_NEW)[0] == hf_greedy(hf, prompt, NUM_NEW), prompt
    resident = _load(path)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == resident.generate(PROMPTS, max_new_tokens=NUM_NEW)


@pytest.mark.parametrize("layout", ["streamed_layers", "cpu_computed_layers", "int4", "int8"])
def test_cpu_experts_in_every_layout(checkpoint_factory, layout):
    path, _ = checkpoint_factory("qwen2_moe")
    kwargs = {"streamed_layers": dict(gpu_layers=1, kv_gpu_layers=3),
              "cpu_computed_layers": dict(gpu_layers=1, kv_gpu_layers=1, cpu_compute=True),
              "int4": dict(quantize="int4"), "int8": dict(quantize="int8")}[layout]
    model = _load(path, experts="cpu", **kwargs)
    reference = _load(path, experts="gpu", **kwargs)
    assert model.plan.prefetch_depth >= 2
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference.generate(PROMPTS, max_new_tokens=NUM_NEW)
    torch.testing.assert_close(model.forward([LONG]), reference.forward([LONG]), atol=1e-5, rtol=0)
    # a session's turns: decode, prefill again (leaving decode restarts the ring), decode
    ours, theirs = model.session(), reference.session()
    for turn in PROMPTS:
        assert ours.generate(turn, max_new_tokens=4) == theirs.generate(turn, max_new_tokens=4)


@pytest.mark.parametrize("placement_", ["cpu", "streamed"])
def test_short_chunks_take_the_experts_on_the_side_and_long_ones_stream_them(checkpoint_factory, placement_):
    """Decode steps and prefill chunks of fewer than 32 tokens (EXPERTS_STREAM_MIN_TOKENS, llama.cpp's batch
    size for copying weights) take the experts where they lie, or fetch the routed ones: nothing goes through the
    ring once the turns are announced; a chunk of 32+ tokens streams every experts item; the tokens stay the
    all-resident path's either way."""
    path, _ = checkpoint_factory("qwen3_moe")
    model = offload.load(path, dtype="float32", max_batch_size=3, max_seq_len=48, prefill_chunk_size=16,
                         progress=False, experts=placement_)
    reference = _load(path)
    weights = model.engine.weights
    size = {item: weights.prefetcher.items[k].num_bytes for k, item in enumerate(weights.streamed_items)}
    assert set(size) == {("experts", i) for i in model.arch.moe_layers}
    short = [PROMPTS[0], PROMPTS[1]]                      # 2 rows x up to 9 tokens: 18 < 32
    want = reference.generate(short, max_new_tokens=NUM_NEW)
    assert model.generate(short, max_new_tokens=NUM_NEW) == want     # (the ring's first copies: issued at load)
    weights.reset_stats()
    assert model.generate(short, max_new_tokens=NUM_NEW) == want
    assert weights.stats.bytes_copied == 0
    # 3 rows x 16 tokens: the first chunk streams every experts item, the last (3 x 14) too
    long = [LONG, LONG[3:], LONG[:20]]
    assert model.generate(long, max_new_tokens=4) == reference.generate(long, max_new_tokens=4)
    assert weights.stats.bytes_copied >= 2 * sum(size.values())


def test_the_cpu_experts_plan(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3_moe")
    model = _load(path, experts="cpu")                    # every layer resident, its experts on the CPU
    # the plan: the experts' bytes in RAM, none on the GPU but the ring they stream through in prefill
    plan = model.plan
    experts = sum(l.expert_bytes for l in plan.layers)
    assert plan.memory.cpu.weights == experts and plan.slot_bytes == max(l.expert_bytes for l in plan.layers)
    assert plan.memory.gpu.weights == model.engine.weights.resident_bytes
    assert model.engine.weights.ring_bytes == plan.memory.gpu.buffers


def test_plans_place_experts_and_say_so(checkpoint_factory):
    spec = placement.load_spec("qwen3-30b-a3b", quantization="int4")
    hw = placement.Hardware.from_gpu_preset("rtx-3060", cpu_memory="32GiB")
    workload = placement.Workload(batch_size=1, prompt_len=2048, gen_len=512)
    plans = {mode: placement.plan(spec, hw, workload, experts=mode) for mode in ("gpu", "cpu", "streamed", None)}
    total = {mode: p.predicted.prefill_s + workload.gen_len / p.predicted.decode_tokens_per_s
             for mode, p in plans.items()}
    assert all(l.experts == "gpu" for l in plans["gpu"].layers)
    assert all(l.experts == "cpu" for l in plans["cpu"].layers) and plans["cpu"].num_gpu_layers == 48
    # auto: every layer's attention resident, the experts of as many first layers as fit back on the GPU, the
    # others' kept apart in RAM (computed there or streamed on demand: whichever predicts faster)
    apart = [l.experts != "gpu" for l in plans[None].layers]
    assert plans[None].num_gpu_layers == 48 and 0 < sum(apart) < 48 and apart == sorted(apart)
    assert len({l.experts for l in plans[None].layers}) == 2
    assert total[None] < min(total["gpu"], total["cpu"], total["streamed"])
    assert "experts" in plans["cpu"].summary()
    assert placement.Plan.from_json(plans["cpu"].to_json()) == plans["cpu"]
    assert plans["cpu"].memory.cpu.weights == sum(l.expert_bytes for l in plans["cpu"].layers if l.experts == "cpu")
    with pytest.raises(PlanError, match="layer 2 has no routed experts to place cpu"):
        LayerPlan(index=2, weights="gpu", kv="gpu", attention="gpu", weight_bytes=10, kv_bytes=1, experts="cpu")
    with pytest.raises(PlanError, match="experts must be one of gpu, cpu"):
        placement.plan(spec, hw, workload, experts="disk")


def test_bad_experts_arguments_are_clear(checkpoint_factory, llama5):
    path, _ = checkpoint_factory("qwen3_moe")
    with pytest.raises(ValueError, match="experts must be one of 'gpu', 'cpu', 'streamed' or None"):
        _load(path, experts="on-disk")
    with pytest.raises(ValueError, match="llama has none"):
        _load(llama5, experts="cpu")
    plan = _load(path, experts="cpu").plan
    with pytest.raises(ValueError, match="drop experts"):
        _load(path, plan=plan, experts="gpu")
    assert _load(path, plan=plan).engine.cpu_experts == frozenset(plan_layers_with_cpu_experts(plan))


def plan_layers_with_cpu_experts(plan) -> list[int]:
    return [l.index for l in plan.layers if l.experts == "cpu"]


def test_engine_and_plan_refuse_cpu_experts_they_cannot_run(checkpoint_factory):
    """CPU experts must be an item of their own in host memory; a streamed layer with CPU experts holds two ring
    slots in prefill."""
    from offload.generation.engine import Engine
    path, _ = checkpoint_factory("qwen3_moe")
    e = _load(path).engine                                  # experts with their (resident) layers
    with pytest.raises(ValueError, match="layer 0's experts are kept in CPU RAM: they must be streamed"):
        Engine(arch=e.arch, model=e.model, weights=e.weights, backends=e.backends, device=e.device, dtype=e.dtype,
               max_seq_len=e.max_seq_len, max_batch_size=3, cpu_experts=[0])
    spec = placement.load_spec(path)
    workload = placement.Workload(batch_size=1, prompt_len=16, gen_len=8)
    with pytest.raises(PlanError, match="two ring slots at once need prefetch_depth >= 2, got 1"):
        placement.manual_plan(spec, workload, gpu_layers=1, experts="cpu", prefetch_depth=1)
    assert placement.manual_plan(spec, workload, gpu_layers=1, experts="cpu").prefetch_depth == 2
