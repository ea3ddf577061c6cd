"""Host storage of streamed weights: one flat (pinned when possible) byte buffer per item.

Each streamed item (a decoder layer, the embedding, ...) is packed into ONE contiguous uint8 buffer so
that moving it to the GPU is one DMA. `PackedItem.layouts` records where each tensor lives in it (name,
dtype, shape, byte offset aligned to `alignment`), and `PackedItem.views_of(buffer)` rebuilds the
tensors as views into any flat buffer holding the same bytes: the host buffer itself or a device slot.

Pinning, with CUDA present: the buffer is allocated pageable and registered with `cudaHostRegister`
(page-locked in place, `num_bytes` plus at most two pages; torch's pinned allocator rounds every request
up to a power of two, which would cost up to 2x host RAM for a 70B model's weights). If registration is not available
it falls back to `torch.empty(..., pin_memory=True)`; if pinning fails (OS limit, no memory), to pageable
memory with ONE warning per process: copies then run at pageable speed but nothing crashes. Without
CUDA the buffer is plain memory and nothing is said: there is no PCIe to pin for.
"""
from __future__ import annotations

import math
import mmap
import warnings
import weakref
from dataclasses import dataclass
from typing import Mapping

import torch

DEFAULT_ALIGNMENT = 256     # bytes; >= every element size, and a friendly boundary for DMA and kernels


class PinnedMemoryWarning(UserWarning):
    """Pinned host memory could not be allocated; streamed weights fall back to pageable memory."""


_has_warned_pin_failure = False


def _warn_pin_failure_once(num_bytes: int, error: BaseException) -> None:
    global _has_warned_pin_failure
    if _has_warned_pin_failure:
        return
    _has_warned_pin_failure = True
    warnings.warn(f"could not pin {num_bytes} bytes of host memory ({type(error).__name__}: {error}); "
                  "streamed weights use pageable memory, host->GPU copies will be slower and synchronous. "
                  "Raise the locked-memory limit (ulimit -l) or free RAM to get pinned memory back.",
                  PinnedMemoryWarning, stacklevel=3)


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error that a failed cudaHostRegister leaves behind.

    torch's cudart binding has no cudaGetLastError, and every torch kernel launch checks (and resets)
    it: left alone, the stale error would fail some unrelated later kernel. A tiny kernel consumes it.
    """
    try:
        torch.zeros(1, device="cuda")
    except RuntimeError:
        pass


def _register_in_place(num_bytes: int) -> torch.Tensor:
    """A new flat uint8 CPU tensor of `num_bytes`, page-locked with cudaHostRegister.

    The registered range is whole pages lying inside this one allocation (it is over-allocated by up to
    two pages): the driver locks whole pages, so no registration shares a page with another buffer's
    (a range overlapping an earlier registration is refused: cudaErrorHostMemoryAlreadyRegistered, and
    unregistering one buffer never touches a page another still uses).
    Unregistered when the returned tensor OBJECT is collected: callers keep that object alive (views
    alone do not keep the registration).
    """
    cudart = torch.cuda.cudart()
    page = mmap.PAGESIZE
    num_locked = align_up(num_bytes, page)
    raw = torch.empty(num_locked + page, dtype=torch.uint8)
    skip = -raw.data_ptr() % page
    region = raw[skip:skip + num_locked]
    ptr = region.data_ptr()
    assert ptr % page == 0 and region.numel() == num_locked, (ptr, num_locked)
    error = cudart.cudaHostRegister(ptr, num_locked, 0)
    if isinstance(error, tuple):                        # some bindings return (error, ...)
        error = error[0]
    if int(error) != 0:
        _clear_cuda_error()
        raise RuntimeError(f"cudaHostRegister failed with cudaError {int(error)}")
    buffer = region[:num_bytes]
    weakref.finalize(buffer, cudart.cudaHostUnregister, ptr)
    return buffer


def allocate_host_bytes(num_bytes: int, *, pin: bool | None = None) -> torch.Tensor:
    """A flat uint8 CPU tensor of `num_bytes`; page-locked when `pin` (default: when CUDA is available).

    Never raises for a pinning failure: falls back to pageable memory with one PinnedMemoryWarning.
    A registered buffer stays page-locked while the returned tensor object lives (keep it, not only
    views of it).
    """
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    if pin is None:
        pin = torch.cuda.is_available()
    if not pin or num_bytes == 0:
        return torch.empty(num_bytes, dtype=torch.uint8)
    try:
        buffer = _register_in_place(num_bytes)
        if buffer.is_pinned():
            return buffer
    except Exception:                                   # no cudart binding, no driver, registration refused
        pass
    try:
        return torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
    except Exception as error:                          # OS pin limit, out of memory, no driver
        _warn_pin_failure_once(num_bytes, error)
        return torch.empty(num_bytes, dtype=torch.uint8)


def align_up(num_bytes: int, alignment: int) -> int:
    return (num_bytes + alignment - 1) // alignment * alignment


@dataclass(frozen=True)
class TensorLayout:
    """Where one tensor lives inside a packed item's flat buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int                 # bytes from the start of the buffer

    def __post_init__(self):
        if self.offset < 0:
            raise ValueError(f"tensor {self.name!r}: offset must be >= 0, got {self.offset}")

    @property
    def num_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def view_of(self, buffer: torch.Tensor) -> torch.Tensor:
        """This tensor as a view into `buffer` (flat uint8, holding the packed bytes)."""
        return buffer[self.offset:self.offset + self.num_bytes].view(self.dtype).view(self.shape)


def cast_for_storage(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors converted to `dtype` (None: kept); integer/bool tensors are never converted."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor


class PackedItem:
    """One streamed item's tensors packed into one flat host buffer (`buffer`, uint8, `num_bytes`)."""

    def __init__(self, buffer: torch.Tensor, layouts: tuple[TensorLayout, ...]):
        assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and buffer.is_contiguous()
        assert all(layout.offset + layout.num_bytes <= buffer.numel() for layout in layouts)
        self.buffer = buffer
        self.layouts = layouts

    @classmethod
    def pack(cls, tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None,
             pin: bool | None = None, alignment: int = DEFAULT_ALIGNMENT) -> "PackedItem":
        """Copy `tensors` (cast to `dtype` when floating) into one new flat host buffer."""
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a positive power of two, got {alignment}")
        layouts, offset = [], 0
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
            out_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            layouts.append(TensorLayout(name=name, dtype=out_dtype, shape=tuple(tensor.shape), offset=offset))
            offset = align_up(offset + layouts[-1].num_bytes, alignment)
        buffer = allocate_host_bytes(offset, pin=pin)
        for layout in layouts:
            source = cast_for_storage(tensors[layout.name], dtype).detach().to("cpu").contiguous()
            # flat byte copy: the buffer holds exactly the tensor's bytes in its (new) dtype
            buffer[layout.offset:layout.offset + layout.num_bytes].copy_(source.reshape(-1).view(torch.uint8))
        return cls(buffer, tuple(layouts))

    @property
    def num_bytes(self) -> int:
        return self.buffer.numel()

    @property
    def is_pinned(self) -> bool:
        return self.num_bytes > 0 and self.buffer.is_pinned()

    def views_of(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> tensor view into `buffer` (flat uint8, at least `num_bytes`, any device)."""
        assert buffer.dtype == torch.uint8 and buffer.dim() == 1 and buffer.numel() >= self.num_bytes
        return {layout.name: layout.view_of(buffer) for layout in self.layouts}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors as views into the host buffer itself."""
        return self.views_of(self.buffer)
