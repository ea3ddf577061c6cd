"""Reference attention for the kernel tests: torch's SDPA, row by row, with an explicit boolean mask, and
a plain eager version (scores, optional logit soft-cap, mask, softmax) for what SDPA cannot express."""
import torch
import torch.nn.functional as F


def visible_mask(length: int, num_queries: int, sliding_window=None) -> torch.Tensor:
    """[T, length] bool: query t (at position length - T + t) sees positions <= its own, within the window."""
    positions = torch.arange(length - num_queries, length)[:, None]  # [T, 1]
    keys = torch.arange(length)[None, :]  # [1, L]
    mask = keys <= positions
    if sliding_window is not None:
        mask &= keys > positions - sliding_window
    return mask


def reference_attention(q, k_cache, v_cache, lengths, scale=None, sliding_window=None,
                        dtype=torch.float64) -> torch.Tensor:
    """SDPA per row over the first lengths[b] cache positions, computed in `dtype`; returns float32."""
    # q: [B, Hq, T, D]; caches: [B, Hkv, S_max, D]
    num_rows, num_heads, num_queries, _ = q.shape
    group = num_heads // k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for b in range(num_rows):
        length = int(lengths[b])
        k = k_cache[b, :, :length].to(dtype).repeat_interleave(group, dim=0)  # [Hq, L, D]
        v = v_cache[b, :, :length].to(dtype).repeat_interleave(group, dim=0)
        mask = visible_mask(length, num_queries, sliding_window)
        out[b] = F.scaled_dot_product_attention(q[b].to(dtype), k, v, attn_mask=mask, scale=scale).float()
    return out


def plain_attention(q, k_cache, v_cache, lengths, scale=None, sliding_window=None, softcap=None,
                    dtype=torch.float64) -> torch.Tensor:
    """Eager attention spelled out (no SDPA), as transformers' Gemma 2 does it: scores = scale * q k^T,
    then softcap * tanh(scores / softcap) when softcap is given, then the mask, softmax and @ v."""
    # q: [B, Hq, T, D]; caches: [B, Hkv, S_max, D]
    num_rows, num_heads, num_queries, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.empty(q.shape, dtype=torch.float32)
    for b in range(num_rows):
        length = int(lengths[b])
        k = k_cache[b, :, :length].to(dtype).repeat_interleave(group, dim=0)  # [Hq, L, D]
        v = v_cache[b, :, :length].to(dtype).repeat_interleave(group, dim=0)
        scores = q[b].to(dtype) @ k.transpose(1, 2) * scale  # [Hq, T, L]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        mask = visible_mask(length, num_queries, sliding_window)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[b] = (torch.softmax(scores, dim=-1) @ v).float()
    return out


def random_caches(num_rows, num_kv_heads, max_len, head_dim, dtype, generator):
    """Random K/V caches [B, Hkv, S_max, D] in `dtype`."""
    shape = (num_rows, num_kv_heads, max_len, head_dim)
    k = torch.randn(shape, generator=generator).to(dtype)
    v = torch.randn(shape, generator=generator).to(dtype)
    return k, v
