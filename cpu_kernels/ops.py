"""Torch-facing entry points: `attention` over a CPU KV cache and `append_kv` into it.

Both check their inputs (ValueError naming the offending shapes/dtypes), hand zero-copy numpy views of
the caches to the Numba kernels, and run with the GIL released inside the kernel, so that a runtime
thread can overlap CPU attention with other work. The thread count follows `numba.set_num_threads`
(or NUMBA_NUM_THREADS).
"""
import math
import numbers
import threading

import numba
import numpy as np
import torch

from ._append_kernel import COPY, TO_BF16, TO_F16, append_rows
from ._attention_kernel import attend, tile_queries
from ._checks import cache_view, check_caches, require_tensor, row_vector

# Numba's 'workqueue' threading layer (the fallback when neither TBB nor OpenMP is available) aborts
# the process when two threads launch parallel kernels at once; serialise launches in that case.
_LAUNCH_LOCK = threading.Lock()

# softcap travels as float32 and the kernel multiplies by 1 / softcap: keep both finite and non-zero
_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _needs_launch_lock() -> bool:
    try:
        return numba.threading_layer() == "workqueue"
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        return True


def _launch(kernel, *args) -> None:
    # chunk size 1: work items of ragged rows differ in cost, so hand them out one at a time
    with numba.parallel_chunksize(1):
        if _needs_launch_lock():
            with _LAUNCH_LOCK:
                kernel(*args)
        else:
            kernel(*args)


def attention(q, k_cache, v_cache, lengths, scale=None, sliding_window=None, softcap=None,
              ancestors=None) -> torch.Tensor:
    """Causal attention of T new queries per row over a CPU KV cache that already holds them.

    q: float32 [B, Hq, T, D]; k_cache, v_cache: contiguous [B, Hkv, S_max, D] float32, bfloat16 or
    float16; lengths: int [B], valid cache positions of each row including the T new ones. Query t of
    row b sits at position lengths[b] - T + t and sees positions up to its own (only the last
    `sliding_window` of them when given). Query head h reads KV head h // (Hq // Hkv).
    scale defaults to 1 / sqrt(D). softcap (Gemma 2's attn_logit_softcapping): each score
    s = scale * q.k becomes softcap * tanh(s / softcap) before masking and softmax; None: no cap.
    ancestors: a token tree's bool [T, T] (B = 1; offload/attention/contract.py): query t sees the cached keys
    before the T new ones and, of these, the ones its row marks; it sits at logical position lengths[0] - T +
    depth(t) (depth: its row's count less one), as do the keys, for the sliding window. None: causal.
    Returns float32 [B, Hq, T, D].
    """
    check_caches(k_cache, v_cache)
    require_tensor("q", q, 4)
    if q.dtype != torch.float32:
        raise ValueError(f"q must be float32, got {q.dtype} with shape {tuple(q.shape)}")
    num_rows, num_heads, num_queries, head_dim = q.shape
    cache_rows, num_kv_heads, max_len, cache_dim = k_cache.shape
    if num_rows != cache_rows or head_dim != cache_dim:
        raise ValueError(f"q {tuple(q.shape)} [B, Hq, T, D] does not match caches "
                         f"{tuple(k_cache.shape)} [B, Hkv, S_max, D] in B or D")
    if num_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_heads}, shape {tuple(q.shape)}) must be a positive multiple of "
                         f"the cache's KV heads ({num_kv_heads}, shape {tuple(k_cache.shape)})")
    if num_queries == 0:
        raise ValueError(f"q must hold at least one query (T >= 1), got shape {tuple(q.shape)}")
    lengths_np = row_vector("lengths", lengths, num_rows)
    if lengths_np.min() < num_queries or lengths_np.max() > max_len:
        raise ValueError(f"lengths must lie in [T, S_max] = [{num_queries}, {max_len}] (they include "
                         f"the T new tokens already in the cache), got {lengths_np.tolist()}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    window = 0
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral) \
                or sliding_window < 1:
            raise ValueError(f"sliding_window must be None or an integer >= 1, got {sliding_window!r}")
        window = int(sliding_window)
    scale = float(scale)
    cap = 0.0  # the kernel's "no cap": it then evaluates no tanh
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) \
                or not _FLOAT32_TINY <= softcap <= _FLOAT32_MAX:
            raise ValueError(f"softcap must be None or a positive finite number (a normal float32), "
                             f"got {softcap!r}")
        cap = float(softcap)

    tree, depth = np.zeros((0, 0), np.uint8), np.zeros(0, np.int64)
    if ancestors is not None:
        if not (isinstance(ancestors, torch.Tensor) and ancestors.dtype == torch.bool
                and ancestors.shape == (num_queries, num_queries) and num_rows == 1):
            raise ValueError(f"ancestors must be a bool [T, T] = [{num_queries}, {num_queries}] tensor of one row's "
                             f"tree, got {getattr(ancestors, 'dtype', type(ancestors))} "
                             f"{tuple(getattr(ancestors, 'shape', ()))} for {num_rows} rows")
        tree = ancestors.cpu().numpy().astype(np.uint8)
        if not (tree.diagonal().all() and not np.triu(tree, 1).any()):
            raise ValueError("ancestors must mark each token itself and only earlier tokens (a tree in order)")
        depth = tree.sum(axis=1).astype(np.int64) - 1

    q_np = q.detach().contiguous().numpy()  # q is small: [B, Hq, T, D]
    out = torch.empty((num_rows, num_heads, num_queries, head_dim), dtype=torch.float32)
    _launch(attend, q_np, cache_view(k_cache, fp16_as_int16=True), cache_view(v_cache, fp16_as_int16=True),
            lengths_np, np.float32(scale), window, np.float32(cap), tree, depth, out.numpy(),
            tile_queries(num_queries, num_heads // num_kv_heads))
    return out


def append_kv(k_cache, v_cache, k_new, v_new, positions) -> None:
    """Write new tokens into the caches in place: row b's T tokens go to positions[b] .. + T - 1.

    k_new, v_new: [B, Hkv, T, D], float32 (rounded to the cache dtype to nearest-even, exactly as
    torch's `.to(dtype)`) or already the cache dtype; positions: int [B].
    """
    check_caches(k_cache, v_cache)
    require_tensor("k_new", k_new, 4)
    require_tensor("v_new", v_new, 4)
    if k_new.shape != v_new.shape or k_new.dtype != v_new.dtype:
        raise ValueError(f"k_new and v_new must match in shape and dtype, got {tuple(k_new.shape)} "
                         f"{k_new.dtype} and {tuple(v_new.shape)} {v_new.dtype}")
    if k_new.dtype not in (torch.float32, k_cache.dtype):
        raise ValueError(f"k_new/v_new must be float32 or the cache dtype {k_cache.dtype}, got {k_new.dtype}")
    num_rows, num_kv_heads, num_new, head_dim = k_new.shape
    cache_rows, cache_heads, max_len, cache_dim = k_cache.shape
    if (num_rows, num_kv_heads, head_dim) != (cache_rows, cache_heads, cache_dim) or num_new == 0:
        raise ValueError(f"k_new/v_new {tuple(k_new.shape)} [B, Hkv, T>=1, D] do not match caches "
                         f"{tuple(k_cache.shape)} [B, Hkv, S_max, D]")
    positions_np = row_vector("positions", positions, num_rows)
    if positions_np.min() < 0 or positions_np.max() + num_new > max_len:
        raise ValueError(f"positions must lie in [0, S_max - T] = [0, {max_len - num_new}] so that T = "
                         f"{num_new} tokens fit, got {positions_np.tolist()}")

    if k_new.dtype == k_cache.dtype:
        mode = COPY
    else:  # float32 into a 16-bit cache
        mode = TO_BF16 if k_cache.dtype == torch.bfloat16 else TO_F16
    k_src = cache_view(k_new.detach().contiguous(), fp16_as_int16=False)
    v_src = cache_view(v_new.detach().contiguous(), fp16_as_int16=False)
    _launch(append_rows, cache_view(k_cache, fp16_as_int16=False), cache_view(v_cache, fp16_as_int16=False),
            k_src, v_src, positions_np, mode)
