"""Host storage of streamed weights: one flat (pinned when possible) byte buffer per item.

Each streamed item (a decoder layer, the embedding, ...) is packed into ONE contiguous uint8 buffer so
that moving it to the GPU is one DMA. `PackedItem.layouts` records where each tensor lives in it (name,
dtype, shape, byte offset aligned to `alignment`), and `PackedItem.views_of(buffer)` rebuilds the
tensors as views into any flat buffer holding the same bytes: the host buffer itself or a device slot.

Every host buffer is an anonymous `mmap` (page-aligned, zero-filled, given back to the OS when its last
view dies) wrapped by `torch.frombuffer`. Pinning, with CUDA present: exactly those `num_bytes` are
registered with `cudaHostRegister` (portable: pinned for every device's context), so the pinned size is
the size asked for (torch's pinned allocator would round every request up to a power of two: up to 2x
host RAM for a 70B model's weights, cached and never returned). If registration is not available it
falls back to `torch.empty(..., pin_memory=True)`; if pinning fails (OS limit, no memory), to pageable
memory with ONE warning per process: copies then run at pageable speed but nothing crashes. Without
CUDA the buffer is plain memory and nothing is said: there is no PCIe to pin for.

`host_bytes_in_use()` and `pinned_host_bytes()` say what this module's buffers hold right now (tests
check that `model.close()` gives it all back).
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
CUDA_HOST_REGISTER_PORTABLE = 1   # cudaHostRegisterPortable: pinned for all CUDA contexts (cuda:1 too)


class PinnedMemoryWarning(UserWarning):
    """Pinned host memory could not be allocated; streamed weights fall back to pageable memory."""


_has_warned_pin_failure = False
_mapped: dict[int, int] = {}          # id(mmap) -> bytes, for every live host buffer of this module
_pinned = {"bytes": 0}                # bytes registered with cudaHostRegister and not yet unregistered


def host_bytes_in_use() -> int:
    """Bytes of host memory held by live buffers from `allocate_host_bytes` (pinned or not)."""
    return sum(_mapped.values())


def pinned_host_bytes() -> int:
    """Bytes currently page-locked by this module through cudaHostRegister."""
    return _pinned["bytes"]


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


def _mapped_bytes(num_bytes: int) -> torch.Tensor:
    """A flat uint8 CPU tensor of exactly `num_bytes` (> 0) over a fresh anonymous mmap: page-aligned,
    zero-filled, no page shared with any other buffer, unmapped when the last view of it dies."""
    region = mmap.mmap(-1, num_bytes)
    key = id(region)
    _mapped[key] = num_bytes
    weakref.finalize(region, _mapped.pop, key, None)
    with warnings.catch_warnings():               # the mmap is writable: torch's read-only warning is moot
        warnings.simplefilter("ignore")
        buffer = torch.frombuffer(region, dtype=torch.uint8)
    assert buffer.data_ptr() % mmap.PAGESIZE == 0 and buffer.numel() == num_bytes, (buffer.data_ptr(), num_bytes)
    return buffer


def _unregister(cudart, ptr: int, num_bytes: int) -> None:
    error = cudart.cudaHostUnregister(ptr)
    if isinstance(error, tuple):
        error = error[0]
    if int(error) != 0:
        _clear_cuda_error()                 # or the next kernel launch reports it
    _pinned["bytes"] -= num_bytes


def _register_in_place(buffer: torch.Tensor) -> None:
    """Page-lock exactly the bytes of `buffer` (a fresh `_mapped_bytes` tensor) with cudaHostRegister.

    Registration is portable (valid on every device) and lasts until the `buffer` OBJECT is collected:
    callers keep that object alive (views alone do not keep the registration)."""
    cudart = torch.cuda.cudart()
    ptr, num_bytes = buffer.data_ptr(), buffer.numel()
    assert ptr % mmap.PAGESIZE == 0 and buffer.is_contiguous(), (ptr, buffer.stride())
    error = cudart.cudaHostRegister(ptr, num_bytes, CUDA_HOST_REGISTER_PORTABLE)
    if isinstance(error, tuple):                        # some bindings return (error, ...)
        error = error[0]
    if int(error) != 0:
        _clear_cuda_error()
        raise RuntimeError(f"cudaHostRegister failed with cudaError {int(error)}")
    _pinned["bytes"] += num_bytes
    weakref.finalize(buffer, _unregister, cudart, ptr, num_bytes)


def allocate_host_bytes(num_bytes: int, *, pin: bool | None = None) -> torch.Tensor:
    """A flat, zero-filled uint8 CPU tensor of `num_bytes`; page-locked when `pin` (default: when CUDA is
    available).

    Never raises for a pinning failure: falls back to pageable memory with one PinnedMemoryWarning.
    A registered buffer stays page-locked while the returned tensor object lives (keep it, not only
    views of it).
    """
    if num_bytes < 0:
        raise ValueError(f"num_bytes must be >= 0, got {num_bytes}")
    if pin is None:
        pin = torch.cuda.is_available()
    if num_bytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    buffer = _mapped_bytes(num_bytes)
    if not pin:
        return buffer
    try:
        _register_in_place(buffer)
        return buffer
    except Exception:                                   # no cudart binding, no driver, registration refused
        pass
    try:
        return torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=True)
    except Exception as error:                          # OS pin limit, out of memory, no driver
        _warn_pin_failure_once(num_bytes, error)
        return buffer


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
