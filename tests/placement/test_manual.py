"""llama.cpp-style manual plans: -ngl / -nkvo control with the planner's accounting."""
import pytest

from placement import Hardware, PlanError, Workload, load_spec, manual_plan, plan

GiB = 1 << 30
WL = Workload(batch_size=1, prompt_len=1024, gen_len=128)


def test_first_n_layers_on_the_gpu():
    spec = load_spec("llama-3.1-8b")
    p = manual_plan(spec, WL, gpu_layers=10, kv_gpu_layers=0)
    assert [l.weights for l in p.layers] == ["gpu"] * 10 + ["cpu"] * 22
    assert all(l.kv == "cpu" and l.attention == "cpu" for l in p.layers)
    assert p.memory.gpu.weights + p.memory.cpu.weights == spec.total_weight_bytes
    assert p.prefetch_depth == 2 and p.slot_bytes == max(spec.layer_weight_bytes(0), spec.lm_head_bytes)
    # no hardware: the budget records exactly what the plan needs
    assert p.budget.gpu_bytes == p.memory.gpu.total + p.cuda_reserve_bytes
    assert p.budget.cpu_bytes == p.memory.cpu.total


def test_gpu_attention_over_cpu_kv_streams_the_cache():
    spec = load_spec("llama-3.1-8b")
    p = manual_plan(spec, WL, gpu_layers=32, kv_gpu_layers=16, cpu_attention=False, prefetch_depth=3)
    assert all(l.attention == "gpu" for l in p.layers)
    assert p.prefetch_depth == 3 and p.slot_bytes == p.layers[-1].kv_bytes


def test_all_on_gpu_matches_the_planner_when_everything_fits():
    spec = load_spec("qwen2.5-1.5b")
    hw = Hardware.from_gpu_preset("rtx-4090", cpu_memory=32 * GiB)
    auto, manual = plan(spec, hw, WL), manual_plan(spec, WL, hw)
    assert manual == auto
    assert manual.prefetch_depth == 0 and manual.slot_bytes == 0


def test_more_gpu_layers_never_predict_slower():
    spec = load_spec("llama-2-13b")
    previous = None
    for n in range(0, spec.num_layers + 1, 5):
        p = manual_plan(spec, WL, gpu_layers=n, kv_gpu_layers=spec.num_layers)
        if previous is not None:
            assert p.predicted.decode_tokens_per_s >= previous * (1 - 1e-9)
        previous = p.predicted.decode_tokens_per_s


def test_budget_checked_only_with_hardware():
    spec = load_spec("llama-2-70b")
    manual_plan(spec, WL)                                  # no hardware: anything goes
    small = Hardware.from_gpu_preset("rtx-3060", cpu_memory=256 * GiB)
    with pytest.raises(PlanError, match="needs .* GPU"):
        manual_plan(spec, WL, small, gpu_layers=40)
    p = manual_plan(spec, WL, small, gpu_layers=3)
    assert p.memory.gpu.total + p.cuda_reserve_bytes <= small.gpu_bytes


@pytest.mark.parametrize("kwargs", [dict(gpu_layers=-1), dict(gpu_layers=33), dict(kv_gpu_layers=1.5),
                                    dict(prefetch_depth=0), dict(prefill_chunk_size=0)])
def test_bad_arguments(kwargs):
    with pytest.raises(PlanError):
        manual_plan(load_spec("llama-3.1-8b"), WL, **kwargs)


def test_tied_models_keep_table_and_head_together():
    spec = load_spec("llama-3.2-1b")
    p = manual_plan(spec, WL, gpu_layers=4)
    assert p.embedding.weights == p.lm_head.weights == "cpu"
    assert p.slot_bytes == max(spec.layer_weight_bytes(0), spec.token_table_bytes)
    with pytest.raises(PlanError, match="tied"):
        manual_plan(spec, WL, gpu_layers=4, embedding="gpu", lm_head="cpu")
