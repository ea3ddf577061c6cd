"""On device "cpu" a budget plans for the CPU standing in for the GPU: no CUDA reserve comes off the
"gpu" budget and the prediction uses CPU speeds, not a generic GPU's."""
import placement

import offload


def test_cpu_budget_is_planned_as_cpu_only(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    model = offload.load(str(path), gpu_memory="256MiB", cpu_memory="1GiB", device="cpu", dtype="float32",
                         max_seq_len=64, progress=False)
    try:
        plan = model.plan
        assert plan.cuda_reserve_bytes == 0
        assert plan.budget.gpu_bytes == 256 << 20 and plan.budget.cpu_bytes == 1 << 30
        cpu = placement.Hardware.cpu_only(gpu_memory="256MiB", cpu_memory="1GiB")
        spec = placement.load_spec(str(path), dtype="float32")
        assert plan == placement.plan(spec, cpu, plan.workload)
    finally:
        model.close()


def test_cpu_only_hardware_budgets():
    both = placement.Hardware.cpu_only(gpu_memory="2GiB", cpu_memory="6GiB")
    assert (both.gpu_bytes, both.cpu_bytes, both.cuda_reserve_bytes, both.is_cpu_only) == (2 << 30, 6 << 30, 0, True)
    split = placement.Hardware.cpu_only(cpu_memory="8GiB")
    assert split.gpu_bytes + split.cpu_bytes == 8 << 30 and split.gpu_bytes == 4 << 30
    gpu_only = placement.Hardware.cpu_only(gpu_memory="1GiB")
    assert gpu_only.gpu_bytes == 1 << 30 and gpu_only.cpu_bytes >= 0
