"""Numba attention over a CPU-resident KV cache: decode (T = 1) and chunked-causal prefill (T > 1).

One work item = (batch row b, KV head h, tile of queries). A work item holds every query head of the
GQA group that reads KV head h, so each K/V row is read from memory once per tile and reused by the
whole group; for decode (T = 1) there is exactly one tile per (b, h), so the cache is streamed once.
K/V are processed in blocks of BLOCK positions with an online (flash) softmax: scratch is
O(rows x (BLOCK + D)) per work item whatever S and T are. With a logit soft-cap c (Gemma 2) each score
s becomes c * tanh(s / c) before masking and softmax; c = 0 means no cap and skips that pass entirely.

Kernels take numpy arrays only; the torch-facing checks live in `ops.py` and `_checks.py`.
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ._bits import fast_exp, fast_tanh, widen
from ._prefetch import prefetch_row

BLOCK = 128  # cache positions per online-softmax step
MAX_TILE_ROWS = 64  # query rows (group heads x queries) per work item for T > 1
NO_TREE, NO_DEPTH = np.zeros((0, 0), np.uint8), np.zeros(0, np.int64)  # `attend`'s tree and depth of a plain chunk

# reassoc/contract let LLVM vectorise the dot products and sums; no 'nnan'/'ninf': -inf masks and NaN
# propagation must keep IEEE semantics.
FASTMATH = {"reassoc", "contract", "arcp", "nsz"}


def tile_queries(num_queries: int, group_size: int) -> int:
    """Queries per work item: the whole group of heads x as many queries as fit in MAX_TILE_ROWS."""
    return max(1, min(num_queries, MAX_TILE_ROWS // group_size))


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _scores_of_pair(qs, k0, k1, p, i, rows):
    # p[r, i] = qs[r] . widen(k0), p[r, i + 1] = qs[r] . widen(k1) for every row; four rows per sweep so that
    # each widened K element feeds four FMAs and each query element loaded feeds two
    head_dim = k0.shape[0]
    r = 0
    while r + 4 <= rows:
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
        for d in range(head_dim):
            x, y = widen(k0[d]), widen(k1[d])
            a0 += qs[r, d] * x
            b0 += qs[r, d] * y
            a1 += qs[r + 1, d] * x
            b1 += qs[r + 1, d] * y
            a2 += qs[r + 2, d] * x
            b2 += qs[r + 2, d] * y
            a3 += qs[r + 3, d] * x
            b3 += qs[r + 3, d] * y
        p[r, i], p[r + 1, i], p[r + 2, i], p[r + 3, i] = a0, a1, a2, a3
        p[r, i + 1], p[r + 1, i + 1], p[r + 2, i + 1], p[r + 3, i + 1] = b0, b1, b2, b3
        r += 4
    while r < rows:
        a0 = b0 = np.float32(0.0)
        for d in range(head_dim):
            a0 += qs[r, d] * widen(k0[d])
            b0 += qs[r, d] * widen(k1[d])
        p[r, i], p[r, i + 1] = a0, b0
        r += 1


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _scores_of_position(qs, k_row, p, i, rows):
    # p[r, i] = qs[r] . widen(k_row) for every row; four rows per sweep so that each widened K
    # element feeds four FMAs held in registers
    head_dim = k_row.shape[0]
    r = 0
    while r + 4 <= rows:
        d0 = d1 = d2 = d3 = np.float32(0.0)
        for d in range(head_dim):
            x = widen(k_row[d])
            d0 += qs[r, d] * x
            d1 += qs[r + 1, d] * x
            d2 += qs[r + 2, d] * x
            d3 += qs[r + 3, d] * x
        p[r, i] = d0
        p[r + 1, i] = d1
        p[r + 2, i] = d2
        p[r + 3, i] = d3
        r += 4
    while r < rows:
        d0 = np.float32(0.0)
        for d in range(head_dim):
            d0 += qs[r, d] * widen(k_row[d])
        p[r, i] = d0
        r += 1


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _score_positions(qs, kb, s0, p, nb, rows, ahead, first_ahead, ahead_end):
    for i in range(nb):
        prefetch_row(ahead, first_ahead + i, ahead_end)
        _scores_of_position(qs, kb[s0 + i], p, i, rows)


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _score_pairs(qs, kb, s0, p, nb, rows, ahead, first_ahead, ahead_end):
    for i in range(0, nb - 1, 2):
        prefetch_row(ahead, first_ahead + i, ahead_end)
        prefetch_row(ahead, first_ahead + i + 1, ahead_end)
        _scores_of_pair(qs, kb[s0 + i], kb[s0 + i + 1], p, i, rows)
    if nb % 2:
        _scores_of_position(qs, kb[s0 + nb - 1], p, nb - 1, rows)


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _soft_cap(p, nb, rows, softcap):
    # p[:, :nb] = softcap * tanh(p[:, :nb] / softcap), as Gemma 2's eager attention (scale already applied)
    inv_cap = np.float32(1.0) / softcap
    for r in range(rows):
        for i in range(nb):
            p[r, i] = softcap * fast_tanh(p[r, i] * inv_cap)


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _accumulate_row(acc, r, v0, v1, v2, v3, p, i):
    # acc[r] += p[r, i .. i + 3] times the widened V rows v0 .. v3
    w0, w1, w2, w3 = p[r, i], p[r, i + 1], p[r, i + 2], p[r, i + 3]
    for d in range(acc.shape[1]):
        acc[r, d] += (w0 * widen(v0[d]) + w1 * widen(v1[d])) + (w2 * widen(v2[d]) + w3 * widen(v3[d]))


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _accumulate_rows(acc, vb, s0, p, nb, rows, ahead, first_ahead, ahead_end):
    # four positions per sweep, so that each acc element is loaded and stored once per four FMAs
    i = 0
    while i + 4 <= nb:
        v0, v1, v2, v3 = vb[s0 + i], vb[s0 + i + 1], vb[s0 + i + 2], vb[s0 + i + 3]
        for j in range(4):
            prefetch_row(ahead, first_ahead + i + j, ahead_end)
        for r in range(rows):
            _accumulate_row(acc, r, v0, v1, v2, v3, p, i)
        i += 4
    _accumulate_tail(acc, vb, s0, p, i, nb, rows)


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _accumulate_shared(acc, vb, s0, p, nb, rows, ahead, first_ahead, ahead_end):
    # four positions by four rows per sweep: each widened V element feeds four rows, each acc element is loaded
    # and stored once per four FMAs (one chain of FMAs per element: fewer operations than a tree of sums)
    head_dim = acc.shape[1]
    i = 0
    while i + 4 <= nb:
        v0, v1, v2, v3 = vb[s0 + i], vb[s0 + i + 1], vb[s0 + i + 2], vb[s0 + i + 3]
        for j in range(4):
            prefetch_row(ahead, first_ahead + i + j, ahead_end)
        r = 0
        while r + 4 <= rows:
            a0, a1, a2, a3 = acc[r], acc[r + 1], acc[r + 2], acc[r + 3]
            w00, w01, w02, w03 = p[r, i], p[r, i + 1], p[r, i + 2], p[r, i + 3]
            w10, w11, w12, w13 = p[r + 1, i], p[r + 1, i + 1], p[r + 1, i + 2], p[r + 1, i + 3]
            w20, w21, w22, w23 = p[r + 2, i], p[r + 2, i + 1], p[r + 2, i + 2], p[r + 2, i + 3]
            w30, w31, w32, w33 = p[r + 3, i], p[r + 3, i + 1], p[r + 3, i + 2], p[r + 3, i + 3]
            for d in range(head_dim):
                x0, x1, x2, x3 = widen(v0[d]), widen(v1[d]), widen(v2[d]), widen(v3[d])
                a0[d] = a0[d] + w00 * x0 + w01 * x1 + w02 * x2 + w03 * x3
                a1[d] = a1[d] + w10 * x0 + w11 * x1 + w12 * x2 + w13 * x3
                a2[d] = a2[d] + w20 * x0 + w21 * x1 + w22 * x2 + w23 * x3
                a3[d] = a3[d] + w30 * x0 + w31 * x1 + w32 * x2 + w33 * x3
            r += 4
        while r < rows:
            _accumulate_row(acc, r, v0, v1, v2, v3, p, i)
            r += 1
        i += 4
    _accumulate_tail(acc, vb, s0, p, i, nb, rows)


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _accumulate_tail(acc, vb, s0, p, i, nb, rows):
    # positions i..nb-1 (fewer than four) one at a time
    head_dim = acc.shape[1]
    while i < nb:
        v0 = vb[s0 + i]
        for r in range(rows):
            w0 = p[r, i]
            for d in range(head_dim):
                acc[r, d] += w0 * widen(v0[d])
        i += 1


def _by_cache_type(name: str, for_float32, for_16bit):
    """A function for Numba code only, f(out, block, s0, p, nb, rows, ahead, first_ahead, ahead_end), that runs
    `for_float32` or `for_16bit` by the element type of `block` (a KV head's cache [S_max, D]). While it works on
    block rows s0 .. s0 + nb - 1 it prefetches the rows first_ahead .. of `ahead` (below ahead_end), one for each
    row it reads (the last odd one or three of a block go without): what the next step reads arrives while this
    one computes."""
    def chosen(out, block, s0, p, nb, rows, ahead, first_ahead, ahead_end):
        raise NotImplementedError(f"{name} is only callable from Numba-compiled code")

    @overload(chosen, inline="always")
    def _choose(out, block, s0, p, nb, rows, ahead, first_ahead, ahead_end):
        kernel = for_float32 if block.dtype == types.float32 else for_16bit

        def run(out, block, s0, p, nb, rows, ahead, first_ahead, ahead_end):
            kernel(out, block, s0, p, nb, rows, ahead, first_ahead, ahead_end)
        return run
    return chosen


# p[r, i] = qs[r] . widen(kb[s0 + i]) for i < nb, r < rows. 16-bit caches: positions in pairs (each query element
# loaded feeds two FMAs; measured ~1.3x in cache); float32 caches one position at a time (pairs measured slower)
_score_block = _by_cache_type("_score_block", _score_positions, _score_pairs)
# acc[r] += sum_i p[r, i] * widen(vb[s0 + i]) for i < nb, r < rows. 16-bit caches: four rows share each widened V
# element. A float32 cache needs no widening, and there LLVM would not vectorise four rows' stores (float32 like
# the loads: they might alias), so row by row.
_accumulate_block = _by_cache_type("_accumulate_block", _accumulate_rows, _accumulate_shared)


@njit(nogil=True, fastmath=FASTMATH, cache=True, inline="always")
def _online_softmax(p, nb, rows, run_max, run_sum, acc):
    # p[:, :nb] scores -> weights relative to the new running max; rescales acc and run_sum to it
    head_dim = acc.shape[1]
    for r in range(rows):
        block_max = run_max[r]
        for i in range(nb):
            block_max = max(block_max, p[r, i])
        if block_max == -np.inf:  # nothing visible to this row yet
            for i in range(nb):
                p[r, i] = 0.0
            continue
        correction = fast_exp(run_max[r] - block_max)
        run_max[r] = block_max
        total = np.float32(0.0)
        for i in range(nb):
            w = fast_exp(p[r, i] - block_max)
            p[r, i] = w
            total += w
        run_sum[r] = run_sum[r] * correction + total
        if correction != 1.0:
            for d in range(head_dim):
                acc[r, d] *= correction


@njit(nogil=True, fastmath=FASTMATH, cache=True)
def _attend_item(q, k, v, lengths, scale, window, softcap, tree, depth, out, item, tile_t):
    # q, out: [B, Hq, T, D] float32; k, v: [B, Hkv, S_max, D] (float32 or uint16 bits)
    num_heads, num_queries, head_dim = q.shape[1], q.shape[2], q.shape[3]
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    num_tiles = (num_queries + tile_t - 1) // tile_t
    b = item // (num_kv_heads * num_tiles)
    h = (item // num_tiles) % num_kv_heads
    t0 = (item % num_tiles) * tile_t
    nt = min(num_queries, t0 + tile_t) - t0
    rows = group * nt  # row r = j * nt + (t - t0) for group head j, query t
    first_pos = lengths[b] - num_queries  # cache position of query t = 0

    # scratch: O(rows x (BLOCK + D)), independent of S and T
    qs = np.empty((rows, head_dim), np.float32)  # scaled queries, contiguous per row
    acc = np.zeros((rows, head_dim), np.float32)  # unnormalised output
    p = np.empty((rows, BLOCK), np.float32)  # scores, then softmax weights, of one block
    run_max = np.full(rows, -np.inf, np.float32)
    run_sum = np.zeros(rows, np.float32)
    row_lo = np.empty(rows, np.int64)  # first visible cache position of each row
    row_hi = np.empty(rows, np.int64)  # last visible cache position (the query's own)
    has_tree = tree.shape[0] > 0  # a token tree: chunk keys visible by tree[t, u], positions start + depth
    for j in range(group):
        for i in range(nt):
            r = j * nt + i
            for d in range(head_dim):
                qs[r, d] = q[b, h * group + j, t0 + i, d] * scale
            row_hi[r] = first_pos + t0 + i
            logical = first_pos + depth[t0 + i] if has_tree else row_hi[r]
            row_lo[r] = max(0, logical - window + 1) if window > 0 else 0

    lo = row_lo[0]  # the smallest: row_lo grows with t (a tree's with depth) and is the same for every head
    for r in range(rows):
        lo = min(lo, row_lo[r])
    hi = first_pos + t0 + nt  # exclusive: one past the last query's position
    kb = k[b, h]  # [S_max, D]
    vb = v[b, h]
    is_ragged = num_queries > 1  # T = 1: every position in [lo, hi) is visible to every row
    for s0 in range(lo, hi, BLOCK):
        nb = min(BLOCK, hi - s0)
        _score_block(qs, kb, s0, p, nb, rows, vb, s0, hi)
        if softcap > 0.0:  # before the mask: a masked -inf must stay -inf, not become -softcap
            _soft_cap(p, nb, rows, softcap)
        if is_ragged:
            for r in range(rows):
                t = t0 + r % nt
                for i in range(nb):
                    pos = s0 + i
                    if pos < row_lo[r] or pos > row_hi[r]:
                        p[r, i] = -np.inf
                    elif has_tree and pos >= first_pos:
                        u = pos - first_pos
                        if tree[t, u] == 0 or (window > 0 and depth[u] <= depth[t] - window):
                            p[r, i] = -np.inf
        _online_softmax(p, nb, rows, run_max, run_sum, acc)
        _accumulate_block(acc, vb, s0, p, nb, rows, kb, s0 + BLOCK, hi)

    for j in range(group):
        for i in range(nt):
            r = j * nt + i
            inv = np.float32(1.0) / run_sum[r]
            for d in range(head_dim):
                out[b, h * group + j, t0 + i, d] = acc[r, d] * inv


@njit(parallel=True, nogil=True, fastmath=FASTMATH, cache=True)
def attend(q, k, v, lengths, scale, window, softcap, tree, depth, out, tile_t):
    """Attention for every (row, KV head, query tile); see the module docstring.

    q, out: [B, Hq, T, D] float32; k, v: [B, Hkv, S_max, D] as float32, uint16 (bfloat16 bits) or int16
    (float16 bits); lengths: [B] int64; window <= 0 means no sliding window; softcap: float32, > 0 caps
    every score s at softcap * tanh(s / softcap), 0 means no cap (no tanh is evaluated). tree: [T, T] uint8
    and depth: [T] int64 of a token tree's chunk (B = 1: query t sees the chunk's key u iff tree[t, u], and
    sits at logical position lengths[0] - T + depth[t]), or [0, 0] and [0] for a plain chunk.
    """
    num_items = q.shape[0] * k.shape[1] * ((q.shape[2] + tile_t - 1) // tile_t)
    for item in prange(num_items):
        _attend_item(q, k, v, lengths, scale, window, softcap, tree, depth, out, item, tile_t)
