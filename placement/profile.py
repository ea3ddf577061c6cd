"""`--profile`: a few seconds of real measurements of this machine, cached in the user's cache dir.

Measures CPU memory bandwidth (a float32 matrix-vector product over a large matrix, as decode attention
streams the KV cache), CPU FLOP/s (numpy matmul), the CPU's decode matmul rate and per-layer overhead for
dense, int8 and int4 matrices (for layers computed on the CPU); with CUDA also pinned host->device bandwidth, GPU
16-bit matmul FLOP/s and device memory bandwidth (torch). Without CUDA the "gpu" tier is the CPU and its
"PCIe" is a host memcpy. Results live in `cache_path()` ($XDG_CACHE_HOME/offload or ~/.cache/offload),
keyed by host name, and `Hardware.detect` uses them from then on.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from .hardware import Hardware

PROFILE_FILE = "hardware-profile.json"


@dataclass(frozen=True)
class MeasuredSpeeds:
    """Speeds measured on one machine; `apply` puts them on a Hardware with its budgets."""

    pcie_bytes_per_s: float
    gpu_flops: float
    gpu_mem_bytes_per_s: float
    cpu_attention_bytes_per_s: float
    cpu_flops: float
    is_cpu_only: bool
    device_name: str
    measured_at: float = 0.0
    # decode steps computed on the CPU (cpu_kernels/speed.py): ((kind, bytes/s), ...) of its
    # matmuls and ((kind, seconds), ...) of a layer's fixed cost; empty in profiles made before them
    cpu_matmul_rates: tuple = ()
    cpu_layer_overheads: tuple = ()

    def __post_init__(self):
        for key in ("cpu_matmul_rates", "cpu_layer_overheads"):          # JSON gives lists
            object.__setattr__(self, key, tuple(tuple(pair) for pair in getattr(self, key)))

    def apply(self, hardware: Hardware) -> Hardware:
        """`hardware` with these speeds. A CPU-only measurement applied to a Hardware with a real
        (or assumed) GPU sets only the CPU speeds: it says nothing about that GPU."""
        name = hardware.name if "profiled" in hardware.name else f"{hardware.name}, profiled"
        if self.is_cpu_only and not hardware.is_cpu_only:
            return dataclasses.replace(hardware, cpu_attention_bytes_per_s=self.cpu_attention_bytes_per_s,
                                       cpu_flops=self.cpu_flops, cpu_matmul_rates=self.cpu_matmul_rates,
                                       cpu_layer_overheads=self.cpu_layer_overheads,
                                       name=f"{hardware.name}, CPU profiled")
        return dataclasses.replace(hardware, pcie_bytes_per_s=self.pcie_bytes_per_s,
                                   gpu_flops=self.gpu_flops, gpu_mem_bytes_per_s=self.gpu_mem_bytes_per_s,
                                   cpu_attention_bytes_per_s=self.cpu_attention_bytes_per_s,
                                   cpu_flops=self.cpu_flops, cpu_matmul_rates=self.cpu_matmul_rates,
                                   cpu_layer_overheads=self.cpu_layer_overheads, name=name)


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/offload, else ~/.cache/offload."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "offload"


def cache_path() -> Path:
    return cache_dir() / PROFILE_FILE


def load_profile() -> MeasuredSpeeds | None:
    """This machine's cached measurements, or None (also when the cache is unreadable)."""
    try:
        entries = json.loads(cache_path().read_text(encoding="utf-8"))
        return MeasuredSpeeds(**entries[socket.gethostname()])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_profile(speeds: MeasuredSpeeds) -> Path:
    """Write this machine's entry into the cache file (other hosts' entries are kept)."""
    path = cache_path()
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(entries, dict):
            entries = {}
    except (OSError, ValueError):
        entries = {}
    entries[socket.gethostname()] = dataclasses.asdict(speeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


def measure(*, cpu_bytes: int = 256 << 20, gpu_bytes: int = 256 << 20,
            use_cuda: bool | None = None, device_index: int | None = None,
            cpu_decode: bool = True) -> MeasuredSpeeds:
    """Measure this machine (about 5-10 s at the default sizes). `use_cuda=None`: if available; the GPU
    measured is CUDA device `device_index` (default: the current one); `cpu_decode`: also the CPU's own
    decode steps (cpu_kernels/speed.py: matmul rates and layer overhead per kind of matrix)."""
    import numpy as np

    rates = overheads = ()
    if cpu_decode:
        from cpu_kernels.speed import measure_cpu_decode
        rates, overheads = measure_cpu_decode(total_bytes=min(cpu_bytes, 96 << 20))

    cpu_bw = _best_rate(lambda m, v: m @ v, *_gemv_operands(np, cpu_bytes), num_bytes=cpu_bytes)
    n = 512
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    cpu_flops = _best_rate(lambda x, y: x @ y, a, a, num_bytes=2 * n ** 3)
    if use_cuda is None:
        use_cuda = _cuda_available()
    if not use_cuda:
        src = np.ones(cpu_bytes // 4, dtype=np.float32)
        dst = np.empty_like(src)
        memcpy = _best_rate(np.copyto, dst, src, num_bytes=cpu_bytes)
        return MeasuredSpeeds(pcie_bytes_per_s=memcpy, gpu_flops=cpu_flops, gpu_mem_bytes_per_s=cpu_bw,
                              cpu_attention_bytes_per_s=cpu_bw, cpu_flops=cpu_flops,
                              is_cpu_only=True, device_name="cpu", measured_at=time.time(),
                              cpu_matmul_rates=rates, cpu_layer_overheads=overheads)
    pcie, flops, mem, name = _measure_cuda(gpu_bytes, device_index)
    return MeasuredSpeeds(pcie_bytes_per_s=pcie, gpu_flops=flops, gpu_mem_bytes_per_s=mem,
                          cpu_attention_bytes_per_s=cpu_bw, cpu_flops=cpu_flops, is_cpu_only=False,
                          device_name=name, measured_at=time.time(), cpu_matmul_rates=rates,
                          cpu_layer_overheads=overheads)


def _gemv_operands(np, num_bytes: int):
    cols = 4096
    rows = max(1, num_bytes // (4 * cols))
    return np.ones((rows, cols), dtype=np.float32), np.ones(cols, dtype=np.float32)


def _best_rate(fn, *args, num_bytes: int, repeats: int = 5) -> float:
    """`num_bytes` (or FLOPs) divided by the fastest of `repeats` timed calls, after a warm-up."""
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - start)
    return num_bytes / max(best, 1e-9)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _measure_cuda(num_bytes: int, device_index: int | None = None) -> tuple[float, float, float, str]:
    """(pinned H2D bytes/s, fp16 matmul FLOP/s, device copy bytes/s, device name) of one CUDA device."""
    import torch

    cuda = torch.device("cuda", torch.cuda.current_device() if device_index is None else device_index)

    def timed(fn, repeats=5):
        fn()
        torch.cuda.synchronize(cuda)
        best = float("inf")
        stream = torch.cuda.current_stream(cuda)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()                  # the events bracket exactly one call
            best = min(best, start.elapsed_time(end) / 1e3)
        return best

    with torch.cuda.device(cuda):
        host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        device = torch.empty(num_bytes, dtype=torch.uint8, device=cuda)
        pcie = num_bytes / timed(lambda: device.copy_(host, non_blocking=True))
        other = torch.empty_like(device)
        mem = 2 * num_bytes / timed(lambda: other.copy_(device))   # a copy reads and writes
        n = 4096
        a = torch.randn(n, n, device=cuda, dtype=torch.float16)
        flops = 2 * n ** 3 / timed(lambda: a @ a)
        name = torch.cuda.get_device_name(cuda)
        del host, device, other, a
        torch.cuda.empty_cache()
    return pcie, flops, mem, name
