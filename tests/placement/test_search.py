"""The planner: budgets respected across a sweep, exact byte accounting, monotone in GPU memory."""
import dataclasses

import pytest

from placement import Hardware, PlanError, Workload, load_spec, plan, workspace_bytes
from placement.hardware import GPU_PRESETS, HardwareError

GiB = 1 << 30
MODELS = ["llama-3.1-8b", "llama-2-70b", "qwen2.5-0.5b", "opt-350m", "mistral-nemo-12b"]
WORKLOADS = [Workload(batch_size=1, prompt_len=512, gen_len=128),
             Workload(batch_size=4, prompt_len=2048, gen_len=512),
             Workload(batch_size=32, prompt_len=1024, gen_len=256)]


def hardware(gpu_gib: float, cpu_gib: float, gpu="rtx-4090") -> Hardware:
    return Hardware.from_gpu_preset(gpu, cpu_memory=int(cpu_gib * GiB), gpu_memory=int(gpu_gib * GiB))


def total_seconds(p) -> float:
    """Predicted time of the whole workload: what the planner minimises."""
    return p.predicted.prefill_s + p.workload.gen_len * p.workload.batch_size / p.predicted.decode_tokens_per_s


def check_accounting(p, spec, hw, workload):
    """Recompute the plan's memory from the spec independently of Plan.memory."""
    L = spec.num_layers
    kv = workload.batch_size * (workload.prompt_len + workload.gen_len) * spec.kv_bytes_per_token
    assert [l.index for l in p.layers] == list(range(L))
    assert all(l.kv_bytes == kv for l in p.layers)
    assert all(l.weight_bytes == spec.layer_weight_bytes(l.index) for l in p.layers)
    assert all(l.attention == "gpu" for l in p.layers if l.kv == "gpu")
    items = {"embedding": (p.embedding, spec.embedding_bytes), "final_norm": (p.final_norm, spec.final_norm_bytes),
             "lm_head": (p.lm_head, spec.lm_head_bytes)}
    for item, size in items.values():
        assert item.weight_bytes == size
    gpu_w = sum(l.weight_bytes for l in p.layers if l.weights == "gpu") + \
        sum(size for item, size in items.values() if item.weights == "gpu")
    cpu_w = sum(l.weight_bytes for l in p.layers if l.weights == "cpu") + \
        sum(size for item, size in items.values() if item.weights == "cpu")
    assert gpu_w + cpu_w == spec.total_weight_bytes
    assert (p.memory.gpu.weights, p.memory.cpu.weights) == (gpu_w, cpu_w)
    assert p.memory.gpu.kv_cache == kv * sum(l.kv == "gpu" for l in p.layers)
    assert p.memory.cpu.kv_cache == kv * sum(l.kv == "cpu" for l in p.layers)
    ring = [l.weight_bytes * (l.weights == "cpu") + kv * (l.kv == "cpu" and l.attention == "gpu")
            for l in p.layers]
    if p.lm_head.weights == "cpu":
        ring.append(spec.lm_head_read_bytes)
    assert p.slot_bytes == max(ring)
    assert (p.prefetch_depth >= 1) == (max(ring) > 0)
    assert p.memory.gpu.buffers == p.prefetch_depth * p.slot_bytes
    assert p.workspace_bytes == workspace_bytes(spec.arch, workload.batch_size, p.prefill_chunk_size,
                                                workload.max_seq_len, spec.dtype)
    assert 1 <= p.prefill_chunk_size <= workload.prompt_len
    gpu_total = gpu_w + p.memory.gpu.kv_cache + p.memory.gpu.buffers + p.workspace_bytes
    assert gpu_total == p.memory.gpu.total
    assert gpu_total + p.cuda_reserve_bytes <= hw.gpu_bytes
    assert p.memory.cpu.total <= hw.cpu_bytes
    if spec.arch.tie_word_embeddings:
        assert p.lm_head.weights == p.embedding.weights and p.lm_head.weight_bytes == 0
    assert p.max_seq_len == workload.max_seq_len and p.max_batch_size == workload.batch_size
    assert p.predicted.bottleneck in ("pcie", "gpu", "cpu")
    assert p.predicted.prefill_s > 0 and p.predicted.decode_tokens_per_s > 0


@pytest.mark.parametrize("name", MODELS)
def test_budgets_respected_across_a_sweep(name):
    spec = load_spec(name)
    num_plans = 0
    for workload in WORKLOADS:
        for gpu_gib in (1, 3, 6, 8, 12, 24, 48, 160):
            for cpu_gib in (4, 32, 256):
                hw = hardware(gpu_gib, cpu_gib)
                try:
                    p = plan(spec, hw, workload)
                except PlanError as e:
                    assert "does not fit" in str(e) and "short" in str(e)
                    continue
                num_plans += 1
                check_accounting(p, spec, hw, workload)
    assert num_plans > 10


@pytest.mark.parametrize("name, workload, gpu", [
    ("llama-3.1-8b", Workload(batch_size=1, prompt_len=2048, gen_len=512), "rtx-4070"),
    ("llama-2-70b", Workload(batch_size=1, prompt_len=1024, gen_len=256), "rtx-4090"),
    ("qwen2.5-0.5b", Workload(batch_size=64, prompt_len=4096, gen_len=1024), "rtx-3060"),
    ("opt-350m", Workload(batch_size=8, prompt_len=512, gen_len=64), "t4"),
    ("mistral-7b-v0.1", Workload(batch_size=16, prompt_len=8192, gen_len=512), "rtx-3090"),
])
def test_more_gpu_memory_never_predicts_less_throughput(name, workload, gpu):
    spec = load_spec(name)
    previous, fitted = None, False
    for step in range(1, 161):
        hw = hardware(step * 0.5, 512, gpu)
        try:
            p = plan(spec, hw, workload)
        except PlanError:
            assert not fitted, f"fitted before but not at {step * 0.5} GiB"
            continue
        fitted = True
        seconds = total_seconds(p)
        if previous is not None:
            assert seconds <= previous * (1 + 1e-9), f"slower at {step * 0.5} GiB"
        previous = seconds
    assert fitted


def test_everything_resident_when_it_fits():
    spec = load_spec("llama-3.1-8b")
    p = plan(spec, hardware(80, 64), Workload(batch_size=1, prompt_len=1024, gen_len=128))
    assert all(l.weights == l.kv == l.attention == "gpu" for l in p.layers)
    assert (p.embedding.weights, p.final_norm.weights, p.lm_head.weights) == ("gpu", "gpu", "gpu")
    assert p.prefetch_depth == 0 and p.slot_bytes == 0
    assert p.prefill_chunk_size == 1024
    assert p.memory.cpu.total == 0
    assert p.predicted.bottleneck == "gpu"


def test_small_gpu_streams_and_is_pcie_bound():
    spec = load_spec("llama-2-70b")
    workload = Workload(batch_size=1, prompt_len=512, gen_len=128)
    p = plan(spec, hardware(24, 192), workload, cpu_compute=False)
    assert 0 < p.num_gpu_layers < spec.num_layers
    assert p.prefetch_depth >= 1
    assert p.predicted.bottleneck == "pcie"
    # decode cannot beat streaming the CPU-resident weights once per token over PCIe
    streamed = p.memory.cpu.weights - (p.embedding.weight_bytes if p.embedding.weights == "cpu" else 0)
    assert p.predicted.decode_tokens_per_s <= GPU_PRESETS["rtx-4090"].pcie_bytes_per_s / streamed
    # computing some of those layers on the CPU where they lie takes their copies off PCIe: faster
    auto = plan(spec, hardware(24, 192), workload)
    assert any(l.compute == "cpu" for l in auto.layers)
    assert auto.predicted.decode_tokens_per_s > p.predicted.decode_tokens_per_s


def test_long_contexts_move_kv_to_the_cpu():
    spec = load_spec("llama-3.1-8b")
    p = plan(spec, hardware(24, 256), Workload(batch_size=32, prompt_len=8192, gen_len=512))
    assert any(l.kv == "cpu" for l in p.layers)
    check_accounting(p, spec, hardware(24, 256), p.workload)


def test_cpu_only_hardware_has_no_cuda_reserve():
    hw = Hardware(gpu_bytes=2 * GiB, cpu_bytes=4 * GiB, pcie_bytes_per_s=10e9, gpu_flops=200e9,
                  gpu_mem_bytes_per_s=20e9, cpu_attention_bytes_per_s=20e9, cpu_flops=200e9,
                  is_cpu_only=True, name="cpu")
    p = plan(load_spec("qwen2.5-0.5b"), hw, Workload(batch_size=1, prompt_len=128, gen_len=16))
    assert p.cuda_reserve_bytes == 0


def test_no_fit_error_says_what_is_needed():
    spec = load_spec("llama-2-70b")
    with pytest.raises(PlanError) as info:
        plan(spec, hardware(8, 16), Workload(batch_size=1, prompt_len=512, gen_len=128))
    message = str(info.value)
    assert "llama-2-70b does not fit" in message and "128.48 GiB" in message
    assert "short" in message and "GPU + CPU together" in message
    with pytest.raises(PlanError, match="the GPU budget by"):
        plan(spec, hardware(0.5, 512), Workload(batch_size=1, prompt_len=512, gen_len=128))


def test_plans_an_80_layer_model():
    # speed is for benchmarks/, not a timing assertion: this just exercises the largest search
    for name in ("llama-2-70b", "qwen2.5-72b", "llama-3.1-70b"):
        spec = load_spec(name)
        for gpu_gib in (12, 24, 48):
            hw = hardware(gpu_gib, 256)
            p = plan(spec, hw, Workload(batch_size=4, prompt_len=4096, gen_len=1024))
            check_accounting(p, spec, hw, p.workload)


def test_cpu_decode_costs_follow_the_measured_rate_and_overhead_of_the_matrix_kind():
    """A layer decoded on the CPU costs its weight bytes at the rate measured for its kind of matrix (dense,
    int8, int4: --profile) plus that kind's layer overhead; kinds not measured are estimated."""
    from placement.cost import CostModel
    spec = load_spec("qwen2.5-0.5b")
    workload = Workload(batch_size=1, prompt_len=128, gen_len=16)
    measured = dataclasses.replace(hardware(24, 64), cpu_matmul_rates=(("dense", 4e9), ("int4", 1e9)),
                                   cpu_layer_overheads=(("dense", 2e-3), ("int4", 5e-3)))
    small, large = 64 << 20, 128 << 20          # both read slower than the layer's FLOPs take
    dense = CostModel(spec, measured, workload)
    assert dense.cpu_matmul_kind == "dense"
    assert dense.decode_layer_on_cpu(large).cpu_s - dense.decode_layer_on_cpu(small).cpu_s \
        == pytest.approx((large - small) / 4e9, rel=1e-6)
    int4 = CostModel(spec.quantized("int4"), measured, workload)
    assert int4.cpu_matmul_kind == "int4"
    assert int4.decode_layer_on_cpu(large).cpu_s - int4.decode_layer_on_cpu(small).cpu_s \
        == pytest.approx((large - small) / 1e9, rel=1e-6)
    # the same bytes at the int4 rate, plus int4's overhead in place of dense's
    assert int4.decode_layer_on_cpu(small).cpu_s - dense.decode_layer_on_cpu(small).cpu_s \
        == pytest.approx(small / 1e9 - small / 4e9 + 5e-3 - 2e-3, rel=1e-4)
    # on the CPU stand-in (no GPU) a decode step's "gpu" layers are CPU matmuls too: at the same rates
    stand_in = dataclasses.replace(measured, is_cpu_only=True)
    model = CostModel(spec.quantized("int4"), stand_in, workload)

    def gpu_tier_step(weight_bytes):
        return model.layer(weights="gpu", kv="gpu", attention="gpu", weight_bytes=weight_bytes, num_rows=1,
                           num_keys=128).gpu_s
    assert gpu_tier_step(large) - gpu_tier_step(small) == pytest.approx((large - small) / 1e9, rel=1e-6)
    assert model.layer_overhead_s == 5e-3
    # --profile measured the fused llama-like step; a family decoded eagerly (Gemma) costs the default overhead
    from placement.hardware import DEFAULT_CPU_LAYER_OVERHEAD_S
    assert dense.cpu_step_fused and dense.cpu_layer_overhead_s == 2e-3
    gemma = CostModel(load_spec("gemma-2-2b"), measured, workload)
    assert not gemma.cpu_step_fused and gemma.cpu_layer_overhead_s == DEFAULT_CPU_LAYER_OVERHEAD_S
    batched = CostModel(spec, measured, Workload(batch_size=8, prompt_len=128, gen_len=16))
    assert not batched.cpu_step_fused                    # more rows than the fused step takes
    # int8 was not measured: estimated from the CPU's FLOP/s, never above its memory bandwidth
    assert 0 < measured.cpu_matmul_bytes_per_s("int8") <= measured.cpu_attention_bytes_per_s
    with pytest.raises(HardwareError, match="cpu_matmul_rates"):
        dataclasses.replace(measured, cpu_matmul_rates=(("int3", 1e9),))


def test_copies_and_compute_add_up_on_the_cpu_stand_in():
    """Without a GPU the "PCIe" copy is a memcpy on the same cores and RAM as the compute: no overlap."""
    from placement.cost import ItemCost, step_time
    streamed = ItemCost(transfer_s=2.0, gpu_s=1.0, cpu_s=0.0, is_streamed=True)
    resident = ItemCost(transfer_s=0.0, gpu_s=3.0, cpu_s=0.0, is_streamed=False)
    groups = [(2, streamed), (1, resident)]
    assert step_time(groups, 2, serial=True).seconds == pytest.approx(4.0 + 5.0)
    assert step_time(groups, 2).seconds < 9.0               # a GPU overlaps them


def test_speculative_decoding_budget_is_the_longest_pass_that_costs_about_a_step():
    """plan.predicted.verify_tokens: a streamed 70B model verifies MAX_VERIFY_TOKENS tokens for a step's copies;
    resident on the GPU, a pass grows with its tokens once their FLOPs pass the weights' reads; where a decode
    step computes layers on the CPU, a pass computes them there too (as a decode step of its tokens), so it
    also verifies several tokens for about a step's reads, until the CPU's FLOPs catch up."""
    from placement.build import VERIFY_STEP_SLACK, decode_groups, verify_budget
    from placement.cost import CostModel, step_time
    from placement.workspace import MAX_VERIFY_TOKENS
    workload = Workload(batch_size=1, prompt_len=512, gen_len=128)
    streamed = plan(load_spec("llama-3.1-70b", quantization="int4"), hardware(24, 192), workload, cpu_compute=False)
    assert streamed.predicted.bottleneck == "pcie" and streamed.predicted.verify_tokens == MAX_VERIFY_TOKENS
    assert "speculative decoding's budget: 16 tokens" in streamed.summary()
    small = load_spec("qwen2.5-0.5b")
    slow_gpu = dataclasses.replace(hardware(24, 64), gpu_flops=2e12)        # FLOPs catch up with reads early
    resident = plan(small, slow_gpu, workload)
    budget = resident.predicted.verify_tokens
    assert resident.num_gpu_layers == small.num_layers and 1 < budget < MAX_VERIFY_TOKENS
    cost = CostModel(small, slow_gpu, workload)
    layers = resident.layers

    def pass_s(tokens):     # a pass of `tokens` tokens of the one row: every layer's T rows, the head's T positions
        groups = [(1, cost.layer(weights=l.weights, kv=l.kv, attention=l.attention, weight_bytes=l.weight_bytes,
                                 num_rows=tokens, num_keys=cost.decode_context, decode=False)) for l in layers]
        groups += [(1, cost.embedding("gpu", tokens)), (1, cost.final_norm()), (1, cost.lm_head("gpu", tokens))]
        return step_time(groups, 0).seconds
    assert pass_s(budget) <= VERIFY_STEP_SLACK * pass_s(1) < pass_s(budget + 1)
    assert verify_budget(cost, layers, "gpu", "gpu", 0) == budget
    big = load_spec("llama-2-70b")
    hybrid = plan(big, hardware(24, 192), workload)
    budget = hybrid.predicted.verify_tokens
    assert any(l.compute == "cpu" for l in hybrid.layers) and 1 < budget < MAX_VERIFY_TOKENS
    cost = CostModel(big, hardware(24, 192), workload)

    def hybrid_pass_s(tokens):  # the CPU layers as a decode step of `tokens` rows there, the others' T rows
        rows = CostModel(cost.spec, cost.hw, dataclasses.replace(workload, batch_size=tokens))
        groups = [(1, rows.decode_layer_on_cpu(l.weight_bytes) if l.compute == "cpu" else
                   cost.layer(weights=l.weights, kv=l.kv, attention=l.attention, weight_bytes=l.weight_bytes,
                              num_rows=tokens, num_keys=cost.decode_context)) for l in hybrid.layers]
        groups += [(1, cost.embedding(hybrid.embedding.weights, tokens)), (1, cost.final_norm()),
                   (1, cost.lm_head(hybrid.lm_head.weights, tokens))]
        return step_time(groups, hybrid.prefetch_depth).seconds
    step_s = step_time(decode_groups(cost, hybrid.layers, hybrid.embedding.weights, hybrid.lm_head.weights),
                       hybrid.prefetch_depth).seconds
    assert hybrid_pass_s(budget) <= VERIFY_STEP_SLACK * step_s < hybrid_pass_s(budget + 1)
