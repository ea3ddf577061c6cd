"""Rows of a packed matrix widened to float32, for the GEMM of many rows (prefill) on the CPU: a chunk of
rows at a time into a buffer the caller reuses (cpu_kernels/linear.py `wide_linear`), never the whole
matrix.

    unpack_rows(codes, scales, mins, min_factor, first, out)    # out [R, K] f32 = W[first:first + R]

w = code * scale + min (min_factor 1), (code - 8) * scale (int4-sym, min_factor -8: exact, as the
runtime's dequantize), code * scale (8-bit without mins, min_factor 0). Scales and mins are read as stored
(float32, or 16-bit bit patterns: `widen`); without mins, + 0 (exact). The loops over a group run on
unsigned indices, so that LLVM vectorises them (Numba wraps negative indices around: a select per element).
"""
import numpy as np
from numba import njit, prange

from ._bits import widen


@njit(parallel=True, nogil=True, cache=True)
def unpack_rows(codes, scales, mins, min_factor, first, out):
    """codes uint8 [N, K/2] (4-bit: column 2j in byte j's low nibble, 2j + 1 in its high one) or int8 [N, K],
    scales / mins [N, G] -> out [R, K] float32: rows first .. first + R - 1."""
    count, inputs = out.shape
    groups = scales.shape[1]
    size = np.uint64(inputs // groups)
    four_bit = codes.shape[1] != inputs
    offset = np.float32(-8.0) if min_factor == -8.0 else np.float32(0.0)     # int4-sym: code - 8
    with_mins = min_factor == 1.0
    for r in prange(count):
        n = first + r
        for g in range(np.uint64(groups)):
            scale = widen(scales[n, g])
            bias = widen(mins[n, g]) if with_mins else np.float32(0.0)      # + 0: exact
            low = g * size
            if four_bit:
                half = low // np.uint64(2)
                for j in range(half, half + size // np.uint64(2)):
                    byte = codes[n, j]
                    out[r, np.uint64(2) * j] = (np.float32(byte & np.uint8(15)) + offset) * scale + bias
                    out[r, np.uint64(2) * j + np.uint64(1)] = (np.float32(byte >> np.uint8(4)) + offset) * scale + bias
            else:
                for k in range(low, low + size):
                    out[r, k] = np.float32(codes[n, k]) * scale + bias
