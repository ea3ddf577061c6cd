"""offload.load with plans: a CLI plan file run exactly, budgets through the planner, manual overrides,
clear errors before any allocation, sessions and interrupted steps under offloaded plans, stats."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import offload
import placement
from offload.loading.memory import MemoryBudgetError
from placement import PlanError
from tests.offload.offload_plans import EVERY_BACKEND, assert_runs_plan, expected_step_bytes, layout_plan
from tests.offload.builders import DEEP_LAYERS
from tests.offload.loading.test_offload_parity import LONG, NUM_NEW, PROMPTS, reference

TURNS = [[5, 17, 99, 42, 8], [33, 4, 120], [9, 14, 77, 31, 50, 66, 101], [12, 45]]



def _hardware(gpu_memory, cpu_memory):
    """What offload.load plans for on this machine's default device (the CPU stands in without CUDA)."""
    if torch.cuda.is_available():
        return placement.Hardware.detect(gpu_memory=gpu_memory, cpu_memory=cpu_memory)
    return placement.Hardware.cpu_only(gpu_memory=gpu_memory, cpu_memory=cpu_memory)


def _cli_hardware(gpu_memory, cpu_memory):
    """What `offload-plan --gpu-memory` plans for: a GPU with those budgets (maybe not this machine's)."""
    return placement.Hardware.detect(gpu_memory=gpu_memory, cpu_memory=cpu_memory)


def _streaming_budget(path, workload, hardware=_hardware) -> int:
    """A GPU budget (bytes) for which the planner keeps some layers resident and streams others."""
    spec = placement.load_spec(path)
    full = placement.manual_plan(spec, workload)
    everything = full.memory.gpu.total + hardware(full.memory.gpu.total, "1GiB").cuda_reserve_bytes
    for fraction in (0.01, 0.05, 0.1, 0.2, 0.3, 0.5):
        budget = everything - int(fraction * full.memory.gpu.weights)
        try:
            plan = placement.plan(spec, hardware(budget, "1GiB"), workload)
        except PlanError:
            continue
        if any(l.weights == "cpu" for l in plan.layers):
            return budget
    raise AssertionError("no budget makes the planner stream")


def test_cli_json_plan_runs_exactly(llama5, tmp_path):
    workload = placement.Workload(batch_size=3, prompt_len=36, gen_len=12)
    budget = _streaming_budget(llama5, workload, _cli_hardware)
    plan_path = tmp_path / "plan.json"
    command = [shutil.which("offload-plan")] if shutil.which("offload-plan") else [sys.executable, "-m", "placement"]
    cli = [*command, str(llama5), "--gpu-memory", str(budget), "--cpu-memory", "1GiB",
           "--batch-size", "3", "--prompt-len", "36", "--gen-len", "12", "--json"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    plan_path.write_text(out.stdout)
    plan = placement.Plan.from_json(plan_path)
    assert any(l.weights == "cpu" for l in plan.layers)
    model = offload.load(llama5, plan=str(plan_path), progress=False)
    assert model.plan == plan and model.max_seq_len == 48 and model.max_batch_size == 3
    assert_runs_plan(model, plan)
    logits, tokens = reference(llama5)
    torch.testing.assert_close(model.forward([PROMPTS[0], PROMPTS[2]]),
                               offload.load(llama5, device="cpu", dtype="float32", max_batch_size=3,
                                            max_seq_len=48, progress=False).forward([PROMPTS[0], PROMPTS[2]]),
                               atol=1e-4, rtol=0)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == tokens
    assert "gpu tier" in model.memory_report() and model.plan.summary()


def test_plan_for_another_model_is_a_clear_error(llama5, checkpoint_factory, tmp_path):
    other, _ = checkpoint_factory("opt")
    plan = layout_plan(llama5, weights="ggggg", kv="ggggg")
    plan.to_json(tmp_path / "plan.json")
    with pytest.raises(PlanError, match="does not match the checkpoint.*num_layers 5"):
        offload.load(other, plan=tmp_path / "plan.json", progress=False)
    with pytest.raises(PlanError, match="cannot read plan"):
        offload.load(llama5, plan=tmp_path / "missing.json", progress=False)
    for bad in (dict(gpu_layers=2), dict(gpu_memory="1GiB"), dict(max_seq_len=64), dict(dtype="bfloat16"),
                dict(max_batch_size=1)):
        with pytest.raises(ValueError, match="plan"):
            offload.load(llama5, plan=plan, progress=False, **bad)
    offload.load(llama5, plan=plan, max_seq_len=48, max_batch_size=3, dtype="float32", progress=False)


def test_budgets_choose_the_plan_and_budget_too_small_fails_before_allocating(llama5, monkeypatch):
    workload = placement.Workload(batch_size=3, prompt_len=36, gen_len=12)
    budget = _streaming_budget(llama5, workload)
    model = offload.load(llama5, gpu_memory=budget, cpu_memory="1GiB", max_batch_size=3, max_seq_len=48,
                         progress=False)
    spec = placement.load_spec(llama5)
    want = placement.plan(spec, _hardware(budget, "1GiB"), workload)
    assert model.plan == want and model.plan.workload == workload      # gen_len = max_seq_len // 4
    assert_runs_plan(model, want)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]

    load_module = sys.modules["offload.loading.build"]

    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated weights for a plan that does not fit")

    monkeypatch.setattr(load_module, "PlacedWeights", no_allocation)
    with pytest.raises(PlanError, match="does not fit"):
        offload.load(llama5, gpu_memory="1KiB", cpu_memory="1KiB", progress=False)


def test_manual_overrides_build_a_manual_plan(llama5):
    model = offload.load(llama5, device="cpu", gpu_layers=2, kv_gpu_layers=1, cpu_attention=False,
                         max_batch_size=3, max_seq_len=48, prefill_chunk_size=5, progress=False)
    plan = model.plan
    assert [l.weights for l in plan.layers] == ["gpu"] * 2 + ["cpu"] * 3
    assert [(l.kv, l.attention) for l in plan.layers] == [("gpu", "gpu")] + [("cpu", "gpu")] * 4
    assert_runs_plan(model, plan)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]
    with pytest.raises(PlanError, match="gpu_layers"):
        offload.load(llama5, device="cpu", gpu_layers=9, progress=False)


def test_a_plan_that_understates_memory_is_refused_by_the_ledger(llama5):
    """Budgets are hard: a tampered plan (resident layers claimed at half their bytes) cannot make the
    runtime allocate past its total; the ledger refuses before the allocation."""
    import dataclasses
    plan = layout_plan(llama5, weights="ggggg", kv="ggggg")
    layers = tuple(dataclasses.replace(l, weight_bytes=l.weight_bytes // 2) for l in plan.layers)
    understated = dataclasses.replace(plan, layers=layers)
    assert understated.memory.gpu.total < plan.memory.gpu.total
    with pytest.raises(MemoryBudgetError, match="over its budget"):
        offload.load(llama5, plan=understated, progress=False)


def test_session_turns_equal_single_calls_under_an_offloaded_plan(llama5):
    plan = layout_plan(llama5, **EVERY_BACKEND, batch_size=1, max_seq_len=96)
    resident = offload.load(llama5, device="cpu", dtype="float32", max_seq_len=96, progress=False)
    conversation, want = [], []
    for turn in TURNS:
        conversation += turn
        want.append(resident.generate([conversation], max_new_tokens=6)[0])
        conversation += want[-1]
    model = offload.load(llama5, plan=plan, progress=False)
    session = model.session()
    assert [session.generate(turn, max_new_tokens=6) for turn in TURNS] == want
    assert model.stats.num_prompt_tokens == len(TURNS[-1]) + 1      # only the new tokens were prefilled


class Interrupt:
    """Raises `error` at the `at`-th layer computed (once): wraps the family's attention_output and the
    fused CPU decode step (which decode steps on the CPU run instead)."""

    def __init__(self, model, error, at):
        self.error, self.at, self.num_calls = error, at, 0
        engine = model.engine
        engine.model.attention_output = self._wrapped(engine.model.attention_output)
        if engine.cpu_steps is not None:
            engine.cpu_steps.step = self._wrapped(engine.cpu_steps.step)

    def _wrapped(self, inner):
        def call(*args):
            self.num_calls += 1
            if self.num_calls == self.at:
                raise self.error
            return inner(*args)
        return call


@pytest.mark.parametrize("error", [KeyboardInterrupt(), RuntimeError("boom")], ids=["ctrl_c", "exception"])
@pytest.mark.parametrize("at", [3, 2 * DEEP_LAYERS + 4])        # in prefill; in a decode step
def test_an_interrupted_streamed_step_leaves_the_model_usable(llama5, error, at):
    plan = layout_plan(llama5, **EVERY_BACKEND)
    model = offload.load(llama5, plan=plan, progress=False)
    Interrupt(model, error, at)
    with pytest.raises(type(error)):
        model.generate(PROMPTS, max_new_tokens=NUM_NEW)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]
    Interrupt(model, error, at)
    with pytest.raises(type(error)):
        model.forward([LONG])
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]
    session = model.session()
    Interrupt(model, error, at)
    with pytest.raises(type(error)):
        session.generate(TURNS[0], max_new_tokens=4)
    conversation = session.tokens + TURNS[1]
    got = session.generate(TURNS[1], max_new_tokens=4)
    assert got == model.generate([conversation], max_new_tokens=4)[0]


def test_a_stream_closed_mid_way_leaves_the_model_usable(llama5):
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False)
    stream = model.stream(PROMPTS[0], max_new_tokens=NUM_NEW)
    taken = [next(stream) for _ in range(3)]
    stream.close()
    assert taken == reference(llama5)[1][0][:3]
    abandoned = model.stream(PROMPTS[1], max_new_tokens=NUM_NEW)
    next(abandoned)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]
    abandoned.close()                        # a late close must not disturb the model either
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == reference(llama5)[1]


def test_stats_count_every_streamed_byte_and_no_head_copy_for_chunks_without_logits(llama5):
    plan = layout_plan(llama5, **EVERY_BACKEND)
    model = offload.load(llama5, plan=plan, progress=False)
    weights = model.engine.weights
    head_bytes = weights.prefetcher.items[weights.streamed_items.index("lm_head")].num_bytes
    was_issued = "lm_head" in weights.prefetcher.issued_items()     # copied ahead before the call began
    out = model.generate(PROMPTS, max_new_tokens=NUM_NEW)
    num_chunks = -(-max(map(len, PROMPTS)) // plan.prefill_chunk_size)
    num_cycles = num_chunks + max(map(len, out)) - 1            # prefill chunks + decode steps
    stats = model.stats
    # the ring is full at both ends of a call, so the copies issued during it are exactly its cycles, less
    # the head of every chunk but the last (no logits there), unless that copy was issued before the call
    num_skipped = num_chunks - 1 - was_issued
    assert num_chunks == 3 and num_skipped >= 1
    assert stats.host_to_device_bytes == num_cycles * weights.streamed_bytes_per_cycle - num_skipped * head_bytes
    assert weights.streamed_bytes_per_cycle == sum(
        l.weight_bytes * (l.weights == "cpu") + l.kv_bytes * (l.kv == "cpu" and l.attention == "gpu")
        for l in plan.layers) + plan.lm_head.read_bytes
    assert stats.prefill_seconds > 0 and stats.decode_tokens_per_second > 0
    assert stats.achieved_gb_per_second > 0 and stats.transfer_wait_seconds >= 0
    resident = offload.load(llama5, device="cpu", max_seq_len=48, max_batch_size=3, progress=False)
    resident.generate(PROMPTS, max_new_tokens=2)
    assert resident.stats.host_to_device_bytes == 0


def test_host_to_device_bytes_per_decode_step(llama5):
    """Each decode step copies the streamed items once, plus (on CUDA) each CPU-attended layer's output."""
    model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False)
    rows = [PROMPTS[0], PROMPTS[1]]
    bytes_of = {}
    for num_new in (1, 6):
        out = model.generate(rows, max_new_tokens=num_new)
        assert [len(r) for r in out] == [num_new, num_new]             # no early stop: num_new - 1 steps
        bytes_of[num_new] = model.stats.host_to_device_bytes
    assert bytes_of[6] - bytes_of[1] == 5 * expected_step_bytes(model, batch_size=2)


def test_load_logs_the_memory_report_and_the_cpu_tier_once(llama5, caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="offload"):
        model = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False)
    text = caplog.text
    assert "gpu tier (cpu)" in text and "cpu tier (host)" in text and "KV cache" in text
    report = model.memory_report()
    assert report.splitlines()[0].split() == ["weights", "KV", "cache", "buffers", "workspace", "total",
                                              "budget", "free"]


def test_final_norm_off_the_gpu_tier_is_refused(llama5):
    import dataclasses
    plan = layout_plan(llama5, **EVERY_BACKEND)
    cpu_bytes = plan.budget.cpu_bytes + plan.final_norm.weight_bytes
    moved = dataclasses.replace(plan, final_norm=dataclasses.replace(plan.final_norm, weights="cpu"),
                                budget=placement.Budget(gpu_bytes=plan.budget.gpu_bytes, cpu_bytes=cpu_bytes))
    with pytest.raises(PlanError, match="final_norm"):
        offload.load(llama5, plan=moved, progress=False)


def test_both_head_items_streamed_at_depth_one_is_refused_not_deadlocked(llama5):
    from offload.loading.checkpoint import Checkpoint
    from offload.generation.engine import Engine
    from offload.attention.device import TorchAttention
    from offload.loading.build import _read_items
    from offload.models import build_model
    from offload.weights.placed import PlacedWeights
    ckpt = Checkpoint(llama5)
    tiers = {"embedding": "gpu", **dict.fromkeys(range(DEEP_LAYERS), "gpu"), "final_norm": "cpu", "lm_head": "cpu"}
    weights = PlacedWeights(_read_items(ckpt, tiers, torch.float32, False), placement=tiers,
                            dtype=torch.float32, device="cpu", prefetch_depth=1)
    model = build_model(ckpt.arch, "cpu")
    backends = [TorchAttention.for_layer(ckpt.arch, i, scale=None, max_batch_size=1, max_seq_len=8,
                                         dtype=torch.float32, device="cpu") for i in range(DEEP_LAYERS)]
    with pytest.raises(ValueError, match="depth >= 2"):
        Engine(arch=ckpt.arch, model=model, weights=weights, backends=backends, device="cpu",
               dtype=torch.float32, max_seq_len=8, max_batch_size=1)


def test_close_frees_everything_and_later_calls_fail_clearly(llama5):
    with offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND), progress=False) as model:
        model.generate(PROMPTS, max_new_tokens=2)
        assert model.ledger.current_bytes() == model.plan.memory.gpu.total - model.plan.memory.gpu.buffers \
            + model.engine.weights.ring_bytes
    assert model.ledger.current_bytes() == 0 and model.engine.weights.ring_bytes == 0
    model.close()                                                       # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        model.generate(PROMPTS, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="closed"):
        model.session().generate(TURNS[0], max_new_tokens=2)
