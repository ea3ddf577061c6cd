"""Routed experts streamed on demand (plan experts "streamed"): in RAM like CPU experts, but a decode step copies
only the experts its router picked to the device (one copy each, into the plan's expert slots) and computes
them there; prefill chunks stream them whole. The tokens are the all-resident path's with resident or streamed
layers, quantized experts, ragged batches, sessions, and transformers' with experts placed gpu / cpu / streamed
layer by layer in one plan (every MoE family against transformers: test_cpu_experts.py); the bytes copied are
exactly the routed experts'."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import placement
from placement import PlanError
from placement.build import assemble
from placement.manual import REFERENCE_HARDWARE
from placement.plans import LayerPlan
from tests.offload.builders import build_checkpoint, hf_greedy, hf_logits
from tests.offload.loading.test_cpu_experts import NUM_NEW, _load
from tests.offload.loading.test_offload_parity import LONG, PROMPTS


@pytest.mark.parametrize("layout", ["streamed_layers", "host_kv", "int4", "int8"])
def test_streamed_experts_in_every_layout(checkpoint_factory, layout):
    path, _ = checkpoint_factory("qwen2_moe")
    kwargs = {"streamed_layers": dict(gpu_layers=1, kv_gpu_layers=3), "host_kv": dict(gpu_layers=1, kv_gpu_layers=0),
              "int4": dict(quantize="int4"), "int8": dict(quantize="int8")}[layout]
    model = _load(path, experts="streamed", **kwargs)
    reference = _load(path, experts="gpu", **kwargs)
    assert model.plan.expert_slots == 6                   # min(8 experts, top-2 x 3 rows)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference.generate(PROMPTS, max_new_tokens=NUM_NEW)
    torch.testing.assert_close(model.forward([LONG]), reference.forward([LONG]), atol=1e-5, rtol=0)
    ours, theirs = model.session(), reference.session()   # decode, prefill again, decode
    for turn in PROMPTS:
        assert ours.generate(turn, max_new_tokens=4) == theirs.generate(turn, max_new_tokens=4)


def test_experts_placed_layer_by_layer(tmp_path):
    """One plan with layer 0's experts on the GPU, layer 1's on the CPU and layer 2's streamed on demand (and the
    layers' own weights resident, streamed, computed on the CPU)."""
    path = tmp_path
    hf = build_checkpoint(path, "mixtral_window", num_hidden_layers=3)
    base = _load(path, gpu_layers=1, kv_gpu_layers=1, experts="gpu").plan
    spec = placement.load_spec(path, dtype="float32")
    layers = list(base.layers)
    layers[1] = dataclasses.replace(layers[1], experts="cpu", compute="cpu")
    layers[2] = dataclasses.replace(layers[2], experts="streamed")
    assert layers[0].weights == "gpu" and layers[2].weights == "cpu"
    mixed = assemble(spec, base.workload, REFERENCE_HARDWARE,
                     layers=tuple(layers), embedding=base.embedding.weights, lm_head=base.lm_head.weights,
                     prefetch_depth=2, chunk=base.prefill_chunk_size)
    model = _load(path, plan=mixed)
    engine = model.engine
    assert (engine.cpu_experts, engine.streamed_experts, engine.cpu_layers) == ({1}, {2}, {1})
    torch.testing.assert_close(model.forward([LONG])[0], hf_logits(hf, LONG), atol=1e-4, rtol=0)
    for prompt in PROMPTS[:2]:
        assert model.generate([prompt], max_new_tokens=NUM_NEW)[0] == hf_greedy(hf, prompt, NUM_NEW), prompt
    resident = _load(path)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == resident.generate(PROMPTS, max_new_tokens=NUM_NEW)
    assert model.ledger.peak_total_bytes <= mixed.memory.gpu.total


def test_verification_passes_fetch_routed_experts_while_they_fit_the_slots(tmp_path):
    """Speculative decoding over a mixed plan (experts gpu / cpu / streamed by layer): a pass whose tokens may
    hit more experts than the slots hold (sized for a decode step) streams that layer's experts whole, a short
    one fetches the routed ones; the tokens are plain greedy's either way."""
    from tests.offload.generation.test_speculative import PROMPT, ScriptedDraft
    path = tmp_path
    build_checkpoint(path, "mixtral_window", num_hidden_layers=3, num_local_experts=8)
    base = _load(path, gpu_layers=1, kv_gpu_layers=1, experts="gpu").plan
    layers = list(base.layers)
    layers[1] = dataclasses.replace(layers[1], experts="cpu", compute="cpu")
    layers[2] = dataclasses.replace(layers[2], experts="streamed")
    mixed = assemble(placement.load_spec(path, dtype="float32"), base.workload, REFERENCE_HARDWARE,
                     layers=tuple(layers), embedding=base.embedding.weights, lm_head=base.lm_head.weights,
                     prefetch_depth=2, chunk=base.prefill_chunk_size)
    model = _load(path, plan=mixed)
    assert model.engine.expert_stager.num_slots == 6     # top-2 x 3 rows, of 8
    fetched, engine = [], model.engine
    fetch = engine._fetch[2]
    engine._fetch[2] = lambda experts: fetched.append(len(experts)) or fetch(experts)
    plain = model.generate([PROMPT], max_new_tokens=24)[0]
    for draft_tokens in (1, 12):                          # passes of 2 tokens (4 experts at most) and of 13
        fetched.clear()
        got = model.generate([PROMPT], max_new_tokens=24, draft=ScriptedDraft(PROMPT, plain),
                             draft_tokens=draft_tokens, speculate="always")[0]
        assert got == plain and model.stats.num_verify_passes > 0, draft_tokens
        assert fetched and max(fetched) <= 6             # (a pass of 13 tokens streams the layer's experts)
    assert model.stats.num_accepted_tokens >= 12            # (a pass of 13 tokens was made)


def test_decode_steps_copy_only_the_routed_experts(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3_moe")
    model = _load(path, experts="streamed")                 # layers resident, experts streamed on demand
    arch, engine, plan = model.arch, model.engine, model.plan
    stager, weights = engine.expert_stager, engine.weights
    expert = plan.expert_slot_bytes
    assert expert == placement.load_spec(path, dtype="float32").routed_expert_bytes(0)
    assert stager.device_bytes == plan.expert_buffer_bytes == plan.expert_slots * expert
    assert plan.expert_slots == min(arch.num_experts, arch.num_experts_per_tok * 3)
    assert weights.ring_bytes + stager.device_bytes == plan.memory.gpu.buffers
    assert plan.memory.cpu.weights == sum(l.expert_bytes for l in plan.layers)
    # one row: every decode step copies exactly top-k distinct experts per MoE layer, nothing through the ring
    engine.prefill([PROMPTS[0]], [0])
    weights.reset_stats()
    copied = stager.bytes_copied
    length = len(PROMPTS[0])
    for step in range(5):
        engine.decode([7 + step], [length + step])
    per_step = len(arch.moe_layers) * arch.num_experts_per_tok * expert
    assert stager.bytes_copied - copied == 5 * per_step
    assert weights.stats.bytes_copied == 0
    assert model.ledger.peak_total_bytes <= plan.memory.gpu.total
    model.close()
    assert model.ledger.current_bytes() == 0


def test_planner_streams_experts_and_says_so(tmp_path):
    spec = placement.load_spec("qwen3-30b-a3b", quantization="int4")
    hw = placement.Hardware.from_gpu_preset("rtx-3060", cpu_memory="32GiB")
    workload = placement.Workload(batch_size=2, prompt_len=2048, gen_len=512)
    streamed = placement.plan(spec, hw, workload, experts="streamed")
    assert all(l.experts == "streamed" for l in streamed.layers) and streamed.num_gpu_layers == 48
    one = spec.routed_expert_bytes(0)
    assert (streamed.expert_slots, streamed.expert_slot_bytes) == (16, one)            # top-8 x 2 rows
    assert streamed.memory.gpu.buffers == streamed.prefetch_depth * streamed.slot_bytes + 16 * one
    assert placement.Plan.from_json(streamed.to_json()) == streamed
    assert "experts 16 x" in streamed.summary() and "streamed" in streamed.summary()
    # the cost of a decode step: the routed experts' copies on PCIe and on the layer's critical path
    cost = placement.cost.CostModel(spec, hw, workload)
    e = spec.layer_expert_bytes(0)
    w = spec.layer_weight_bytes(0)
    on_gpu, on_demand = cost.decode_layer("gpu", "gpu", "gpu", w, e, "gpu"), cost.decode_layer("gpu", "gpu", "gpu", w, e,
                                                                                             "streamed")
    hit = e * spec.expert_hit_fraction(2)
    assert on_demand.transfer_s == pytest.approx(hit / hw.pcie_bytes_per_s)
    assert on_demand.gpu_s == pytest.approx(on_gpu.gpu_s + cost.streamed_experts_s(e, 2))
    # which of cpu and streamed wins is the CPU's speed against PCIe: a fast CPU computes the experts
    def auto(cpu_bytes_per_s):
        fast = dataclasses.replace(hw, cpu_attention_bytes_per_s=cpu_bytes_per_s, cpu_flops=1e12)
        return {l.experts for l in placement.plan(spec, fast, workload).layers} - {"gpu"}
    assert auto(4 * hw.pcie_bytes_per_s) == {"cpu"} and auto(hw.pcie_bytes_per_s / 4) == {"streamed"}
    out = subprocess.run([sys.executable, "-m", "placement", "qwen3-30b-a3b", "--quantize", "int4", "--gpu", "rtx-3060",
                          "--cpu-memory", "32GiB", "--experts", "streamed", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert {l["experts"] for l in json.loads(out.stdout)["layers"]} == {"streamed"}


def test_streamed_experts_refused_where_they_cannot_run(checkpoint_factory):
    path, _ = checkpoint_factory("qwen3_moe")
    with pytest.raises(PlanError, match="computed on the cpu: its experts cannot stream"):
        LayerPlan(index=0, weights="cpu", kv="cpu", attention="cpu", compute="cpu", weight_bytes=10, kv_bytes=1,
                  expert_bytes=4, experts="streamed")
    with pytest.raises(PlanError, match="experts must be one of gpu, cpu, streamed"):
        LayerPlan(index=0, weights="gpu", kv="gpu", attention="gpu", weight_bytes=10, kv_bytes=1, expert_bytes=4,
                  experts="disk")
    plan = _load(path, experts="streamed").plan
    with pytest.raises(PlanError, match="need expert_slots >= 1"):
        placement.Plan.from_dict({**plan.to_dict(), "expert_slots": 0})
    small = placement.Plan.from_dict({**plan.to_dict(), "expert_slot_bytes": plan.expert_slot_bytes - 4})
    with pytest.raises(PlanError, match="expert slots .* cannot hold one routed expert"):
        _load(path, plan=small)
    with pytest.raises(PlanError, match="and only they do"):
        placement.Plan.from_dict({**_load(path).plan.to_dict(), "expert_slots": 2, "expert_slot_bytes": 8})
    # cpu_compute=True with streamed experts: no layer may decode on the CPU, the rest is as asked
    model = _load(path, experts="streamed", gpu_layers=0, kv_gpu_layers=0, cpu_compute=True)
    assert not model.engine.cpu_layers and model.engine.streamed_experts == frozenset(model.arch.moe_layers)
    with pytest.raises(ValueError, match="experts must be one of 'gpu', 'cpu', 'streamed' or None"):
        _load(path, experts="disk")
