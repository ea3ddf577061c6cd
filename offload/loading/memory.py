"""Memory accounting of the "gpu" tier: the engine's own ledger, and CUDA's measured peak.

`MemoryLedger` records what the runtime allocates on the compute device, by category (weights,
kv_cache, buffers, workspace), with current and peak bytes, and refuses an allocation that would pass
its budget *before* the allocation happens. On the CPU fallback it is the only measure of the "gpu"
tier (tests compare it with the plan); on CUDA, `DevicePeakMeter` reads what the caching allocator
really peaked at (`torch.cuda.max_memory_allocated`), which is what budgets are checked against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

CATEGORIES = ("weights", "kv_cache", "buffers", "workspace")
_MIB = 1 << 20


class MemoryBudgetError(MemoryError):
    """An allocation would take the "gpu" tier past its budget; nothing was allocated."""


@dataclass
class MemoryLedger:
    """Current and peak bytes per category; `max_bytes` (None: unlimited) is a hard budget on the total."""

    max_bytes: int | None = None
    current: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    peak_total_bytes: int = 0

    def __post_init__(self):
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {self.max_bytes}")
        for table in (self.current, self.peak):
            unknown = set(table) - set(CATEGORIES)
            if unknown:
                raise ValueError(f"unknown memory categories {sorted(unknown)}; use {CATEGORIES}")
            for category in CATEGORIES:
                table.setdefault(category, 0)

    def _check(self, category: str, num_bytes: int) -> None:
        if category not in CATEGORIES:
            raise ValueError(f"unknown memory category {category!r}; use one of {CATEGORIES}")
        if not isinstance(num_bytes, int) or num_bytes < 0:
            raise ValueError(f"num_bytes must be an integer >= 0, got {num_bytes!r}")

    def allocate(self, category: str, num_bytes: int) -> None:
        """Record `num_bytes` allocated under `category`; raises MemoryBudgetError past `max_bytes`."""
        self._check(category, num_bytes)
        total = self.current_bytes() + num_bytes
        if self.max_bytes is not None and total > self.max_bytes:
            raise MemoryBudgetError(
                f"allocating {num_bytes / _MIB:.1f} MiB of {category} would use {total / _MIB:.1f} MiB of "
                f"the gpu tier, over its budget of {self.max_bytes / _MIB:.1f} MiB "
                f"(in use: {self.describe_current()})")
        self.current[category] += num_bytes
        self.peak[category] = max(self.peak[category], self.current[category])
        self.peak_total_bytes = max(self.peak_total_bytes, total)

    def free(self, category: str, num_bytes: int) -> None:
        """Record `num_bytes` of `category` freed (paired with allocate)."""
        self._check(category, num_bytes)
        if num_bytes > self.current[category]:
            raise ValueError(f"freeing {num_bytes} bytes of {category}, but only {self.current[category]} "
                             "are recorded as allocated")
        self.current[category] -= num_bytes

    def allocate_tensor(self, category: str, tensor):
        """Record a tensor's bytes under `category` (after the fact) and return the tensor."""
        self.allocate(category, tensor.numel() * tensor.element_size())
        return tensor

    def current_bytes(self, category: str | None = None) -> int:
        """Bytes in use now: one category, or all of them."""
        if category is None:
            return sum(self.current.values())
        self._check(category, 0)
        return self.current[category]

    def peak_bytes(self, category: str | None = None) -> int:
        """Peak bytes since creation or reset_peak(): of one category, or of the total."""
        if category is None:
            return self.peak_total_bytes
        self._check(category, 0)
        return self.peak[category]

    def reset_peak(self) -> None:
        """Peaks restart from the current values."""
        self.peak = dict(self.current)
        self.peak_total_bytes = self.current_bytes()

    def describe_current(self) -> str:
        return ", ".join(f"{c} {self.current[c] / _MIB:.1f} MiB" for c in CATEGORIES)

    def report(self) -> str:
        """A small table: per category current and peak MiB, the total, and the free budget."""
        lines = [f"{'':<10} {'current':>12} {'peak':>12}"]
        for category in CATEGORIES:
            lines.append(f"{category:<10} {self.current[category] / _MIB:>8.1f} MiB "
                         f"{self.peak[category] / _MIB:>8.1f} MiB")
        lines.append(f"{'total':<10} {self.current_bytes() / _MIB:>8.1f} MiB {self.peak_total_bytes / _MIB:>8.1f} MiB")
        if self.max_bytes is not None:
            lines.append(f"{'free':<10} {(self.max_bytes - self.current_bytes()) / _MIB:>8.1f} MiB "
                         f"of {self.max_bytes / _MIB:.1f} MiB")
        return "\n".join(lines)


class DevicePeakMeter:
    """Measured peak of CUDA memory allocated by torch on `device`, relative to when the meter started.

        with DevicePeakMeter("cuda:0") as meter:
            ...
        meter.peak_bytes          # max_memory_allocated during the block - allocated at its start
        meter.peak_total_bytes    # max_memory_allocated during the block (everything torch holds)
    """

    def __init__(self, device):
        import torch
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"measured device memory needs a CUDA device, got {self.device}; "
                             "on the CPU fallback use MemoryLedger")
        self.start_bytes = 0
        self.peak_total_bytes = 0

    def start(self) -> "DevicePeakMeter":
        import torch
        torch.cuda.synchronize(self.device)       # pending frees counted before the peak restarts
        torch.cuda.reset_peak_memory_stats(self.device)
        self.start_bytes = torch.cuda.memory_allocated(self.device)
        return self

    def stop(self) -> int:
        """Synchronize, record the peak; returns peak_bytes."""
        import torch
        torch.cuda.synchronize(self.device)
        self.peak_total_bytes = torch.cuda.max_memory_allocated(self.device)
        return self.peak_bytes

    @property
    def peak_bytes(self) -> int:
        return max(0, self.peak_total_bytes - self.start_bytes)

    def __enter__(self) -> "DevicePeakMeter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
