"""Torch-facing entry points: `attention` over a CPU KV cache and `append_kv` into it, and `HostCache`: a pair
of caches checked once, whose `append_and_attend` runs both in one launch (what a runtime calls per layer).

They check their inputs (ValueError naming the offending shapes/dtypes), hand zero-copy numpy views of
the caches to the Numba kernels, and run with the GIL released inside the kernel, so that a runtime
thread can overlap CPU attention with other work. The thread count follows `numba.set_num_threads`
(or NUMBA_NUM_THREADS).
"""
import copy
import math
import numbers
import threading
from dataclasses import dataclass

import numba
import numpy as np
import torch
from numba import njit

from ._append_kernel import COPY, TO_BF16, TO_F16, append_item, append_rows
from ._attention_kernel import NO_DEPTH, NO_TREE, attend, tile_queries
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
    q_np, out, options = _attention_args(q, k_cache.shape, scale, sliding_window, softcap, ancestors)
    lengths_np = _lengths(lengths, q.shape[0], q.shape[2], k_cache.shape[2])
    _launch(attend, q_np, cache_view(k_cache, fp16_as_int16=True), cache_view(v_cache, fp16_as_int16=True),
            lengths_np, *options, out.numpy(), tile_queries(q.shape[2], q.shape[1] // k_cache.shape[1]))
    return out


def append_kv(k_cache, v_cache, k_new, v_new, positions) -> None:
    """Write new tokens into the caches in place: row b's T tokens go to positions[b] .. + T - 1.

    k_new, v_new: [B, Hkv, T, D], float32 (rounded to the cache dtype to nearest-even, exactly as
    torch's `.to(dtype)`) or already the cache dtype; positions: int [B].
    """
    check_caches(k_cache, v_cache)
    k_src, v_src, positions_np, mode = _append_args(k_cache.shape, k_cache.dtype, k_new, v_new, positions)
    _launch(append_rows, cache_view(k_cache, fp16_as_int16=False), cache_view(v_cache, fp16_as_int16=False),
            k_src, v_src, positions_np, mode)


@dataclass(frozen=True, eq=False)
class HostCache:
    """A pair of CPU KV caches checked once, with the views the kernels read: for a runtime that appends and
    attends once per layer and token, where the checks and launches of `append_kv` then `attention` cost
    several times the work of a short cache (measured on 2 Zen 3 cores, a 200-token bfloat16 cache: ~225 us
    the two calls, ~150 this one, for ~50 us of kernel).

        cache = HostCache.of(k_cache, v_cache)
        out = cache.append_and_attend(q, k_new, v_new, positions)     # the two calls above, one kernel launch
    """

    k_cache: torch.Tensor           # [B_max, Hkv, S_max, D], contiguous, float32 / bfloat16 / float16
    v_cache: torch.Tensor
    k_bits: np.ndarray              # what append_rows writes: 16-bit caches as uint16
    v_bits: np.ndarray
    k_read: np.ndarray              # what attend reads: float16 as int16 (its widening follows the type)
    v_read: np.ndarray

    @classmethod
    def of(cls, k_cache: torch.Tensor, v_cache: torch.Tensor) -> "HostCache":
        check_caches(k_cache, v_cache)
        return cls(k_cache=k_cache, v_cache=v_cache,
                   k_bits=cache_view(k_cache, fp16_as_int16=False), v_bits=cache_view(v_cache, fp16_as_int16=False),
                   k_read=cache_view(k_cache, fp16_as_int16=True), v_read=cache_view(v_cache, fp16_as_int16=True))

    def __deepcopy__(self, memo) -> "HostCache":
        # the views must alias the copied tensors, not the originals
        return HostCache.of(copy.deepcopy(self.k_cache, memo), copy.deepcopy(self.v_cache, memo))

    def append_and_attend(self, q, k_new, v_new, positions, scale=None, sliding_window=None, softcap=None,
                          ancestors=None) -> torch.Tensor:
        """append_kv(k_cache[:B], v_cache[:B], k_new, v_new, positions), then attention(q, k_cache[:B],
        v_cache[:B], positions + T, ...) with the same arguments, in one launch; B = q's rows (at most the
        caches'). Nothing is written unless every argument passes its checks."""
        require_tensor("q", q, 4)
        require_tensor("k_new", k_new, 4)
        rows = q.shape[0]
        if not 1 <= rows <= self.k_cache.shape[0]:
            raise ValueError(f"q {tuple(q.shape)} [B, Hq, T, D] must have 1 to {self.k_cache.shape[0]} rows, "
                             f"the caches' {tuple(self.k_cache.shape)} [B, Hkv, S_max, D]")
        if k_new.shape[0] != rows or k_new.shape[2] != q.shape[2]:
            raise ValueError(f"k_new/v_new {tuple(k_new.shape)} [B, Hkv, T, D] must hold the B = {rows} rows of "
                             f"T = {q.shape[2]} tokens of q {tuple(q.shape)}")
        shape = (rows,) + tuple(self.k_cache.shape[1:])
        k_src, v_src, positions, mode = _append_args(shape, self.k_cache.dtype, k_new, v_new, positions)
        q_np, out, options = _attention_args(q, shape, scale, sliding_window, softcap, ancestors)
        _launch(append_then_attend, self.k_bits[:rows], self.v_bits[:rows], k_src, v_src, positions, mode, q_np,
                self.k_read[:rows], self.v_read[:rows], positions + q.shape[2], *options, out.numpy(),
                tile_queries(q.shape[2], q.shape[1] // shape[1]))
        return out


@njit(nogil=True, cache=True)
def append_then_attend(k_bits, v_bits, k_src, v_src, positions, mode, q, k, v, lengths, scale, window, softcap,
                       tree, depth, out, tile_t):
    """append_rows, then attend (their arguments in order; k_bits / k and v_bits / v: views of the same caches).
    One token a row (decode) is appended on this thread: too little to pay for waking the others."""
    if k_src.shape[2] == 1:
        for item in range(k_src.shape[0] * k_src.shape[1]):
            append_item(k_bits, v_bits, k_src, v_src, positions, mode, item)
    else:
        append_rows(k_bits, v_bits, k_src, v_src, positions, mode)
    attend(q, k, v, lengths, scale, window, softcap, tree, depth, out, tile_t)


def _attention_args(q, cache_shape, scale, sliding_window, softcap, ancestors) -> tuple:
    """Checks of `attention`'s arguments but the caches and lengths -> (q as numpy, out [B, Hq, T, D] float32,
    the kernel's (scale, window, softcap, tree, depth))."""
    require_tensor("q", q, 4)
    if q.dtype != torch.float32:
        raise ValueError(f"q must be float32, got {q.dtype} with shape {tuple(q.shape)}")
    num_rows, num_heads, num_queries, head_dim = q.shape
    cache_rows, num_kv_heads, max_len, cache_dim = cache_shape
    if num_rows != cache_rows or head_dim != cache_dim:
        raise ValueError(f"q {tuple(q.shape)} [B, Hq, T, D] does not match caches "
                         f"{tuple(cache_shape)} [B, Hkv, S_max, D] in B or D")
    if num_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"q heads ({num_heads}, shape {tuple(q.shape)}) must be a positive multiple of "
                         f"the cache's KV heads ({num_kv_heads}, shape {tuple(cache_shape)})")
    if num_queries == 0:
        raise ValueError(f"q must hold at least one query (T >= 1), got shape {tuple(q.shape)}")
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
    cap = 0.0  # the kernel's "no cap": it then evaluates no tanh
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not math.isfinite(softcap) \
                or not _FLOAT32_TINY <= softcap <= _FLOAT32_MAX:
            raise ValueError(f"softcap must be None or a positive finite number (a normal float32), "
                             f"got {softcap!r}")
        cap = float(softcap)

    tree, depth = NO_TREE, NO_DEPTH
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
    return q_np, out, (np.float32(scale), window, np.float32(cap), tree, depth)


def _lengths(lengths, num_rows: int, num_queries: int, max_len: int) -> np.ndarray:
    lengths_np = row_vector("lengths", lengths, num_rows)
    if lengths_np.min() < num_queries or lengths_np.max() > max_len:
        raise ValueError(f"lengths must lie in [T, S_max] = [{num_queries}, {max_len}] (they include "
                         f"the T new tokens already in the cache), got {lengths_np.tolist()}")
    return lengths_np


def _append_args(cache_shape, cache_dtype, k_new, v_new, positions) -> tuple:
    """Checks of `append_kv`'s arguments but the caches -> (k_new and v_new as append_rows reads them,
    positions as int64 numpy, the kernel's mode)."""
    require_tensor("k_new", k_new, 4)
    require_tensor("v_new", v_new, 4)
    if k_new.shape != v_new.shape or k_new.dtype != v_new.dtype:
        raise ValueError(f"k_new and v_new must match in shape and dtype, got {tuple(k_new.shape)} "
                         f"{k_new.dtype} and {tuple(v_new.shape)} {v_new.dtype}")
    if k_new.dtype not in (torch.float32, cache_dtype):
        raise ValueError(f"k_new/v_new must be float32 or the cache dtype {cache_dtype}, got {k_new.dtype}")
    num_rows, num_kv_heads, num_new, head_dim = k_new.shape
    cache_rows, cache_heads, max_len, cache_dim = cache_shape
    if (num_rows, num_kv_heads, head_dim) != (cache_rows, cache_heads, cache_dim) or num_new == 0:
        raise ValueError(f"k_new/v_new {tuple(k_new.shape)} [B, Hkv, T>=1, D] do not match caches "
                         f"{tuple(cache_shape)} [B, Hkv, S_max, D]")
    positions_np = row_vector("positions", positions, num_rows)
    if positions_np.min() < 0 or positions_np.max() + num_new > max_len:
        raise ValueError(f"positions must lie in [0, S_max - T] = [0, {max_len - num_new}] so that T = "
                         f"{num_new} tokens fit, got {positions_np.tolist()}")

    if k_new.dtype == cache_dtype:
        mode = COPY
    else:  # float32 into a 16-bit cache
        mode = TO_BF16 if cache_dtype == torch.bfloat16 else TO_F16
    k_src = cache_view(k_new.detach().contiguous(), fp16_as_int16=False)
    v_src = cache_view(v_new.detach().contiguous(), fp16_as_int16=False)
    return k_src, v_src, positions_np, mode
