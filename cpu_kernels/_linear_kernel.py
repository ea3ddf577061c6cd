"""Numba kernels: y = x @ W.T for a few rows x and a matrix W packed per group (the layouts of
placement/quantization.py), read once from RAM and never dequantized into memory.

Per output n and group g: y[m, n] += scale[n, g] * sum_k x[m, k] * code[n, k] (+ min[n, g] * the group's sum
of x[m], computed once per call). Scales and mins are read as stored: float32, or 16-bit bit patterns (uint16
bfloat16, int16 float16; `widen`).

Speed comes from the shape of the inner loop. A group is short (16 bytes of 4-bit codes for a group of 32),
so a dot product per group would end in a horizontal sum every 32 weights and run LLVM's vector loop for a
single iteration, or not at all. Instead each thread keeps float32 partial sums (lanes), one per position
in a run of bytes, and adds each run's scaled products lane-wise: the loop over a run has a constant
trip count and no reduction, so it becomes a few AVX instructions; the lanes are summed once per output.
A group is a power-of-two number of runs (its scale found by a shift); other group sizes take the plain
per-group loop. Codes widen through uint8 / int8 (never int64, which AVX2 cannot convert to float in
vectors), and the indices inside a row are unsigned: Numba wraps negative indices around, and a select
per element on an index LLVM cannot prove non-negative keeps the loop scalar (5x slower). Measured on 2
cores at M = 1 (5632 x 2048): 4-bit ~11 G weights/s (5.7 with a dot per group), 8-bit ~12 G weights/s.
"""
import numpy as np
from numba import njit, prange

from ._bits import widen

LANES_4BIT = 16         # partial sums per output: runs of 16 bytes of 4-bit codes (32 codes)
LANES_8BIT = 32         # runs of 32 8-bit codes (16 measured 5x slower: LLVM's choice of vector loop)


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
def int4_linear(x_even, x_odd, sums, qweight, scales, mins, blocks, out):
    """x_even / x_odd [M, K/2] f32 (x's even and odd columns), sums [M, G] f32 (x's group sums), qweight
    uint8 [N, K/2] (column 2j low nibble, 2j+1 high), scales and mins [N, G]; outputs handed out in
    `blocks` blocks (each with its own lane sums) -> out [M, N] f32."""
    rows = x_even.shape[0]
    outputs, groups = scales.shape
    width = qweight.shape[1]
    half = width // groups                                 # bytes per group
    shift = runs_shift(half, LANES_4BIT)
    ushift, runs, uhalf = np.uint64(max(shift, 0)), np.uint64(width // LANES_4BIT), np.uint64(half)
    per_block = (outputs + blocks - 1) // blocks
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
                    tail += widen(mins[n, g]) * sums[m, g]
                out[m, n] = tail


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def int8_linear(x, sums, qweight, scales, mins, has_mins, blocks, out):
    """x [M, K] f32, sums [M, G] f32, qweight int8 [N, K], scales [N, G], mins [N, G] (read only when
    `has_mins`), `blocks` as in int4_linear -> out [M, N] f32 (w = code * scale (+ min))."""
    rows = x.shape[0]
    outputs, groups = scales.shape
    width = qweight.shape[1]
    size = width // groups
    shift = runs_shift(size, LANES_8BIT)
    ushift, runs, usize = np.uint64(max(shift, 0)), np.uint64(width // LANES_8BIT), np.uint64(size)
    per_block = (outputs + blocks - 1) // blocks
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
                if has_mins:
                    for g in range(groups):
                        tail += widen(mins[n, g]) * sums[m, g]
                out[m, n] = tail


LANES_DENSE = 32        # runs of 32 weights for float32 / 16-bit dense matrices


@njit(parallel=True, nogil=True, cache=True, fastmath=True)
def dense_linear(x, weight, blocks, out):
    """x [M, K] f32, weight [N, K] float32 or 16-bit bits (uint16 bfloat16, int16 float16), `blocks` as in
    int4_linear -> out [M, N] f32, accumulated in float32."""
    rows, inputs = x.shape
    outputs = weight.shape[0]
    runs = np.uint64(inputs // LANES_DENSE)
    per_block = (outputs + blocks - 1) // blocks
    for block in prange(blocks):
        lanes = np.empty(LANES_DENSE, np.float32)
        for n in range(block * per_block, min(outputs, (block + 1) * per_block)):
            for m in range(rows):
                lanes[:] = 0.0
                for r in range(runs):
                    base = r * np.uint64(LANES_DENSE)
                    for j in range(np.uint64(LANES_DENSE)):
                        lanes[j] += x[m, base + j] * widen(weight[n, base + j])
                tail = np.float32(0.0)
                for k in range(runs * np.uint64(LANES_DENSE), np.uint64(inputs)):
                    tail += x[m, k] * widen(weight[n, k])
                for j in range(LANES_DENSE):
                    tail += lanes[j]
                out[m, n] = tail
