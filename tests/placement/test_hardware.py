"""Hardware: GPU presets, detection with explicit budgets, profiling and its cache."""
import subprocess
import sys

import pytest

import placement
from placement import Hardware, HardwareError
from placement.hardware import CUDA_RESERVE_BYTES, GPU_PRESETS, match_gpu_preset
from placement import profile

GiB = 1 << 30


def test_gpu_presets():
    hw = Hardware.from_gpu_preset("RTX-4090", cpu_memory="64GiB")
    assert hw.gpu_bytes == 24 * GiB and hw.cpu_bytes == 64 * GiB and hw.name == "rtx-4090"
    assert hw.cuda_reserve_bytes == CUDA_RESERVE_BYTES
    # PCIe 4.0 x16 is ~31.5 GB/s on paper; effective pinned copies are below that
    assert 20e9 < hw.pcie_bytes_per_s < 31.5e9
    assert GPU_PRESETS["t4"].pcie_bytes_per_s < GPU_PRESETS["rtx-3060"].pcie_bytes_per_s
    assert Hardware.from_gpu_preset("t4", cpu_memory=1, gpu_memory="8GiB").gpu_bytes == 8 * GiB
    with pytest.raises(HardwareError, match="unknown GPU 'gtx-9'"):
        Hardware.from_gpu_preset("gtx-9", cpu_memory=1)


@pytest.mark.parametrize("device, preset", [
    ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("NVIDIA GeForce RTX 4070 Ti", "rtx-4070-ti"),
    ("Tesla T4", "t4"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"), ("NVIDIA GeForce RTX 4060 Ti", "rtx-4060"), ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA A10", "a10"), ("NVIDIA GeForce GTX 1080", None),
])
def test_match_device_names(device, preset):
    found = match_gpu_preset(device)
    assert (found.name if found else None) == preset


def test_detect_with_explicit_budgets_takes_them_as_given():
    hw = Hardware.detect(gpu_memory="7.5GB", cpu_memory="512MiB")
    assert hw.gpu_bytes == 7_500_000_000 and hw.cpu_bytes == 512 << 20
    assert not hw.is_cpu_only


def test_detect_without_gpu_budget_on_this_machine():
    code = ("import torch, placement\n"
            "hw = placement.Hardware.detect(cpu_memory='8GiB')\n"
            "print(hw.is_cpu_only, torch.cuda.is_available(), hw.gpu_bytes, hw.cpu_bytes, hw.cuda_reserve_bytes)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    cpu_only, has_cuda, gpu, cpu, reserve = r.stdout.split()
    if has_cuda == "False":   # the CPU stands in for the GPU: the RAM budget split between the tiers
        assert cpu_only == "True" and int(gpu) + int(cpu) == 8 * GiB and reserve == "0"
    else:
        assert cpu_only == "False" and int(gpu) > 0 and int(cpu) == 8 * GiB


def test_invalid_hardware():
    with pytest.raises(HardwareError, match="pcie_bytes_per_s"):
        Hardware(gpu_bytes=1, cpu_bytes=1, pcie_bytes_per_s=0, gpu_flops=1, gpu_mem_bytes_per_s=1,
                 cpu_attention_bytes_per_s=1)
    with pytest.raises(HardwareError, match="gpu_bytes"):
        Hardware(gpu_bytes=-1, cpu_bytes=1, pcie_bytes_per_s=1, gpu_flops=1, gpu_mem_bytes_per_s=1,
                 cpu_attention_bytes_per_s=1)


def test_profile_measures_caches_and_is_used_by_detect(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert profile.cache_path() == tmp_path / "offload" / "hardware-profile.json"
    assert profile.load_profile() is None
    measured = profile.measure(cpu_bytes=16 << 20, use_cuda=False)
    assert measured.is_cpu_only
    # any machine moves more than 100 MB/s through memory and does more than 100 MFLOP/s
    assert measured.cpu_attention_bytes_per_s > 1e8 and measured.cpu_flops > 1e8
    assert measured.pcie_bytes_per_s > 1e8
    # the CPU's own decode steps: a rate and a layer overhead per kind of matrix
    assert [kind for kind, _ in measured.cpu_matmul_rates] == ["dense", "int8", "int4"]
    assert all(rate > 1e8 for _, rate in measured.cpu_matmul_rates)
    assert [kind for kind, _ in measured.cpu_layer_overheads] == ["dense", "int8", "int4"]
    assert all(0 < seconds < 1 for _, seconds in measured.cpu_layer_overheads)
    profile.store_profile(measured)
    assert profile.load_profile() == measured
    hw = Hardware.detect(gpu_memory="4GiB", cpu_memory="4GiB")
    assert hw.cpu_attention_bytes_per_s == measured.cpu_attention_bytes_per_s
    for kind, rate in measured.cpu_matmul_rates:
        assert hw.cpu_matmul_bytes_per_s(kind) == rate
    for kind, seconds in measured.cpu_layer_overheads:
        assert hw.cpu_layer_overhead_s(kind) == seconds
    assert "profiled" in hw.name
    profile.cache_path().write_text("{ broken")
    assert profile.load_profile() is None                 # an unreadable cache is ignored


@pytest.mark.cuda
def test_profile_measures_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = profile.measure(cpu_bytes=16 << 20, gpu_bytes=64 << 20, use_cuda=True)
    assert not measured.is_cpu_only
    assert 1e9 < measured.pcie_bytes_per_s < 100e9          # PCIe gen3..gen5 x16
    assert measured.gpu_mem_bytes_per_s > measured.pcie_bytes_per_s
    assert measured.gpu_flops > 1e12


def test_detect_reads_the_device_asked_for_and_leaves_headroom(monkeypatch, tmp_path):
    """cuda:1's budget is read on cuda:1; the detected budget leaves room the plan cannot count
    (fragmentation, lazily loaded kernels) on top of the CUDA reserve."""
    import torch

    from placement.hardware import MIN_GPU_HEADROOM_BYTES, gpu_headroom_bytes
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))             # no cached profile
    cards = {0: ("NVIDIA GeForce RTX 4090", 20 * GiB, 24 * GiB), 1: ("NVIDIA GeForce RTX 3060", 11 * GiB, 12 * GiB)}
    asked = []

    def mem_get_info(index):
        asked.append(index)
        return cards[index][1:]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: cards[index][0])
    hw = Hardware.detect(cpu_memory="32GiB", device_index=1)
    assert asked == [1] and hw.name == "NVIDIA GeForce RTX 3060"
    assert hw.gpu_bytes == 11 * GiB - gpu_headroom_bytes(12 * GiB) and gpu_headroom_bytes(12 * GiB) >= MIN_GPU_HEADROOM_BYTES
    default = Hardware.detect(cpu_memory="32GiB")
    assert asked == [1, 0] and default.gpu_bytes == 20 * GiB - gpu_headroom_bytes(24 * GiB)
    assert gpu_headroom_bytes(24 * GiB) > MIN_GPU_HEADROOM_BYTES     # a fraction of a large card
    spec = placement.load_spec("llama-3.2-1b")
    plan = placement.plan(spec, hw, placement.Workload(batch_size=1, prompt_len=512, gen_len=128))
    assert plan.memory.gpu.total <= 11 * GiB - gpu_headroom_bytes(12 * GiB) - hw.cuda_reserve_bytes
