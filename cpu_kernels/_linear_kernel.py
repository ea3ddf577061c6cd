"""Numba kernels: y = x @ W.T for a few rows x and a matrix W, read once from RAM: packed per group (the
layouts of placement/quantization.py, never dequantized into memory) or dense (float32 / 16-bit).

`packed_linear` is the entry point for packed matrices. In 16-bit models, whose activations are bfloat16 or
float16 already, groups of a multiple of 32 inputs (every GGUF layout, the planner's default group sizes)
take the integer path of _int_dot.py: the activations quantized per run of 32 (int8 against 4-bit codes,
int16 against 8-bit ones), codes times activations as integer products, each run's sum scaled in float32
(measured on 2 cores, a 1.2B model's matrices at M = 1 out of cache: 4-bit ~20-23 GB/s of codes and scales,
8-bit ~22, the memory's limit; the float products reach about half that).

Float32 models and other group sizes take the float kernels below, exact in float32: per output n and group g,
y[m, n] += scale[n, g] * sum_k x[m, k] * code[n, k] (+ min[n, g] * the group's sum of x[m]). Scales and mins
are read as stored: float32, or 16-bit bit patterns (uint16 bfloat16, int16 float16; `widen`). Their speed
comes from the shape of the inner loop: each thread keeps float32 partial sums (lanes), one per position in
a run of bytes, and adds each run's scaled products lane-wise (a dot per group would end in a horizontal sum
every 32 weights); codes widen through uint8 / int8, and the indices inside a row are unsigned (Numba wraps
negative indices around, and a select per element keeps the loop scalar, 5x slower). ~11-12 G weights/s.
"""
import numpy as np
from numba import njit, prange

from ._bits import widen
from ._int_dot import RUN, activations_for, packed_dot, quantize_rows
from ._prefetch import prefetch_row

LANES_4BIT = 16         # partial sums per output: runs of 16 bytes of 4-bit codes (32 codes)
LANES_8BIT = 32         # runs of 32 8-bit codes (16 measured 5x slower: LLVM's choice of vector loop)
# 4-bit rows on the integer path prefetch the codes of the row this many outputs ahead (measured 1.05-1.10x from
# RAM on 2 Zen 3 cores, 1, 2 and 4 alike; 8-bit and dense rows measured slower with it, so they go without)
PREFETCH_ROWS = 2
# the integer path's drivers: reassociation for the scale and min loops (vectorised), but NaN and inf kept
# meaningful (_int_dot.py)
_INT_FLAGS = {"reassoc", "contract", "nsz", "arcp"}


@njit(nogil=True, cache=True)
def split_rows(x, groups, x_even, x_odd, sums):
    """x [M, K] f32 -> its even and odd columns [M, K/2] (4-bit codes: the low and high nibbles of a byte)
    and its group sums [M, G]. x_even / x_odd may have 0 columns (8-bit codes: not needed)."""
    rows, inputs = x.shape
    size = inputs // groups
    split = x_even.shape[1] > 0
    for m in range(rows):
        for g in range(groups):
            total = np.float32(0.0)
            for k in range(g * size, (g + 1) * size):
                total += x[m, k]
            sums[m, g] = total
        if split:
            for j in range(inputs // 2):
                x_even[m, j] = x[m, 2 * j]
                x_odd[m, j] = x[m, 2 * j + 1]


@njit(nogil=True, cache=True)
def runs_shift(group_bytes, lanes):
    """log2(group_bytes / lanes) when a group is a power-of-two number of runs of `lanes` bytes, else -1."""
    shift = 0
    while (lanes << shift) < group_bytes:
        shift += 1
    return shift if (lanes << shift) == group_bytes else -1


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def int4_linear(x_even, x_odd, sums, qweight, scales, mins, min_factor, blocks, out):
    """x_even / x_odd [M, K/2] f32 (x's even and odd columns), sums [M, G] f32 (x's group sums), qweight
    uint8 [N, K/2] (column 2j low nibble, 2j+1 high), scales and mins [N, G] (w = code * scale + min_factor *
    min: 1 with mins, -8 with the scales as mins for int4-sym); outputs handed out in `blocks` blocks (each
    with its own lane sums) -> out [M, N] f32."""
    rows = x_even.shape[0]
    outputs, groups = scales.shape
    width = qweight.shape[1]
    half = width // groups                                 # bytes per group
    shift = runs_shift(half, LANES_4BIT)
    ushift, runs, uhalf = np.uint64(max(shift, 0)), np.uint64(width // LANES_4BIT), np.uint64(half)
    per_block = (outputs + blocks - 1) // blocks
    factor = np.float32(min_factor)
    for block in prange(blocks):
        lanes = np.empty(LANES_4BIT, np.float32)
        for n in range(block * per_block, min(outputs, (block + 1) * per_block)):
            for m in range(rows):
                tail = np.float32(0.0)
                if shift >= 0:
                    lanes[:] = 0.0
                    for r in range(runs):
                        scale = widen(scales[n, r >> ushift])
                        base = r * np.uint64(LANES_4BIT)
                        for j in range(np.uint64(LANES_4BIT)):
                            byte = qweight[n, base + j]
                            lanes[j] += scale * (x_even[m, base + j] * np.float32(np.uint8(byte & np.uint8(15)))
                                                 + x_odd[m, base + j] * np.float32(np.uint8(byte >> np.uint8(4))))
                    for j in range(LANES_4BIT):
                        tail += lanes[j]
                else:
                    for g in range(np.uint64(groups)):
                        dot = np.float32(0.0)
                        for j in range(g * uhalf, (g + np.uint64(1)) * uhalf):
                            byte = qweight[n, j]
                            dot += (x_even[m, j] * np.float32(np.uint8(byte & np.uint8(15)))
                                    + x_odd[m, j] * np.float32(np.uint8(byte >> np.uint8(4))))
                        tail += widen(scales[n, g]) * dot
                for g in range(groups):
                    tail += factor * widen(mins[n, g]) * sums[m, g]
                out[m, n] = tail


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def int8_linear(x, sums, qweight, scales, mins, min_factor, blocks, out):
    """x [M, K] f32, sums [M, G] f32, qweight int8 [N, K], scales [N, G], mins [N, G] (read only when
    `min_factor` is not 0), `blocks` as in int4_linear -> out [M, N] f32 (w = code * scale (+ min))."""
    rows = x.shape[0]
    outputs, groups = scales.shape
    width = qweight.shape[1]
    size = width // groups
    shift = runs_shift(size, LANES_8BIT)
    ushift, runs, usize = np.uint64(max(shift, 0)), np.uint64(width // LANES_8BIT), np.uint64(size)
    per_block = (outputs + blocks - 1) // blocks
    factor = np.float32(min_factor)
    for block in prange(blocks):
        lanes = np.empty(LANES_8BIT, np.float32)
        for n in range(block * per_block, min(outputs, (block + 1) * per_block)):
            for m in range(rows):
                tail = np.float32(0.0)
                if shift >= 0:
                    lanes[:] = 0.0
                    for r in range(runs):
                        scale = widen(scales[n, r >> ushift])
                        base = r * np.uint64(LANES_8BIT)
                        for j in range(np.uint64(LANES_8BIT)):
                            lanes[j] += scale * (x[m, base + j] * np.float32(qweight[n, base + j]))
                    for j in range(LANES_8BIT):
                        tail += lanes[j]
                else:
                    for g in range(np.uint64(groups)):
                        dot = np.float32(0.0)
                        for k in range(g * usize, (g + np.uint64(1)) * usize):
                            dot += x[m, k] * np.float32(qweight[n, k])
                        tail += widen(scales[n, g]) * dot
                if factor != 0:
                    for g in range(groups):
                        tail += factor * widen(mins[n, g]) * sums[m, g]
                out[m, n] = tail


@njit(nogil=True, cache=True)
def packed_linear(x, codes, scales, mins, min_factor, integer, blocks, out):
    """x [M, K] f32 @ W.T -> out [M, N] f32, W packed: codes uint8 [N, K/2] (4-bit) or int8 [N, K], scales /
    mins [N, G]; w = code * scale + min_factor * min: `min_factor` 1 with mins, 0 without them (mins [1, 1]
    unused), -8 for 4-bit codes without mins (int4-sym: the scales passed as mins).

    With `integer` (16-bit models), groups of a multiple of 32 inputs take the integer path (_int_dot.py:
    activations as int8 (4-bit codes) or int16 (8-bit codes) per run of 32); otherwise the float kernels
    above (exact float32 products)."""
    packed_linear_many(x, (codes,), (scales,), (mins,), (min_factor,), integer, blocks, (out,))


@njit(nogil=True, cache=True)
def packed_linear_many(x, codes, scales, mins, min_factor, integer, blocks, outs):
    """packed_linear for several matrices of one code type that read the same x (q, k and v; gate and up):
    codes, scales, mins, min_factor and outs are tuples, one per matrix (group sizes and mins may differ). The
    integer path quantizes x once and hands the outputs of all of them out in one parallel loop of `blocks`
    blocks (one thread launch, not one each)."""
    rows, inputs = x.shape
    packed_linear_each(x.reshape((1, rows, inputs)), codes, scales, mins, min_factor, integer, blocks, outs)


@njit(nogil=True, cache=True)
def packed_linear_each(xs3, codes, scales, mins, min_factor, integer, blocks, outs):
    """packed_linear_many where matrix i reads xs3[i] ([C, M, K] f32, C = 1: all read xs3[0]; else C = the
    number of matrices: each routed expert's down projection of its own rows). The integer path quantizes
    every input once and runs one parallel loop over all the matrices' outputs."""
    count, rows, inputs = xs3.shape
    assert count == 1 or count == len(codes)
    runs_fit = integer and inputs % RUN == 0
    for i in range(len(codes)):
        runs_fit = runs_fit and (inputs // scales[i].shape[1]) % RUN == 0
    four_bit = codes[0].shape[1] != inputs
    if runs_fit:
        xs = np.empty((count * rows, inputs // RUN), np.float32)
        sums = np.empty((count * rows, inputs // RUN), np.float32)
        xq = activations_for(codes[0], count * rows, inputs)
        quantize_rows(xs3.reshape((count * rows, inputs)), four_bit, xq, xs, sums)
        _int_linear(xq.reshape((count, rows, inputs)), xs.reshape((count, rows, inputs // RUN)),
                    sums.reshape((count, rows, inputs // RUN)), codes, scales, mins, min_factor, blocks, outs)
        return
    for i in range(len(codes)):
        x = xs3[i if count > 1 else 0]
        groups = scales[i].shape[1]
        sums = np.empty((rows, groups), np.float32)
        halves = inputs // 2 if four_bit else 0
        x_even = np.empty((rows, halves), np.float32)
        x_odd = np.empty((rows, halves), np.float32)
        split_rows(x, groups, x_even, x_odd, sums)
        if four_bit:
            int4_linear(x_even, x_odd, sums, codes[i], scales[i], mins[i], min_factor[i], blocks, outs[i])
        else:
            int8_linear(x, sums, codes[i], scales[i], mins[i], min_factor[i], blocks, outs[i])


@njit(parallel=True, nogil=True, cache=True, fastmath=_INT_FLAGS)
def _int_linear(xq, xs, sums, codes, scales, mins, min_factor, blocks, outs):
    # xq, xs, sums [C, M, ...]: quantize_rows' output for one input shared by every matrix (C = 1) or one per
    # matrix; codes, scales, mins, min_factor, outs: one per matrix, whose outputs are handed out in one
    # sequence of blocks
    rows = xq.shape[1]
    runs = xs.shape[2]
    count = len(codes)
    shared = xq.shape[0] == 1
    ends = np.empty(count, np.int64)                 # the matrices' outputs, end to end
    most_groups = 1
    total = 0
    for i in range(count):
        total += codes[i].shape[0]
        ends[i] = total
        most_groups = max(most_groups, scales[i].shape[1])
    group_sums = np.zeros((count, rows, most_groups), np.float32)      # x's sums per group, for the mins
    for i in range(count):
        if min_factor[i] != 0:
            per_group = runs // scales[i].shape[1]
            for m in range(rows):
                for r in range(runs):
                    group_sums[i, m, r // per_group] += sums[0 if shared else i, m, r]
    widths = 4 if codes[0].shape[1] != xq.shape[2] else 0     # 4-bit block scales: each run's scale 4 times
    xs_wide = np.empty((xs.shape[0], rows, runs * widths), np.float32)
    for c in range(xs.shape[0]):
        for m in range(rows):
            for r in range(runs):
                for w in range(widths):
                    xs_wide[c, m, r * widths + w] = xs[c, m, r]
    per_block = (total + blocks - 1) // blocks
    for block in prange(blocks):
        run_scales = np.empty((1, runs), np.float32)
        wide = np.empty((2, most_groups), np.float32)      # a row's scales, and its mins times min_factor
        low, high = block * per_block, min(total, (block + 1) * per_block)
        for i in range(count):
            first = ends[i] - codes[i].shape[0]
            if low < ends[i] and high > first:
                c = 0 if shared else i
                _int_outputs(xq[c], xs[c], xs_wide[c], group_sums[i], codes[i], scales[i], mins[i], min_factor[i],
                             max(low, first) - first, min(high, ends[i]) - first, run_scales, wide, outs[i])


@njit(nogil=True, cache=True, fastmath=_INT_FLAGS)
def _int_outputs(xq, xs, xs_wide, group_sums, codes, scales, mins, min_factor, first, last, run_scales, wide, out):
    # outputs first..last-1 of one matrix. Groups of 4 << b runs: the activation scales (xs, or xs_wide for
    # 4-bit codes: see packed_dot) and the widened weight scales as block scales (one per 4 runs, so a run
    # costs no scale arithmetic). Other groups: each run's weight scale times its activation scale as
    # run_scales. The mins meet the activations' sums per group.
    rows, runs = xs.shape
    groups = scales.shape[1]
    four_bit = codes.shape[1] != xq.shape[1]
    runs_per_group = runs // groups
    block_shift = runs_shift(runs_per_group, 4)
    factor = np.float32(min_factor)
    for n in range(first, last):
        if four_bit:
            prefetch_row(codes, n + PREFETCH_ROWS, last)
        if block_shift >= 0:
            for g in range(groups):
                wide[0, g] = widen(scales[n, g])
        if factor != 0:
            for g in range(np.uint64(groups)):
                wide[1, g] = factor * widen(mins[n, g])
        for m in range(rows):
            if block_shift >= 0 and four_bit:
                dot = packed_dot(codes, n, xq, m, xs_wide, m, wide, block_shift)
            elif block_shift >= 0:
                dot = packed_dot(codes, n, xq, m, xs, m, wide, block_shift)
            else:
                if runs_per_group == 1:
                    for r in range(runs):
                        run_scales[0, r] = widen(scales[n, r]) * xs[m, r]
                else:
                    step = np.uint64(runs_per_group)          # unsigned: no negative-index wrapping
                    for g in range(np.uint64(groups)):
                        scale = widen(scales[n, g])
                        for r in range(g * step, (g + np.uint64(1)) * step):
                            run_scales[0, r] = scale * xs[m, r]
                dot = packed_dot(codes, n, xq, m, run_scales, 0, None, 0)
            if factor != 0:
                offset = np.float32(0.0)
                for g in range(np.uint64(groups)):
                    offset += wide[1, g] * group_sums[m, g]
                dot += offset
            out[m, n] = dot


@njit(nogil=True, cache=True)
def dense_linear(x, weight, blocks, out):
    """x [M, K] f32, weight [N, K] float32 or 16-bit bits (uint16 bfloat16, int16 float16), `blocks` as in
    int4_linear -> out [M, N] f32, accumulated in float32: one dot product per output (a dense row has no
    groups, so LLVM's reduction loop, with its own partial sums, runs over the whole row)."""
    rows, inputs = x.shape
    dense_linear_each(x.reshape((1, rows, inputs)), (weight,), blocks, (out,))


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def dense_linear_each(xs3, weights, blocks, outs):
    """dense_linear for a tuple of matrices of one dtype and width: matrix i reads xs3[i] ([C, M, K] f32; C = 1:
    all read xs3[0]) into outs[i]; their outputs handed out in one parallel loop of `blocks` blocks."""
    count, rows, inputs = xs3.shape
    ends = np.empty(len(weights), np.int64)              # the matrices' outputs, end to end
    total = 0
    for i in range(len(weights)):
        total += weights[i].shape[0]
        ends[i] = total
    per_block = (total + blocks - 1) // blocks
    for block in prange(blocks):
        low, high = block * per_block, min(total, (block + 1) * per_block)
        for i in range(len(weights)):
            first = ends[i] - weights[i].shape[0]
            weight, out, x = weights[i], outs[i], xs3[0 if count == 1 else i]
            for n in range(max(low, first) - first, min(high, ends[i]) - first):
                for m in range(rows):
                    acc = np.float32(0.0)
                    for k in range(np.uint64(inputs)):
                        acc += x[m, k] * widen(weight[n, k])
                    out[m, n] = acc
