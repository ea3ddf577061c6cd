"""The attention-backend contract: what the engine calls for every decoder layer, and the chunk it passes.

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

A chunk may carry a token tree (speculative decoding verifying several draft continuations in one pass, one
row): `ancestors` [T, T] says which of the chunk's tokens each query sees besides the whole cached prefix
before `start` (itself and its ancestors); token t then sits at logical position start + depth(t) (what
RoPE and sliding windows see), though it is written to slot start + t like any chunk token.

start/lengths stay on the host so no backend needs a device sync to read them; what the device needs of
them is copied once per chunk, without blocking (pinned, non_blocking).
Rows are the first B rows of a cache preallocated for max_batch_size x max_seq_len. Slots past a row's
length may hold stale values: they are never attended, and are overwritten before they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from offload.devices import to_device


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


def tree_mask(start: int, ancestors: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Boolean [1, 1, T, start + T] mask of a token tree's chunk (one row, host): query t sees every cached key
    before `start` and the chunk keys its row of `ancestors` [T, T] marks; with a window, only keys whose
    logical positions (prefix: their slot; chunk token u: start + depth(u)) are within it of the query's."""
    T = ancestors.shape[0]
    assert ancestors.shape == (T, T) and ancestors.dtype == torch.bool and ancestors.device.type == "cpu"
    depth = ancestors.sum(dim=1) - 1                                                  # [T]
    visible = torch.ones(T, start + T, dtype=torch.bool)
    visible[:, start:] = ancestors
    if sliding_window is not None:
        key_pos = torch.arange(start + T)
        key_pos[start:] = start + depth
        visible &= key_pos[None, :] > (start + depth)[:, None] - sliding_window
    return visible[None, None]


@dataclass(eq=False)
class Chunk:
    """The positions of one chunk of T tokens per row, shared by every layer's attention backend.

    Built once per chunk by the engine; what a device-side backend needs (write positions, masks) is made
    on first use and reused by the other layers of the chunk."""

    start: torch.Tensor             # [B] int64, host: row b's tokens go to cache slots start[b] ..
    num_tokens: int                 # T
    device: torch.device            # the compute device
    ancestors: torch.Tensor | None = None   # [T, T] bool, host: a token tree's (module docstring); one row
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
        if self.ancestors is not None:
            T = self.num_tokens
            assert self.batch_size == 1 and self.ancestors.shape == (T, T), (self.start, self.ancestors.shape)
            assert bool(self.ancestors.diagonal().all()) and not bool(self.ancestors.triu(1).any()), \
                "a token sees itself and earlier tokens only (its ancestors come before it)"

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
            if self.ancestors is not None:
                mask = to_device(tree_mask(int(self.start[0]), self.ancestors, sliding_window), self.device)
            else:
                mask = attention_mask(to_device(self.start, self.device), self.num_tokens, self.num_keys,
                                      sliding_window)
            self._masks[sliding_window] = mask
        return self._masks[sliding_window]


def layer_attention(arch, layer: int, scale: float | None) -> dict:
    """What every backend of decoder layer `layer` needs to know of the model's attention (keywords)."""
    return dict(sliding_window=arch.window_of(layer), scale=scale, softcap=arch.attn_logit_softcap)


class OwnedCache:
    """Base of a backend that owns its layer's `k_cache` and `v_cache` (on the device or on the host) and
    takes the model's attention options by keyword."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    @classmethod
    def for_layer(cls, arch, layer: int, *, scale: float | None, **kwargs):
        return cls(num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim, **layer_attention(arch, layer, scale),
                   **kwargs)

    @property
    def cache_bytes(self) -> int:
        """Bytes of this layer's k and v caches."""
        return 2 * self.k_cache.numel() * self.k_cache.element_size()


class AttentionBackend(Protocol):
    """One layer's KV cache and the attention over it (see the module docstring)."""

    @property
    def cache_bytes(self) -> int:
        """Bytes of this layer's cache (where it lives is the backend's)."""

    def attend(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, chunk: Chunk,
               weights: dict[str, torch.Tensor]) -> torch.Tensor: ...
