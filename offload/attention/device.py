"""KV cache on the compute device, attended there by torch: the attention backend of the plan's "gpu" KV.

SDPA (GQA by its head groups) for every layer, or, for a layer with soft-capped scores (Gemma 2), the same
math written out (SDPA has no soft-capping). `attend_cache` is shared with the backend whose host cache is
streamed through the ring (offload/attention/streamed.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.attention.contract import Chunk, OwnedCache, allocate_kv
from offload.devices import same_device


class TorchAttention(OwnedCache):
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
    scores = torch.matmul(q, k.transpose(2, 3))                                        # [B, Hq, T, S]
    # in place: the workspace holds the scores and their float32 softmax, no more (placement/workspace.py)
    scores.mul_(q.shape[-1] ** -0.5 if scale is None else scale).div_(softcap).tanh_().mul_(softcap)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype), v)
