"""Numba kernel that writes new K/V tokens into a CPU KV cache, narrowing float32 to the cache dtype."""
import numpy as np
from numba import njit, prange

from ._bits import narrow_bf16, narrow_f16

# modes: how a source element becomes a cache element
COPY = 0  # same dtype (float32 -> float32, or 16-bit bits -> the same 16-bit bits)
TO_BF16 = 1  # float32 -> bfloat16 bits, round-to-nearest-even
TO_F16 = 2  # float32 -> float16 bits, round-to-nearest-even


@njit(parallel=True, nogil=True, cache=True)
def append_rows(k_cache, v_cache, k_new, v_new, positions, mode):
    """k_cache, v_cache: [B, Hkv, S_max, D]; k_new, v_new: [B, Hkv, T, D]; positions: [B] int64.

    Row b's tokens land at cache positions positions[b] .. positions[b] + T - 1.
    """
    for item in prange(k_new.shape[0] * k_new.shape[1]):
        append_item(k_cache, v_cache, k_new, v_new, positions, mode, item)


@njit(nogil=True, cache=True, inline="always")
def append_item(k_cache, v_cache, k_new, v_new, positions, mode, item):
    """append_rows' work for item = b * Hkv + h (row b, KV head h): on one thread, where the T tokens of a
    decode step are too few to pay for waking the others."""
    num_kv_heads, num_new, head_dim = k_new.shape[1], k_new.shape[2], k_new.shape[3]
    b = item // num_kv_heads
    h = item % num_kv_heads
    start = positions[b]
    for t in range(num_new):
        k_dst = k_cache[b, h, start + t]
        v_dst = v_cache[b, h, start + t]
        k_src = k_new[b, h, t]
        v_src = v_new[b, h, t]
        if mode == TO_BF16:
            for d in range(head_dim):
                k_dst[d] = narrow_bf16(np.float32(k_src[d]))
                v_dst[d] = narrow_bf16(np.float32(v_src[d]))
        elif mode == TO_F16:
            for d in range(head_dim):
                k_dst[d] = narrow_f16(np.float32(k_src[d]))
                v_dst[d] = narrow_f16(np.float32(v_src[d]))
        else:
            k_dst[:] = k_src
            v_dst[:] = v_src
