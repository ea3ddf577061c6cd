"""Hardware: memory budgets and speeds of the two tiers ("gpu" and "cpu") and the link between them.

Three ways to get one:
- `Hardware.from_gpu_preset("rtx-4090", cpu_memory="64GiB")`: a card you don't own (GPU_PRESETS);
- `Hardware.detect(gpu_memory=None, cpu_memory=None)`: this machine. psutil for RAM; torch is imported
  ONLY when `gpu_memory` is not given, to read the CUDA device. Without CUDA the CPU stands in for the
  GPU (`is_cpu_only`): the detected RAM budget is split evenly between the "gpu" and "cpu" tiers, the
  "gpu" speeds are the CPU's, and there is no CUDA reserve. Measured speeds from `--profile`
  (placement.profile) are used when this machine has them cached;
- by keyword, for tests and for people who know their numbers.
Speeds are *effective* (what pinned copies, matmuls and attention kernels reach), not datasheet peaks.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from .sizes import parse_size

CUDA_RESERVE_BYTES = 512 << 20          # CUDA context + cuBLAS workspace, outside the plan's GPU total
# Detected GPU budget: the free memory less this headroom, for what the plan cannot count: the caching
# allocator's fragmentation (reserved > allocated), kernels loaded lazily on first use, other processes.
GPU_HEADROOM_FRACTION = 0.04            # of the card's total memory
MIN_GPU_HEADROOM_BYTES = 256 << 20
PCIE_GBPS_PER_LANE = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9}
PCIE_EFFICIENCY = 0.80                   # pinned host->device copies reach ~80% of the link rate
GPU_FLOPS_EFFICIENCY = 0.60              # large 16-bit matmuls reach ~60% of the tensor-core peak
GPU_MEM_EFFICIENCY = 0.85                # streaming reads reach ~85% of the memory bandwidth
DEFAULT_CPU_ATTENTION_BYTES_PER_S = 40e9 # a desktop with dual-channel DDR4-3200 (51 GB/s peak; DDR5 reads faster)
DEFAULT_CPU_FLOPS = 200e9                # ~8 cores running vectorised float32 kernels
DEFAULT_CPU_LAYER_OVERHEAD_S = 1e-3      # one decoder layer's decode step dispatched on the CPU (2 cores)
# Packed matmuls on the CPU can be bound by unpacking, not by RAM, on a few cores: bytes of weights as held
# (codes and scales) per s per FLOP/s of cpu_flops (cpu_kernels' integer path, which 16-bit models take, on
# a 2-core Zen 3: int8 and int4 ~10-13 GB/s per core against 25 GFLOP/s per core; float32 models take the
# exact float kernels, about half as fast). `--profile` measures them instead.
CPU_PACKED_MATMUL_BYTES_PER_FLOP = {"int8": 10e9 / 25e9, "int4": 10e9 / 25e9}
CPU_MATMUL_KINDS = ("dense", "int8", "int4")
CPU_MEMORY_HEADROOM = 0.90               # detected budget: 90% of the RAM available now


class HardwareError(ValueError):
    """An unknown GPU preset or an impossible hardware description."""


@dataclass(frozen=True)
class GpuPreset:
    """Datasheet numbers of one card: memory, memory bandwidth, dense 16-bit tensor FLOP/s (fp32
    accumulate), PCIe generation and lanes."""

    name: str
    memory_bytes: int
    mem_bytes_per_s: float
    flops: float
    pcie_gen: int
    pcie_lanes: int = 16

    @property
    def pcie_bytes_per_s(self) -> float:
        return PCIE_GBPS_PER_LANE[self.pcie_gen] * self.pcie_lanes * PCIE_EFFICIENCY


_GiB = 1 << 30
GPU_PRESETS = {p.name: p for p in (
    GpuPreset("rtx-4090", 24 * _GiB, 1008e9, 165.2e12, 4),
    GpuPreset("rtx-4080", 16 * _GiB, 716.8e9, 97.5e12, 4),
    GpuPreset("rtx-4070-ti", 12 * _GiB, 504e9, 80.2e12, 4),
    GpuPreset("rtx-4070", 12 * _GiB, 504e9, 58.3e12, 4),
    GpuPreset("rtx-4060-ti-16gb", 16 * _GiB, 288e9, 44.1e12, 4, 8),
    GpuPreset("rtx-4060", 8 * _GiB, 272e9, 30.2e12, 4, 8),
    GpuPreset("rtx-3090", 24 * _GiB, 936e9, 71e12, 4),
    GpuPreset("rtx-3080", 10 * _GiB, 760e9, 59.5e12, 4),
    GpuPreset("rtx-3070", 8 * _GiB, 448e9, 40.6e12, 4),
    GpuPreset("rtx-3060", 12 * _GiB, 360e9, 25.6e12, 4),
    GpuPreset("rtx-2080-ti", 11 * _GiB, 616e9, 53.8e12, 3),
    GpuPreset("t4", 15 * _GiB, 320e9, 65e12, 3),
    GpuPreset("a10", 24 * _GiB, 600e9, 125e12, 4),
    GpuPreset("l4", 24 * _GiB, 300e9, 121e12, 4),
    GpuPreset("a100-40gb", 40 * _GiB, 1555e9, 312e12, 4),
    GpuPreset("a100-80gb", 80 * _GiB, 1935e9, 312e12, 4),
    GpuPreset("h100-pcie", 80 * _GiB, 2000e9, 756e12, 5),
)}
# Speeds assumed for a GPU given only by its memory (--gpu-memory without --gpu or --profile).
GENERIC_GPU = GpuPreset("generic", 0, 450e9, 50e12, 4)


@dataclass(frozen=True)
class Hardware:
    """Budgets (bytes) and effective speeds (bytes/s, FLOP/s) of one machine, by keyword."""

    gpu_bytes: int
    cpu_bytes: int
    pcie_bytes_per_s: float
    gpu_flops: float
    gpu_mem_bytes_per_s: float
    cpu_attention_bytes_per_s: float
    name: str = "custom"
    cpu_flops: float = DEFAULT_CPU_FLOPS
    is_cpu_only: bool = False            # no CUDA: the CPU stands in for the "gpu" tier
    cuda_reserve_bytes: int | None = None  # None: CUDA_RESERVE_BYTES, or 0 when is_cpu_only
    # decode steps computed on the CPU, per kind of CPU_MATMUL_KINDS measured by --profile: ((kind, bytes/s
    # of weights as held), ...) and ((kind, seconds of one layer's fixed cost), ...); a kind left out is
    # estimated (cpu_matmul_bytes_per_s, cpu_layer_overhead_s)
    cpu_matmul_rates: tuple = ()
    cpu_layer_overheads: tuple = ()

    def __post_init__(self):
        for key in ("gpu_bytes", "cpu_bytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise HardwareError(f"Hardware.{key} must be a non-negative int, got {value!r}")
        for key in ("pcie_bytes_per_s", "gpu_flops", "gpu_mem_bytes_per_s",
                    "cpu_attention_bytes_per_s", "cpu_flops"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise HardwareError(f"Hardware.{key} must be a positive number, got {value!r}")
        for key in ("cpu_matmul_rates", "cpu_layer_overheads"):
            pairs = tuple(tuple(pair) for pair in getattr(self, key))       # JSON gives lists
            object.__setattr__(self, key, pairs)
            for pair in pairs:
                if len(pair) != 2 or pair[0] not in CPU_MATMUL_KINDS or not isinstance(pair[1], (int, float)) \
                        or not 0 < pair[1] < float("inf"):
                    raise HardwareError(f"Hardware.{key}: {pair!r} is not a (kind, positive number) pair with a "
                                        f"kind of {CPU_MATMUL_KINDS}")
        if self.cuda_reserve_bytes is None:
            object.__setattr__(self, "cuda_reserve_bytes",
                               0 if self.is_cpu_only else CUDA_RESERVE_BYTES)
        elif self.cuda_reserve_bytes < 0:
            raise HardwareError(f"Hardware.cuda_reserve_bytes must be >= 0, got {self.cuda_reserve_bytes}")

    def cpu_matmul_bytes_per_s(self, kind: str) -> float:
        """Bytes of weights (as held) per second a decode matmul on the CPU reads: "dense" (16/32-bit floats,
        bound by RAM), "int8" or "int4" (packed, bound by unpacking); measured or estimated."""
        measured = dict(self.cpu_matmul_rates)
        if kind in measured:
            return measured[kind]
        if kind == "dense":
            return self.cpu_attention_bytes_per_s
        return min(self.cpu_attention_bytes_per_s, CPU_PACKED_MATMUL_BYTES_PER_FLOP[kind] * self.cpu_flops)

    def cpu_layer_overhead_s(self, kind: str = "dense") -> float:
        """Seconds one decoder layer's decode step costs on the CPU beyond its matmuls and attention (the
        Python and kernel-launch cost of its ops), for layers whose matrices are of `kind`."""
        return dict(self.cpu_layer_overheads).get(kind, DEFAULT_CPU_LAYER_OVERHEAD_S)

    def with_budgets(self, gpu_bytes: int | None = None, cpu_bytes: int | None = None) -> "Hardware":
        """The same speeds with other budgets (None keeps a budget)."""
        return dataclasses.replace(self, gpu_bytes=self.gpu_bytes if gpu_bytes is None else gpu_bytes,
                                   cpu_bytes=self.cpu_bytes if cpu_bytes is None else cpu_bytes)

    @classmethod
    def from_gpu_preset(cls, name: str, cpu_memory: str | int | None = None,
                        gpu_memory: str | int | None = None) -> "Hardware":
        """A card from GPU_PRESETS; `gpu_memory` overrides its memory as the budget, `cpu_memory`
        defaults to this machine's available RAM. The CPU side assumes a typical desktop."""
        preset = gpu_preset(name)
        gpu_bytes = preset.memory_bytes if gpu_memory is None else parse_size(gpu_memory,
                                                                              what="gpu memory")
        cpu_bytes = detect_cpu_bytes() if cpu_memory is None else parse_size(cpu_memory,
                                                                             what="cpu memory")
        return cls(gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes, pcie_bytes_per_s=preset.pcie_bytes_per_s,
                   gpu_flops=preset.flops * GPU_FLOPS_EFFICIENCY,
                   gpu_mem_bytes_per_s=preset.mem_bytes_per_s * GPU_MEM_EFFICIENCY,
                   cpu_attention_bytes_per_s=DEFAULT_CPU_ATTENTION_BYTES_PER_S, name=preset.name)

    @classmethod
    def detect(cls, gpu_memory: str | int | None = None, cpu_memory: str | int | None = None,
               device_index: int | None = None) -> "Hardware":
        """This machine. Explicit budgets are taken as given; torch is imported only when
        `gpu_memory` is None, to read CUDA device `device_index` (default: the current one). The
        detected budget is the free memory less a headroom (`gpu_headroom_bytes`) and then, in the plan,
        less the CUDA reserve. Uses `--profile` measurements cached for this machine when present."""
        from .profile import load_profile      # local: profile.py imports this module
        measured = load_profile()
        cpu_bytes = None if cpu_memory is None else parse_size(cpu_memory, what="cpu memory")
        cpu_speeds = dict(cpu_attention_bytes_per_s=_cpu_attention_speed(), cpu_flops=_cpu_flops())
        if gpu_memory is not None:
            gpu_bytes = parse_size(gpu_memory, what="gpu memory")
            base = cls._generic(gpu_bytes, cpu_bytes, cpu_speeds)
        else:
            device = _cuda_device(device_index)
            if device is None:
                return cls.cpu_only(cpu_memory=cpu_bytes)     # applies the cached profile itself
            name, gpu_bytes = device
            preset = match_gpu_preset(name)
            if preset is None:
                base = dataclasses.replace(cls._generic(gpu_bytes, cpu_bytes, cpu_speeds), name=name)
            else:
                base = cls.from_gpu_preset(preset.name, cpu_memory=cpu_bytes, gpu_memory=gpu_bytes)
                base = dataclasses.replace(base, name=name, **cpu_speeds)
            if measured is not None and not measured.is_cpu_only and measured.device_name != name:
                # profiled on another card of this machine: only its CPU figures hold here
                measured = dataclasses.replace(measured, is_cpu_only=True)
        return measured.apply(base) if measured else base

    @classmethod
    def cpu_only(cls, gpu_memory: str | int | None = None,
                 cpu_memory: str | int | None = None) -> "Hardware":
        """The CPU standing in for the GPU (a machine without CUDA, or a run on device="cpu"): the "gpu"
        tier is RAM too, with CPU speeds and no CUDA reserve. Without a "gpu" budget the RAM budget (or the
        RAM available now) is split in half between the tiers; with only a "gpu" budget the "cpu" tier
        gets the rest of the available RAM."""
        speeds = dict(cpu_attention_bytes_per_s=_cpu_attention_speed(), cpu_flops=_cpu_flops())
        gpu_bytes = None if gpu_memory is None else parse_size(gpu_memory, what="gpu memory")
        cpu_bytes = None if cpu_memory is None else parse_size(cpu_memory, what="cpu memory")
        if gpu_bytes is None:       # one RAM budget (given, or available now) split between the tiers
            total = detect_cpu_bytes() if cpu_bytes is None else cpu_bytes
            gpu_bytes, cpu_bytes = total // 2, total - total // 2
        elif cpu_bytes is None:     # the "gpu" budget as given, the rest of the available RAM for "cpu"
            cpu_bytes = max(detect_cpu_bytes() - gpu_bytes, 0)
        base = cls(gpu_bytes=gpu_bytes, cpu_bytes=cpu_bytes,
                   pcie_bytes_per_s=speeds["cpu_attention_bytes_per_s"] / 2,
                   gpu_flops=speeds["cpu_flops"], gpu_mem_bytes_per_s=speeds["cpu_attention_bytes_per_s"],
                   name="cpu-only (the CPU stands in for the GPU)", is_cpu_only=True, **speeds)
        from .profile import load_profile      # local: profile.py imports this module
        measured = load_profile()
        return measured.apply(base) if measured else base

    @classmethod
    def _generic(cls, gpu_bytes: int, cpu_bytes: int | None, cpu_speeds: dict) -> "Hardware":
        return cls(gpu_bytes=gpu_bytes, cpu_bytes=detect_cpu_bytes() if cpu_bytes is None else cpu_bytes,
                   pcie_bytes_per_s=GENERIC_GPU.pcie_bytes_per_s,
                   gpu_flops=GENERIC_GPU.flops * GPU_FLOPS_EFFICIENCY,
                   gpu_mem_bytes_per_s=GENERIC_GPU.mem_bytes_per_s * GPU_MEM_EFFICIENCY,
                   name="gpu (generic PCIe 4.0 speeds)", **cpu_speeds)


def gpu_preset(name: str) -> GpuPreset:
    """The GpuPreset called `name` (case-insensitive); HardwareError naming the known ones."""
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key not in GPU_PRESETS:
        raise HardwareError(f"unknown GPU {name!r}; known: {', '.join(GPU_PRESETS)}")
    return GPU_PRESETS[key]


def match_gpu_preset(device_name: str) -> GpuPreset | None:
    """The preset whose name's words all appear in a CUDA device name, the most specific one
    ('NVIDIA GeForce RTX 4070 Ti' -> rtx-4070-ti; 'NVIDIA A100-SXM4-80GB' -> a100-80gb), or None."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    best = None
    for preset in GPU_PRESETS.values():
        key = preset.name.split("-")
        if set(key) <= words and (best is None or len(key) > len(best.name.split("-"))):
            best = preset
    return best


def detect_cpu_bytes() -> int:
    """CPU budget for this machine: CPU_MEMORY_HEADROOM of the RAM available now (psutil)."""
    import psutil
    return int(psutil.virtual_memory().available * CPU_MEMORY_HEADROOM)


def machine_ram_bytes() -> int:
    import psutil
    return int(psutil.virtual_memory().total)


def _physical_cores() -> int:
    import psutil
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _cpu_attention_speed() -> float:
    # ~5 GB/s per core until the memory channels saturate
    return min(5e9 * _physical_cores(), 40e9)


def _cpu_flops() -> float:
    return 25e9 * _physical_cores()


def gpu_headroom_bytes(total_bytes: int) -> int:
    """What a detected GPU budget leaves unused on a card of `total_bytes` (see GPU_HEADROOM_FRACTION)."""
    return max(MIN_GPU_HEADROOM_BYTES, int(total_bytes * GPU_HEADROOM_FRACTION))


def detected_gpu_bytes(free_bytes: int, total_bytes: int) -> int:
    """The "gpu" budget of a card with `free_bytes` free now (our CUDA context already made): the free
    memory less the headroom. The plan then keeps CUDA_RESERVE_BYTES of it for cuBLAS workspaces and
    context growth, so a plan's total is free - headroom - reserve."""
    return max(0, free_bytes - gpu_headroom_bytes(total_bytes))


def _cuda_device(index: int | None = None) -> tuple[str, int] | None:
    """(name, budget bytes) of CUDA device `index` (default: the current one), or None without CUDA.
    Imports torch (the only place that does)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    index = torch.cuda.current_device() if index is None else index
    free, total = torch.cuda.mem_get_info(index)
    return torch.cuda.get_device_name(index), detected_gpu_bytes(free, total)


def machine_gpu_bytes() -> int | None:
    """Memory of this machine's largest NVIDIA GPU via `nvidia-smi` (no torch), None if there is none."""
    import shutil
    import subprocess
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return max(int(float(line)) << 20 for line in out.split() if line.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
