"""Attention where the KV cache lives: a layer's cache in (pinned) host memory, attended on the CPU.

`HostAttention` implements the attention-backend contract of offload/attention/contract.py for a layer whose plan
says kv "cpu" + attention "cpu". Per call, only q and the new k, v (a few KB per token) cross to the host
and the output [B, Hq, T, D] comes back; the cache itself never crosses PCIe:

    compute device            host (pinned staging)                 host cache [B_max, Hkv, S_max, D]
    q, k_new, v_new  --D2H-->  q (float32), k, v   -- HostCache.append_and_attend -->  k_cache, v_cache,
                                                       (one Numba launch)                out (float32)
    out              <--H2D--  out (compute dtype)

On the CPU fallback (compute device = CPU), and for a layer computed on the CPU (q arrives on the CPU),
there are no copies: the kernels take the tensors directly.
All HostAttention layers of a model share one `HostStaging` (the calls run one after another on one
compute stream; see `HostStaging` for why sharing is safe).
"""
from __future__ import annotations

import math
import time

import torch

import cpu_kernels
from offload.devices import same_device
from offload.weights.host_memory import allocate_host_bytes
from offload.attention.contract import Chunk, OwnedCache


def allocate_host_kv(*, max_batch_size: int, num_kv_heads: int, max_seq_len: int,
                     head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's k and v caches in host memory, each [B_max, Hkv, S_max, D], zeroed and contiguous.

    Pageable: the CPU attends over it where it lies, so it never crosses PCIe and pinning it would only
    take locked memory from the OS (only the small staging buffers below are pinned)."""
    shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
    num_bytes = math.prod(shape) * dtype.itemsize
    # zeroed (allocate_host_bytes' memory is): masked slots are multiplied by 0, and 0 * NaN would be NaN
    caches = tuple(allocate_host_bytes(num_bytes, pin=False).view(dtype).view(shape) for _ in range(2))
    assert all(cache.is_contiguous() and cache.device.type == "cpu" for cache in caches)
    return caches


class HostStaging:
    """Pinned host buffers that q, k_new, v_new and the output pass through, grown on demand.

    Shared by every HostAttention layer of a model, and by the MoE layers whose routed experts the CPU computes
    (offload/models/moe.py). Safe because each call first waits (event sync) for
    its own device->host copies, which were queued on the compute stream after the previous call's
    host->device copy of its output from these same buffers: by the time the host writes a buffer
    again, every earlier copy reading it has completed.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: dict[str, torch.Tensor] = {}
        self.wait_seconds = 0.0          # host time blocked waiting for the D2H copies
        self.host_to_device_bytes = 0    # outputs sent back to the compute device

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A pinned contiguous [shape] tensor of `dtype` (reused; contents undefined)."""
        num_bytes = math.prod(shape) * dtype.itemsize
        flat = self._buffers.get(name)
        if flat is None or flat.numel() < num_bytes:
            # replacing a buffer is safe for the same reason as sharing it: every copy that read or wrote
            # the old one was queued before the last event sync (see the class docstring)
            flat = allocate_host_bytes(max(num_bytes, 2 * (0 if flat is None else flat.numel())), pin=True)
            self._buffers[name] = flat
        out = flat[:num_bytes].view(dtype).view(shape)
        assert out.is_contiguous()
        return out

    def send(self, tensors: dict[str, tuple[torch.Tensor, torch.dtype]]) -> tuple[dict[str, torch.Tensor],
                                                                                  torch.cuda.Event]:
        """Queue copies of device tensors into staging buffers (non-blocking) and mark the compute stream after
        them: the caller may queue more device work (it runs while the host computes), then `wait`s for these
        copies alone before reading the buffers."""
        out = {}
        for name, (tensor, dtype) in tensors.items():
            out[name] = self.buffer(name, tuple(tensor.shape), dtype)
            out[name].copy_(tensor, non_blocking=True)      # D2H into pinned memory: asynchronous
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return out, event

    def wait(self, event: torch.cuda.Event) -> None:
        """Block the host until the copies `send` queued before `event` have landed."""
        start = time.perf_counter()
        event.synchronize()
        self.wait_seconds += time.perf_counter() - start

    def to_host(self, tensors: dict[str, tuple[torch.Tensor, torch.dtype]]) -> dict[str, torch.Tensor]:
        """Copy device tensors into staging buffers (non-blocking), then wait for all of them at once."""
        # The one sync of the call: the kernels below read these buffers on the host, so the copies
        # (queued on the compute stream behind the kernels producing q, k, v) must have landed.
        out, event = self.send(tensors)
        self.wait(event)
        return out

    def to_device(self, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Send a host result to the compute device through a pinned buffer (non-blocking)."""
        staged = self.buffer("out", tuple(out.shape), dtype)
        staged.copy_(out)
        self.host_to_device_bytes += staged.numel() * staged.element_size()
        # asynchronous H2D; the next host write of this buffer happens after a later sync (class docstring)
        return staged.to(self.device, non_blocking=True)


class HostAttention(OwnedCache):
    """KV cache in host memory, attention by cpu_kernels on the host (see the module docstring)."""

    def __init__(self, *, max_batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, staging: HostStaging | None = None,
                 sliding_window: int | None = None, scale: float | None = None, softcap: float | None = None):
        assert max_batch_size > 0 and max_seq_len > 0, (max_batch_size, max_seq_len)
        self.device = torch.device(device)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.sliding_window, self.scale, self.softcap = sliding_window, scale, softcap
        self.is_copying = self.device.type == "cuda"
        if self.is_copying and staging is None:
            staging = HostStaging(self.device)
        self.staging = staging
        self.k_cache, self.v_cache = allocate_host_kv(
            max_batch_size=max_batch_size, num_kv_heads=num_kv_heads, max_seq_len=max_seq_len,
            head_dim=head_dim, dtype=dtype)
        self.kernels = cpu_kernels.HostCache.of(self.k_cache, self.v_cache)     # checked once, not per token

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, chunk: Chunk,
               weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Append k_new/v_new [B, Hkv, T, D] to the host cache at the chunk's start, attend q [B, Hq, T, D]
        over each row's first `lengths[b]` positions on the host; returns [B, Hq, T, D] on q's device."""
        B, Hq, T, D = q.shape
        # q on the compute device, or on the CPU for a layer computed there (compute "cpu": no copies)
        assert same_device(q.device, self.device) or q.device.type == "cpu", (q.device, self.device)
        copying = self.is_copying and q.device.type != "cpu"
        assert B <= self.max_batch_size and (B, T) == (chunk.batch_size, chunk.num_tokens), (q.shape, chunk)
        assert chunk.num_keys <= self.max_seq_len, (chunk.lengths, self.max_seq_len)
        start = chunk.start                                               # [B], host
        cache_dtype = self.k_cache.dtype
        kv_dtype = cache_dtype if k_new.dtype == cache_dtype else torch.float32
        if copying:
            host = self.staging.to_host({"q": (q, torch.float32), "k": (k_new, kv_dtype),
                                         "v": (v_new, kv_dtype)})
            q_h, k_h, v_h = host["q"], host["k"], host["v"]
        else:                                                # the CPU fallback: no copies at all
            q_h, k_h, v_h = q.float(), k_new.to(kv_dtype), v_new.to(kv_dtype)
        out = self.kernels.append_and_attend(q_h, k_h, v_h, start, scale=self.scale,    # [B, Hq, T, D] f32
                                             sliding_window=self.sliding_window, softcap=self.softcap,
                                             ancestors=chunk.ancestors)
        if copying:
            return self.staging.to_device(out, q.dtype)
        return out.to(q.dtype)
