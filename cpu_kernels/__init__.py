"""Numba attention kernels for layers whose KV cache lives in CPU RAM.

    out = cpu_kernels.attention(q, k_cache, v_cache, lengths, scale=None, sliding_window=None,
                                softcap=None)
    cpu_kernels.append_kv(k_cache, v_cache, k_new, v_new, positions)

q and out are float32 [B, Hq, T, D]; caches are contiguous [B, Hkv, S_max, D] float32, bfloat16 or
float16 tensors on the CPU (pinned or not). numpy/numba at the core, torch only at this edge.
"""
from .ops import append_kv, attention

__all__ = ["attention", "append_kv"]
