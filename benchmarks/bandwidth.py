"""Measured host->device copy bandwidth: the physical limit streamed weights are compared against.

On CUDA: pinned (or pageable) host memory -> device, timed with CUDA events on a side stream, the way
the prefetcher copies. Without CUDA: a plain memcpy between two host buffers (what the CPU fallback's
"streaming" costs), timed with perf_counter. Benchmarks print it beside their own achieved GB/s.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from offload.weights.host_memory import allocate_host_bytes

DEFAULT_NUM_BYTES = 256 << 20


@dataclass(frozen=True)
class CopyBandwidth:
    """Result of a bandwidth measurement; `bytes_per_second` is the median over `num_repeats` copies."""

    bytes_per_second: float
    best_bytes_per_second: float
    num_bytes: int
    num_repeats: int
    description: str            # e.g. "pinned host -> cuda:0", "host memcpy (no CUDA)"
    is_pinned: bool

    def __post_init__(self):
        if self.bytes_per_second <= 0 or self.best_bytes_per_second <= 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bytes_per_second}, {self.best_bytes_per_second}")
        if self.num_bytes <= 0 or self.num_repeats <= 0:
            raise ValueError(f"num_bytes and num_repeats must be > 0, got {self.num_bytes}, {self.num_repeats}")

    @property
    def gb_per_second(self) -> float:
        return self.bytes_per_second / 1e9

    def seconds_for(self, num_bytes: int) -> float:
        """Time to copy `num_bytes` at the measured (median) bandwidth."""
        return num_bytes / self.bytes_per_second

    def __str__(self) -> str:
        return (f"{self.description}: {self.gb_per_second:.2f} GB/s median, "
                f"{self.best_bytes_per_second / 1e9:.2f} GB/s best ({self.num_bytes / 2**20:.0f} MiB x "
                f"{self.num_repeats})")


def measure_host_to_device_bandwidth(device=None, *, num_bytes: int = DEFAULT_NUM_BYTES, num_repeats: int = 5,
                                     pin: bool = True) -> CopyBandwidth:
    """Copy `num_bytes` host->`device` `num_repeats` times (after one warm-up) and time each copy.

    device: a CUDA device (default: cuda if available) or the CPU (memcpy bandwidth).
    """
    if num_bytes <= 0 or num_repeats <= 0:
        raise ValueError(f"num_bytes and num_repeats must be > 0, got {num_bytes}, {num_repeats}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    src = allocate_host_bytes(num_bytes, pin=pin and device.type == "cuda")
    src.fill_(1)                                        # touch every page before timing
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    if device.type == "cuda":
        seconds = _time_cuda_copies(dst, src, num_repeats)
        kind = "pinned" if src.is_pinned() else "pageable"
        description = f"{kind} host -> {device}"
    else:
        seconds = _time_host_copies(dst, src, num_repeats)
        description = "host memcpy (no CUDA: not a PCIe figure)"
    rates = [num_bytes / s for s in seconds]
    return CopyBandwidth(bytes_per_second=statistics.median(rates), best_bytes_per_second=max(rates),
                         num_bytes=num_bytes, num_repeats=num_repeats, description=description,
                         is_pinned=bool(src.is_pinned()) if device.type == "cuda" else False)


def _time_cuda_copies(dst: torch.Tensor, src: torch.Tensor, num_repeats: int) -> list[float]:
    stream = torch.cuda.Stream(device=dst.device)       # a side stream, as the prefetcher copies
    seconds = []
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)               # warm-up
        for _ in range(num_repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()                           # timing only: the hot path never does this
            seconds.append(start.elapsed_time(end) / 1e3)
    return seconds


def _time_host_copies(dst: torch.Tensor, src: torch.Tensor, num_repeats: int) -> list[float]:
    dst.copy_(src)                                      # warm-up: faults in the destination pages
    seconds = []
    for _ in range(num_repeats):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(max(time.perf_counter() - start, 1e-9))
    return seconds
