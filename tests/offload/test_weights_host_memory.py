"""Packed host items (one flat buffer per streamed item) and the pinned-memory fallback."""
import warnings

import pytest
import torch

import offload.host_memory as host_memory
from offload.host_memory import PackedItem, PinnedMemoryWarning, allocate_host_bytes


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

    def refuse(*args, **kwargs):
        raise RuntimeError("cudaHostRegister failed: out of locked memory")

    monkeypatch.setattr(host_memory, "_register_in_place", refuse)
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (pinned)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(host_memory.torch, "empty", empty)
    with pytest.warns(PinnedMemoryWarning, match="pageable memory") as record:
        first = allocate_host_bytes(1000, pin=True)
        second = allocate_host_bytes(2000, pin=True)
    assert len([w for w in record if issubclass(w.category, PinnedMemoryWarning)]) == 1
    assert first.numel() == 1000 and second.numel() == 2000 and not first.is_pinned()
    monkeypatch.setattr(host_memory.torch, "empty", real_empty)
    packed = PackedItem.pack({"w": torch.arange(6.0)}, pin=True)     # still works, unpinned
    assert torch.equal(packed.tensors()["w"], torch.arange(6.0))


def test_negative_size_is_an_error():
    with pytest.raises(ValueError, match=">= 0"):
        allocate_host_bytes(-1)


@pytest.mark.cuda
def test_pinned_allocation_is_exact_and_page_locked():
    buffer = allocate_host_bytes(3 * (1 << 20) + 17, pin=True)
    assert buffer.is_pinned() and buffer.numel() == 3 * (1 << 20) + 17
    packed = PackedItem.pack({"w": torch.randn(256, 256)}, pin=True)
    assert packed.is_pinned


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


def test_registration_locks_whole_pages_of_its_own_and_unregisters_with_the_buffer(monkeypatch):
    import gc
    import mmap
    cudart = FakeCudart()
    monkeypatch.setattr(host_memory.torch.cuda, "cudart", lambda: cudart)
    buffers = [host_memory._register_in_place(n) for n in (1000, 20, mmap.PAGESIZE, 3 * mmap.PAGESIZE + 1)]
    for buffer, (ptr, size, flags) in zip(buffers, cudart.registered):
        storage = buffer.untyped_storage()
        assert ptr == buffer.data_ptr() and ptr % mmap.PAGESIZE == 0 and size % mmap.PAGESIZE == 0
        assert size >= buffer.numel() and flags == 0
        # the locked pages lie inside this buffer's own allocation: no page is shared with another buffer
        assert storage.data_ptr() <= ptr and ptr + size <= storage.data_ptr() + storage.nbytes()
    assert [b.numel() for b in buffers] == [1000, 20, mmap.PAGESIZE, 3 * mmap.PAGESIZE + 1]
    first_ptr = cudart.registered[0][0]
    del buffers, buffer, storage
    gc.collect()
    assert sorted(cudart.unregistered) == sorted(ptr for ptr, _, _ in cudart.registered)
    assert first_ptr in cudart.unregistered


def test_a_refused_registration_clears_the_cuda_error_and_falls_back_to_torch_pinning(monkeypatch):
    cudart = FakeCudart(register_error=712)       # cudaErrorHostMemoryAlreadyRegistered
    cleared, pinned_requests = [], []
    monkeypatch.setattr(host_memory.torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(host_memory, "_clear_cuda_error", lambda: cleared.append(True))
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        if pin_memory:
            pinned_requests.append(args)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(host_memory.torch, "empty", empty)
    buffer = allocate_host_bytes(5000, pin=True)
    assert buffer.numel() == 5000 and len(cudart.registered) == 1
    assert cleared == [True], "the runtime's last error must be reset or a later kernel launch fails"
    assert pinned_requests == [(5000,)]
