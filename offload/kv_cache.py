"""Per-layer KV caches and the attention that reads them: the attention-backend contract and its torch form.

The engine calls, for every decoder layer, that layer's backend:

    backend.attend(q, k_new, v_new, chunk, weights) -> out
      q:      [B, Hq, T, D]  on the compute device
      k_new:  [B, Hkv, T, D] (v_new likewise), already position-encoded
      chunk:  the chunk's `Chunk`, built once per chunk and shared by every layer: where row b's T new
              tokens are written (host `start`, start[b] .. start[b]+T-1), each row's valid cache length
              INCLUDING them (host `lengths` = start + T), and what every layer would otherwise rebuild
              (device copies of the write positions, masks per sliding window). Query t of row b sits at
              position lengths[b] - T + t and attends causally to 0..that position (and only to the last
              `sliding_window` of them when the layer has one)
      weights:the layer's acquired tensors (a backend whose cache travels with them reads it there)
      out:    [B, Hq, T, D]  on the compute device

start/lengths stay on the host so no backend needs a device sync to read them; what the device needs of
them is copied once per chunk, without blocking (pinned, non_blocking).
Rows are the first B rows of a cache preallocated for max_batch_size x max_seq_len. Slots past a row's
length may hold stale values: they are never attended, and are overwritten before they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from offload.devices import same_device, to_device
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


@dataclass(eq=False)
class Chunk:
    """The positions of one chunk of T tokens per row, shared by every layer's attention backend.

    Built once per chunk by the engine; what a device-side backend needs (write positions, masks) is made
    on first use and reused by the other layers of the chunk."""

    start: torch.Tensor             # [B] int64, host: row b's tokens go to cache slots start[b] ..
    num_tokens: int                 # T
    device: torch.device            # the compute device
    lengths: torch.Tensor = field(init=False)   # [B] int64, host: start + T
    num_keys: int = field(init=False)           # max(lengths): the cache prefix any row attends over
    _write_index: tuple[torch.Tensor, torch.Tensor] | None = field(init=False, default=None, repr=False)
    _masks: dict = field(init=False, default_factory=dict, repr=False)

    def __post_init__(self):
        assert self.start.device.type == "cpu" and self.start.dim() == 1, self.start
        assert self.start.dtype == torch.int64 and self.num_tokens >= 1, (self.start.dtype, self.num_tokens)
        self.lengths = self.start + self.num_tokens
        self.num_keys = int(self.lengths.max())
        # one query per row and every row as long as the longest: no mask unless a window cuts keys off
        self._is_full_decode = self.num_tokens == 1 and bool((self.lengths == self.num_keys).all())

    @property
    def batch_size(self) -> int:
        return self.start.shape[0]

    def write_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, slots), each [B, T] int64 on the compute device: where the new k/v go."""
        if self._write_index is None:
            B, T = self.batch_size, self.num_tokens
            slots = self.start[:, None] + torch.arange(T)[None, :]                  # [B, T] host
            rows = torch.arange(B)[:, None].expand(B, T).contiguous()              # [B, T] host
            self._write_index = (to_device(rows, self.device), to_device(slots, self.device))
        return self._write_index

    def mask(self, sliding_window: int | None) -> torch.Tensor | None:
        """Boolean [B, 1, T, S] on the compute device (S = num_keys), or None when every key is visible."""
        if self._is_full_decode and (sliding_window is None or self.num_keys <= sliding_window):
            return None
        if sliding_window not in self._masks:
            start = to_device(self.start, self.device)
            self._masks[sliding_window] = attention_mask(start, self.num_tokens, self.num_keys, sliding_window)
        return self._masks[sliding_window]


class AttentionBackend(Protocol):
    """One layer's KV cache and the attention over it (see the module docstring)."""

    @property
    def cache_bytes(self) -> int:
        """Bytes of this layer's cache (where it lives is the backend's)."""

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, chunk: Chunk,
               weights: dict[str, torch.Tensor]) -> torch.Tensor: ...


class TorchAttention:
    """KV cache on the compute device, attention by torch SDPA with a per-row mask (GQA by head groups)."""

    def __init__(self, *, max_batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device, sliding_window: int | None = None, scale: float | None = None,
                 softcap: float | None = None):
        assert max_batch_size > 0 and max_seq_len > 0, (max_batch_size, max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.sliding_window, self.scale, self.softcap = sliding_window, scale, softcap
        self.k_cache, self.v_cache = allocate_kv(max_batch_size=max_batch_size, num_kv_heads=num_kv_heads,
                                                 max_seq_len=max_seq_len, head_dim=head_dim, dtype=dtype,
                                                 device=device)

    @classmethod
    def for_layer(cls, arch: Architecture, layer: int, *, scale: float | None, **kwargs) -> "TorchAttention":
        return cls(num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, sliding_window=arch.window_of(layer),
                   scale=scale, softcap=arch.attn_logit_softcap, **kwargs)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, chunk: Chunk,
               weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Append the new k/v, then attend causally over each row's cache. Returns [B, Hq, T, D]."""
        assert q.shape[0] <= self.max_batch_size, (q.shape, self.max_batch_size)
        return attend_cache(self.k_cache, self.v_cache, q, k_new, v_new, chunk,
                            sliding_window=self.sliding_window, scale=self.scale, softcap=self.softcap)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             chunk: Chunk) -> None:
    """Write k_new/v_new [B, Hkv, T, D] into caches [B_max, Hkv, S_max, D] at the chunk's slots."""
    B, _, T, _ = k_new.shape
    assert k_new.shape == v_new.shape and k_new.shape[1:2] + k_new.shape[3:] == \
        k_cache.shape[1:2] + k_cache.shape[3:], (k_new.shape, k_cache.shape)
    assert B <= k_cache.shape[0] and (B, T) == (chunk.batch_size, chunk.num_tokens), (k_new.shape, chunk)
    rows, slots = chunk.write_index()                                               # [B, T] each
    # cache[rows, :, slots] is [B, T, Hkv, D]
    k_cache[rows, :, slots] = k_new.transpose(1, 2).to(k_cache.dtype)
    v_cache[rows, :, slots] = v_new.transpose(1, 2).to(v_cache.dtype)


def attend_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, chunk: Chunk, *, sliding_window: int | None,
                 scale: float | None, softcap: float | None = None) -> torch.Tensor:
    """Append k_new/v_new to caches [B_max, Hkv, S_max, D] on q's device, then attend over each row's
    valid keys (causal, optional sliding window, GQA by SDPA's head groups; with `softcap`, scores
    soft-capped before the softmax, which SDPA cannot do). Returns [B, Hq, T, D]."""
    B, Hq, T, D = q.shape
    assert q.device == k_cache.device == v_cache.device, (q.device, k_cache.device)
    assert same_device(q.device, chunk.device), (q.device, chunk.device)
    assert chunk.num_keys <= k_cache.shape[2], (chunk.num_keys, k_cache.shape)
    write_kv(k_cache, v_cache, k_new, v_new, chunk)
    k = k_cache[:B, :, :chunk.num_keys]                                               # [B, Hkv, S, D]
    v = v_cache[:B, :, :chunk.num_keys]
    if softcap is not None:
        return softcapped_attention(q, k.to(q.dtype), v.to(q.dtype), chunk.mask(sliding_window), scale=scale,
                                    softcap=softcap)
    # GQA: each kv head serves Hq / Hkv consecutive q heads; SDPA pairs them without copying k and v
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=chunk.mask(sliding_window),
                                          scale=scale, enable_gqa=Hq != k.shape[1])


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, *,
                         scale: float | None, softcap: float) -> torch.Tensor:
    """Attention with soft-capped scores, as transformers' eager Gemma 2 attention: scores = q k^T * scale,
    cap * tanh(scores / cap), masked, softmax in float32, cast back, times v.
    q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B, 1, T, S] or None -> [B, Hq, T, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:      # the math path expands k and v to every q head (budgeted in the workspace)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * (q.shape[-1] ** -0.5 if scale is None else scale)   # [B, Hq, T, S]
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)
