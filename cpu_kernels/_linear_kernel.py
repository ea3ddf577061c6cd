"""Numba kernels: y = x @ W.T for a few rows x and a matrix W packed per group (the layouts of
placement/quantization.py), read once from RAM and never dequantized into memory.

Per output n and group g: y[m, n] += scale[n, g] * sum_k x[m, k] * code[n, k] (+ min[n, g] * the group's sum
of x[m], computed once per call). Output channels are split across threads; the inner loop over a group's
codes is a plain contiguous reduction that LLVM vectorises (4-bit: x split into its even and odd columns
beforehand, so the low and high nibbles of a byte meet contiguous x). Measured on 2 cores at M = 1:
8-9 G weights/s for 4-bit, ~14 G weights/s for 8-bit (benchmarks/cpu_decode.py has the figures).
"""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)
def int4_linear(x_even, x_odd, sums, qweight, scales, mins, out):
    """x_even / x_odd [M, K/2] f32 (x's even and odd columns), sums [M, G] f32 (x's group sums), qweight
    uint8 [N, K/2] (column 2j low nibble, 2j+1 high), scales and mins f32 [N, G] -> out [M, N] f32."""
    rows = x_even.shape[0]
    outputs, groups = scales.shape
    half = qweight.shape[1] // groups                      # bytes per group
    for n in prange(outputs):
        for m in range(rows):
            acc = np.float32(0.0)
            for g in range(groups):
                low = np.float32(0.0)
                high = np.float32(0.0)
                base = g * half
                for j in range(half):
                    byte = np.int32(qweight[n, base + j])
                    low += x_even[m, base + j] * np.float32(byte & 15)
                    high += x_odd[m, base + j] * np.float32(byte >> 4)
                acc += scales[n, g] * (low + high) + mins[n, g] * sums[m, g]
            out[m, n] = acc


@njit(parallel=True, cache=True, fastmath=True)
def int8_linear(x, sums, qweight, scales, mins, out):
    """x [M, K] f32, sums [M, G] f32, qweight int8 [N, K], scales f32 [N, G], mins f32 [N, G] (zeros when
    symmetric) -> out [M, N] f32 (w = code * scale + min)."""
    rows = x.shape[0]
    outputs, groups = scales.shape
    size = qweight.shape[1] // groups
    for n in prange(outputs):
        for m in range(rows):
            acc = np.float32(0.0)
            for g in range(groups):
                dot = np.float32(0.0)
                base = g * size
                for k in range(size):
                    dot += x[m, base + k] * qweight[n, base + k]
                acc += scales[n, g] * dot + mins[n, g] * sums[m, g]
            out[m, n] = acc
