"""Numba: one MoE layer's routed experts for a few rows in one call (SiLU-gated MLPs, packed or dense).

    out = sum over experts j (ascending) of share[j] * down_j(silu(gate_j(x)) * up_j(x))

Every expert's gate and up run in one parallel loop (x read by all), their products are formed and
quantized once, every down projection runs in a second parallel loop (expert j reading its own rows), and the
weighted sum closes it; no Python in between. The roundings are those of the model dtype (`kind`: 0 float32,
1 bfloat16, 2 float16), where the expert-by-expert torch path makes them: each projection's output, the
activation, the product, the scaled output, and each add of the sum.
"""
import numpy as np
from numba import njit, prange

from ._bits import narrow_bf16, narrow_f16, widen_bf16, widen_f16
from ._linear_kernel import dense_linear_each, packed_linear_each

FLOAT32, BFLOAT16, FLOAT16 = 0, 1, 2


@njit(inline="always")
def _round(value, kind):
    """float32 -> the nearest value of the model dtype (round-to-nearest-even), as float32."""
    if kind == BFLOAT16:
        return widen_bf16(narrow_bf16(np.float32(value)))
    if kind == FLOAT16:
        return widen_f16(narrow_f16(np.float32(value)))
    return np.float32(value)


@njit(parallel=True, nogil=True, cache=True)
def _gate(gate_up, kind, products):
    """gate_up [2h', M, I] (gate_j at 2j, up_j at 2j + 1) -> products [h', M, I]: silu(gate) * up, rounded as
    torch rounds them (each projection, the activation, the product)."""
    count, rows, inner = products.shape
    for j in prange(count):
        for m in range(rows):
            for n in range(inner):
                g = _round(gate_up[2 * j, m, n], kind)
                u = _round(gate_up[2 * j + 1, m, n], kind)
                a = _round(g / (np.float32(1.0) + np.exp(-g)), kind)
                products[j, m, n] = _round(a * u, kind)


@njit(parallel=True, nogil=True, cache=True)
def _combine(downs, share, kind, out):
    """downs [h', M, H], share [h, M] f32 (0 for a row not routed to expert j) -> out [M, H]: the experts' scaled
    outputs added in ascending order, each product and each add rounded."""
    count = share.shape[0]
    rows, hidden = out.shape
    for n in prange(hidden):
        for m in range(rows):
            total = np.float32(0.0)
            for j in range(count):
                total = _round(total + _round(_round(downs[j, m, n], kind) * share[j, m], kind), kind)
            out[m, n] = total


@njit(nogil=True, cache=True)
def packed_experts(x, up_codes, up_scales, up_mins, up_min_factor, down_codes, down_scales, down_mins,
                   down_min_factor, share, kind, integer, blocks, out):
    """x [M, H] f32; up_*: the gate and up matrices [I, H] of h' experts interleaved (gate_j at 2j, up_j at 2j + 1;
    tuples padded with empty matrices past the h real ones); down_*: their down matrices [H, I]; share [h, M];
    -> out [M, H] f32 (packed_linear_each's kernels; `integer` as there)."""
    rows, hidden = x.shape
    inner = up_codes[0].shape[0]
    gate_up = np.empty((len(up_codes), rows, inner), np.float32)
    packed_linear_each(x.reshape((1, rows, hidden)), up_codes, up_scales, up_mins, up_min_factor, integer, blocks,
                       gate_up)
    products = np.zeros((len(down_codes), rows, inner), np.float32)
    _gate(gate_up, kind, products[:share.shape[0]])
    downs = np.empty((len(down_codes), rows, hidden), np.float32)
    packed_linear_each(products, down_codes, down_scales, down_mins, down_min_factor, integer, blocks, downs)
    _combine(downs, share, kind, out)


@njit(nogil=True, cache=True)
def dense_experts(x, ups, downs_w, share, kind, blocks, out):
    """packed_experts for dense matrices of one dtype (float32, or 16-bit bit patterns)."""
    rows, hidden = x.shape
    inner = ups[0].shape[0]
    gate_up = np.empty((len(ups), rows, inner), np.float32)
    dense_linear_each(x.reshape((1, rows, hidden)), ups, blocks, gate_up)
    products = np.zeros((len(downs_w), rows, inner), np.float32)
    _gate(gate_up, kind, products[:share.shape[0]])
    downs = np.empty((len(downs_w), rows, hidden), np.float32)
    dense_linear_each(products, downs_w, blocks, downs)
    _combine(downs, share, kind, out)
