"""Numba kernels for the CPU side: attention over a KV cache in CPU RAM, and matmuls with packed weights.

    out = cpu_kernels.attention(q, k_cache, v_cache, lengths, scale=None, sliding_window=None,
                                softcap=None)
    cpu_kernels.append_kv(k_cache, v_cache, k_new, v_new, positions)
    out = cpu_kernels.HostCache.of(k_cache, v_cache).append_and_attend(q, k_new, v_new, positions)  # both

q and out are float32 [B, Hq, T, D]; caches are contiguous [B, Hkv, S_max, D] float32, bfloat16 or
float16 tensors on the CPU (pinned or not). numpy/numba at the core, torch only at this edge.

    y = cpu_kernels.quantized_linear(x, qweight, scales, mins=None, integer=False)   # x f32 [M, K] -> [M, N]

multiplies a few rows by a matrix packed per group (4-bit or 8-bit codes), reading it once (`integer`:
x quantized per run of 32 inputs (int8 for 4-bit codes, int16 for 8-bit) and multiplied as integers, for
16-bit models; else exact float32);
`PackedMatrix.of(qweight, scales, mins)` keeps the checked views for repeated calls (`matrix(x)`);
`dense_linear_rows(x, weight)` does the same for a dense float32/bfloat16/float16 matrix;
`wide_linear(x, matrix or weight)` multiplies many rows (prefill) by either, widened to float32 a chunk of
rows at a time for torch's GEMM (`PACKED_MAX_ROWS`, `DENSE_MAX_ROWS`: where the one-read kernels stop paying);
`gated_experts(x, experts, share, dtype, integer)` runs a MoE layer's routed SiLU experts, gate/up (one
parallel loop over all their outputs), activation, down (another) and their weighted sum, in one call.
"""
from .linear import (DENSE_MAX_ROWS, PACKED_MAX_ROWS, PackedMatrix, dense_linear_rows, gated_experts,
                     native_half_gemm, quantized_linear, wide_linear)
from .ops import HostCache, append_kv, attention

__all__ = ["attention", "append_kv", "HostCache", "quantized_linear", "PackedMatrix", "dense_linear_rows",
           "gated_experts", "wide_linear", "native_half_gemm", "PACKED_MAX_ROWS", "DENSE_MAX_ROWS"]
