"""Packed host items (one flat buffer per streamed item) and the pinned-memory fallback."""
import warnings

import pytest
import torch

import offload.weights.host_memory as host_memory
from offload.weights.host_memory import PackedItem, PinnedMemoryWarning, allocate_host_bytes


def test_pack_aligns_every_tensor_and_views_are_bit_identical():
    tensors = {
        "a": torch.randn(3, 5),                     # 60 bytes in fp32 -> 30 in bf16
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "ids": torch.arange(7, dtype=torch.int32),  # never cast
        "mask": torch.tensor([True, False, True]),
        "strided": torch.randn(6, 4).t(),           # non-contiguous source
    }
    packed = PackedItem.pack(tensors, dtype=torch.bfloat16, alignment=64)
    offsets = [layout.offset for layout in packed.layouts]
    assert all(offset % 64 == 0 for offset in offsets) and offsets == sorted(offsets)
    assert packed.num_bytes % 64 == 0
    views = packed.tensors()
    for name, tensor in tensors.items():
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert views[name].dtype == want.dtype and views[name].shape == want.shape, name
        assert torch.equal(views[name], want), name
    # the same layout read from a copy of the bytes (what a device slot holds)
    slot = torch.zeros(packed.num_bytes + 128, dtype=torch.uint8)
    slot[:packed.num_bytes].copy_(packed.buffer)
    assert torch.equal(packed.views_of(slot)["strided"], tensors["strided"].to(torch.bfloat16))


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="power of two"):
        PackedItem.pack({"a": torch.ones(2)}, alignment=48)
    with pytest.raises(TypeError, match="'a' is a list"):
        PackedItem.pack({"a": [1.0, 2.0]})


def test_no_pinning_and_no_warning_without_cuda_by_default():
    if torch.cuda.is_available():
        pytest.skip("checks the CUDA-less default")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        buffer = allocate_host_bytes(4096)
        packed = PackedItem.pack({"w": torch.ones(8)})
    assert not buffer.is_pinned() and not packed.is_pinned


def test_a_pinning_failure_falls_back_to_pageable_memory_with_one_warning(monkeypatch):
    monkeypatch.setattr(host_memory, "_has_warned_pin_failure", False)

    def refuse(buffer):
        raise RuntimeError("cudaHostRegister failed: out of locked memory")

    monkeypatch.setattr(host_memory, "_register_in_place", refuse)
    real_zeros = torch.zeros

    def zeros(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (pinned)")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(host_memory.torch, "zeros", zeros)
    with pytest.warns(PinnedMemoryWarning, match="pageable memory") as record:
        first = allocate_host_bytes(1000, pin=True)
        second = allocate_host_bytes(2000, pin=True)
    assert len([w for w in record if issubclass(w.category, PinnedMemoryWarning)]) == 1
    assert first.numel() == 1000 and second.numel() == 2000 and not first.is_pinned()
    assert not first.any() and not second.any()                       # zero-filled all the same
    monkeypatch.setattr(host_memory.torch, "zeros", real_zeros)
    packed = PackedItem.pack({"w": torch.arange(6.0)}, pin=True)     # still works, unpinned
    assert torch.equal(packed.tensors()["w"], torch.arange(6.0))


def test_negative_size_is_an_error():
    with pytest.raises(ValueError, match=">= 0"):
        allocate_host_bytes(-1)


@pytest.mark.cuda
def test_pinned_allocation_is_exact_and_page_locked():
    """Registered in place: page-locked, exactly the size asked for, and nothing from torch's pinned
    allocator (which would round 3 MiB + 17 up to 4 MiB and cache it)."""
    import gc
    gc.collect()
    pinned_before = host_memory.pinned_host_bytes()
    torch_pinned_before = torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0)
    num_bytes = 3 * (1 << 20) + 17
    buffer = allocate_host_bytes(num_bytes, pin=True)
    assert buffer.is_pinned() and buffer.numel() == num_bytes
    assert host_memory.pinned_host_bytes() - pinned_before == num_bytes
    assert torch.cuda.memory.host_memory_stats().get("allocated_bytes.current", 0) == torch_pinned_before
    packed = PackedItem.pack({"w": torch.randn(256, 256)}, pin=True)
    assert packed.is_pinned
    del buffer, packed
    gc.collect()
    assert host_memory.pinned_host_bytes() == pinned_before


class FakeCudart:
    """Records cudaHostRegister/Unregister calls; `register_error` is what registration returns."""

    def __init__(self, register_error: int = 0):
        self.register_error = register_error
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr, size, flags):
        self.registered.append((ptr, size, flags))
        return self.register_error

    def cudaHostUnregister(self, ptr):
        self.unregistered.append(ptr)
        return 0


def test_registration_pins_exactly_the_bytes_asked_for_and_unregisters_with_the_buffer(monkeypatch):
    import gc
    import mmap
    cudart = FakeCudart()
    monkeypatch.setattr(host_memory.torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(host_memory.torch, "zeros", None)             # torch's pinned allocator: never
    gc.collect()
    pinned_before, mapped_before = host_memory.pinned_host_bytes(), host_memory.host_bytes_in_use()
    sizes = (1000, 20, mmap.PAGESIZE, 3 * mmap.PAGESIZE + 1)
    buffers = [allocate_host_bytes(n, pin=True) for n in sizes]
    assert [size for _, size, _ in cudart.registered] == list(sizes)   # the bytes asked for, no rounding
    for buffer, (ptr, size, flags) in zip(buffers, cudart.registered):
        assert ptr == buffer.data_ptr() == buffer.untyped_storage().data_ptr() and ptr % mmap.PAGESIZE == 0
        assert buffer.numel() == size and flags == host_memory.CUDA_HOST_REGISTER_PORTABLE
        assert not buffer.any()
    # each buffer has pages of its own: the registered ranges never share a page
    pages = [(ptr // mmap.PAGESIZE, (ptr + size - 1) // mmap.PAGESIZE) for ptr, size, _ in cudart.registered]
    assert all(a[1] < b[0] or b[1] < a[0] for i, a in enumerate(pages) for b in pages[i + 1:])
    assert host_memory.pinned_host_bytes() - pinned_before == sum(sizes)
    assert host_memory.host_bytes_in_use() - mapped_before == sum(sizes)
    del buffers, buffer
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(ptr for ptr, _, _ in cudart.registered)
    assert host_memory.pinned_host_bytes() == pinned_before
    assert host_memory.host_bytes_in_use() == mapped_before               # the memory is given back


def test_a_refused_registration_clears_the_cuda_error_and_falls_back_to_torch_pinning(monkeypatch):
    cudart = FakeCudart(register_error=712)       # cudaErrorHostMemoryAlreadyRegistered
    cleared, pinned_requests = [], []
    monkeypatch.setattr(host_memory.torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(host_memory, "_clear_cuda_error", lambda: cleared.append(True))
    real_zeros = torch.zeros

    def zeros(*args, pin_memory=False, **kwargs):
        if pin_memory:
            pinned_requests.append(args)
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(host_memory.torch, "zeros", zeros)
    pinned_before = host_memory.pinned_host_bytes()
    buffer = allocate_host_bytes(5000, pin=True)
    assert buffer.numel() == 5000 and len(cudart.registered) == 1
    assert cleared == [True], "the runtime's last error must be reset or a later kernel launch fails"
    assert pinned_requests == [(5000,)]
    assert host_memory.pinned_host_bytes() == pinned_before
