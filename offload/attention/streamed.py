"""A layer's KV cache in host memory, attended on the GPU: the cache is streamed in through the ring.

For a layer the plan marks kv "cpu" + attention "gpu", the host cache [B_max, Hkv, S_max, D] (k and v)
is *attached* to the layer's weight item in PlacedWeights (offload/weights/placed.py): it lives inside the
layer's packed, pinned host buffer, and the prefetcher copies it into the layer's ring slot with the
layer's streamed weights (if any), ahead of use, on the same copy stream/thread. The plan's
`slot_bytes` counts exactly that (streamed weight bytes + KV bytes per slot).

Per call (`attend`, with the layer's acquired tensors, which hold the slot views of the cache):
  1. the new k, v are written into the device copy in the slot, and SDPA attends there (offload/attention/device.py);
  2. the new k, v are written back to the host cache: device -> pinned staging (non-blocking), one event
     sync, then `cpu_kernels.append_kv` on the host.

Ordering (the copy of step n+1 must not read the host cache before step n's write is complete): the
write-back is finished on the host before `attend` returns, hence before the engine releases the layer.
The prefetcher only issues the layer's next copy after that release: while a streamed item is held, at
most depth - 1 <= (number of streamed items) - 1 later acquisitions can be issued, so the next copy of
this same layer cannot have been issued yet. On the CPU fallback the copy thread reads the host cache
only for copies submitted after the release, i.e. after the write.

This is the simple, correct version: the write-back blocks the host once per such layer per step (the
event sync). A fully asynchronous version would queue the D2H write on the copy stream itself (stream
order then puts it before the next H2D of the cache) and scatter on the device into a pinned mirror;
not done.
"""
from __future__ import annotations

import torch

import cpu_kernels
from offload.devices import same_device
from offload.attention.contract import Chunk, allocate_kv, layer_attention
from offload.attention.device import attend_cache
from offload.attention.host import HostStaging
from placement.architecture import Architecture

K_CACHE, V_CACHE = "kv_cache.k", "kv_cache.v"     # names of the attached tensors in the layer's item


def kv_attachment(*, max_batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The zeroed host tensors to attach to a layer's weight item (PlacedWeights packs them)."""
    k, v = allocate_kv(max_batch_size=max_batch_size, num_kv_heads=num_kv_heads, max_seq_len=max_seq_len,
                       head_dim=head_dim, dtype=dtype, device="cpu")
    return {K_CACHE: k, V_CACHE: v}


class StreamedKVAttention:
    """Attention backend over a host cache streamed through the weight ring (see the module docstring)."""

    def __init__(self, *, host_k: torch.Tensor, host_v: torch.Tensor, device, staging: HostStaging | None = None,
                 sliding_window: int | None = None, scale: float | None = None, softcap: float | None = None):
        assert host_k.shape == host_v.shape and host_k.dim() == 4, (host_k.shape, host_v.shape)
        assert host_k.device.type == "cpu" and host_k.is_contiguous() and host_v.is_contiguous()
        self.host_k, self.host_v = host_k, host_v           # [B_max, Hkv, S_max, D] views into the packed item
        self.device = torch.device(device)
        self.max_batch_size, self.max_seq_len = host_k.shape[0], host_k.shape[2]
        self.sliding_window, self.scale, self.softcap = sliding_window, scale, softcap
        self.is_copying = self.device.type == "cuda"
        if self.is_copying and staging is None:
            staging = HostStaging(self.device)
        self.staging = staging

    @classmethod
    def for_layer(cls, arch: Architecture, layer: int, *, scale: float | None, **kwargs) -> "StreamedKVAttention":
        return cls(**layer_attention(arch, layer, scale), **kwargs)

    @property
    def cache_bytes(self) -> int:
        """Host bytes of this layer's cache (its device copy lives in a ring slot, counted as buffers)."""
        return 2 * self.host_k.numel() * self.host_k.element_size()

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, chunk: Chunk,
               weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """`weights`: the layer's acquired tensors, among them the (k, v) device copies of its cache in the
        ring slot, [B_max, Hkv, S_max, D]. Returns [B, Hq, T, D] on q's device; the host cache holds the new
        tokens when this returns."""
        k_slot, v_slot = weights[K_CACHE], weights[V_CACHE]
        B = q.shape[0]
        assert k_slot.shape == self.host_k.shape and k_slot.device == q.device, \
            (k_slot.shape, self.host_k.shape, k_slot.device, q.device)
        assert same_device(q.device, self.device), (q.device, self.device)
        assert B <= self.max_batch_size and chunk.num_keys <= self.max_seq_len, (B, chunk.lengths)
        out = attend_cache(k_slot, v_slot, q, k_new, v_new, chunk,
                           sliding_window=self.sliding_window, scale=self.scale, softcap=self.softcap)
        cache_dtype = self.host_k.dtype
        if self.is_copying:
            host = self.staging.to_host({"k": (k_new, cache_dtype), "v": (v_new, cache_dtype)})
            k_h, v_h = host["k"], host["v"]
        else:
            k_h, v_h = k_new.to(cache_dtype), v_new.to(cache_dtype)
        # write-back before release (ordering: module docstring)
        cpu_kernels.append_kv(self.host_k[:B], self.host_v[:B], k_h.contiguous(), v_h.contiguous(), chunk.start)
        return out
