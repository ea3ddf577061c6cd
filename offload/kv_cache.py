"""Per-layer KV caches and the attention that reads them: the attention-backend contract and its torch form.

The engine calls, for every decoder layer, that layer's backend:

    backend.attend(q, k_new, v_new, start, lengths) -> out
      q:      [B, Hq, T, D]  on the compute device
      k_new:  [B, Hkv, T, D] (v_new likewise), already position-encoded
      start:  [B] int64 on the CPU, where row b's T new tokens are written (positions start[b] .. start[b]+T-1)
      lengths:[B] int64 on the CPU, valid cache length of row b INCLUDING the T new tokens (= start + T);
              query t of row b sits at position lengths[b] - T + t and attends causally to 0..that position
              (and only to the last `sliding_window` of them when the layer has one)
      out:    [B, Hq, T, D]  on the compute device

start/lengths stay on the host so no backend needs a device sync to read them.
Rows are the first B rows of a cache preallocated for max_batch_size x max_seq_len. Slots past a row's
length may hold stale values: they are never attended, and are overwritten before they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from placement.architecture import Architecture


def allocate_kv(*, max_batch_size: int, num_kv_heads: int, max_seq_len: int, head_dim: int,
                dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's k and v caches, each [B_max, Hkv, S_max, D], zeroed and contiguous."""
    shape = (max_batch_size, num_kv_heads, max_seq_len, head_dim)
    k = torch.zeros(shape, dtype=dtype, device=device)
    v = torch.zeros(shape, dtype=dtype, device=device)
    return k, v


def attention_mask(start: torch.Tensor, T: int, num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: key j visible to query t of row b iff j <= pos and j > pos - window."""
    query_pos = start[:, None] + torch.arange(T, device=start.device)[None, :]     # [B, T]
    keys = torch.arange(num_keys, device=start.device)[None, None, :]                # [1, 1, S]
    mask = keys <= query_pos[..., None]                                              # [B, T, S]
    if sliding_window is not None:
        mask &= keys > query_pos[..., None] - sliding_window
    return mask[:, None]


class TorchAttention:
    """KV cache on the compute device, attention by torch SDPA with a per-row mask (GQA by head groups)."""

    def __init__(self, *, max_batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, sliding_window: int | None = None, scale: float | None = None):
        assert max_batch_size > 0 and max_seq_len > 0, (max_batch_size, max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.sliding_window, self.scale = sliding_window, scale
        self.k_cache, self.v_cache = allocate_kv(max_batch_size=max_batch_size, num_kv_heads=num_kv_heads,
                                                 max_seq_len=max_seq_len, head_dim=head_dim, dtype=dtype,
                                                 device=device)

    @classmethod
    def for_layer(cls, arch: Architecture, layer: int, *, scale: float | None, **kwargs) -> "TorchAttention":
        return cls(num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                   sliding_window=arch.window_of(layer), scale=scale, **kwargs)

    uses_streamed_cache = False        # the engine passes no ring views (see offload/streamed_kv.py)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, start: torch.Tensor,
               lengths: torch.Tensor) -> torch.Tensor:
        """Append the new k/v, then attend causally over each row's cache. Returns [B, Hq, T, D]."""
        assert q.device == self.k_cache.device, (q.device, self.k_cache.device)
        assert q.shape[0] <= self.max_batch_size, (q.shape, self.max_batch_size)
        return attend_cache(self.k_cache, self.v_cache, q, k_new, v_new, start, lengths,
                            sliding_window=self.sliding_window, scale=self.scale)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             start: torch.Tensor) -> None:
    """Write k_new/v_new [B, Hkv, T, D] into caches [B_max, Hkv, S_max, D] at start[b] .. start[b]+T-1."""
    B, _, T, _ = k_new.shape
    assert k_new.shape == v_new.shape and k_new.shape[1:2] + k_new.shape[3:] == \
        k_cache.shape[1:2] + k_cache.shape[3:], (k_new.shape, k_cache.shape)
    assert B <= k_cache.shape[0] and start.shape == (B,) and start.device == k_cache.device, (B, start)
    pos = start[:, None] + torch.arange(T, device=start.device)[None, :]          # [B, T]
    rows = torch.arange(B, device=start.device)[:, None].expand(B, T)             # [B, T]
    # cache[rows, :, pos] is [B, T, Hkv, D]
    k_cache[rows, :, pos] = k_new.transpose(1, 2).to(k_cache.dtype)
    v_cache[rows, :, pos] = v_new.transpose(1, 2).to(v_cache.dtype)


def attend_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, start: torch.Tensor, lengths: torch.Tensor, *,
                 sliding_window: int | None, scale: float | None) -> torch.Tensor:
    """Append k_new/v_new to caches [B_max, Hkv, S_max, D] on q's device, then SDPA over each row's
    valid keys (causal, optional sliding window, GQA by head groups). Returns [B, Hq, T, D]."""
    B, Hq, T, D = q.shape
    assert q.device == k_cache.device == v_cache.device, (q.device, k_cache.device)
    assert start.device.type == "cpu" and lengths.device.type == "cpu", "start/lengths live on the host"
    assert bool((lengths == start + T).all()), (start, lengths, T)
    num_keys = int(lengths.max())
    assert num_keys <= k_cache.shape[2], (num_keys, k_cache.shape)
    start = start.to(q.device, non_blocking=True)
    write_kv(k_cache, v_cache, k_new, v_new, start)
    k = k_cache[:B, :, :num_keys]                                                    # [B, Hkv, S, D]
    v = v_cache[:B, :, :num_keys]
    groups = Hq // k.shape[1]
    if groups > 1:   # GQA: each kv head serves `groups` consecutive q heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if T == 1 and sliding_window is None and bool((lengths == num_keys).all()):     # host values
        mask = None  # one query per row, every cached key visible: no mask needed
    else:
        mask = attention_mask(start, T, num_keys, sliding_window)
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
