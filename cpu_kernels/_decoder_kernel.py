"""One decode step of a llama-like decoder layer on the CPU, as one Numba call: for a few rows of one new
token each (or of a few tokens each: a speculative decoding pass, a chain or one row's token tree), RMSNorm, the
q/k/v projections (+ biases), RoPE, the KV append and attention over the cache, o_proj + residual, RMSNorm, the
SwiGLU MLP + residual.

Called once per layer instead of ~40 eager torch ops (each a Python dispatch: on 2 cores that cost ~1 ms a
layer, more than a small model's matmuls). Activations are float32 arrays inside; the hidden states come in and
go out as the bits of the model's tensors (widened and narrowed here: converting them in torch cost ~100 us a
layer, measured in a 1.2B model's decode). `mode` rounds every value that the eager math holds in the model
dtype (bfloat16 / float16) at the same points, so the step computes what offload/models/decoder.py computes
(transformers' order of operations and casts), up to summation order.

Matrices arrive as tuples (codes, scales, mins, min_factor, bias): packed 4-bit (uint8 codes), packed 8-bit
(int8 codes), or dense (float32, or uint16 bfloat16 / int16 float16 bits; scales and mins unused). `bias` is
float32 [N], empty when the layer has none. The kind is chosen by type when Numba compiles (`matmul_rows`);
packed matrices take the integer path (`packed_linear`) in 16-bit modes, as the eager linear does. q, k and v
(and gate and up) of one packed layout are computed together (`matmul_rows_many`): their input quantized once,
one parallel loop.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from ._append_kernel import append_rows
from ._attention_kernel import attend
from ._bits import narrow_bf16, narrow_f16, widen, widen_bf16, widen_f16
from ._linear_kernel import dense_linear, packed_linear, packed_linear_many

F32, BF16, F16 = 0, 1, 2     # the model dtype: what `mode` rounds activations to


@njit(inline="always")
def rnd(value, mode):
    """value rounded to the model dtype (nearest even), as a float32."""
    if mode == BF16:
        return widen_bf16(narrow_bf16(value))
    if mode == F16:
        return widen_f16(narrow_f16(value))
    return value


@njit(nogil=True, cache=True)
def _finish(out, bias, mode, packed):
    # out [M, N] raw float32 products -> what the eager linear holds: a dense matmul rounds acc + bias
    # once (addmm); a packed one is rounded, then its bias added in the model dtype (eager: out.to(dtype) + b)
    rows, outputs = out.shape
    has_bias = bias.shape[0] > 0
    for m in range(rows):
        for n in range(outputs):
            value = out[m, n]
            if packed:
                value = rnd(value, mode)
            if has_bias:
                value = value + bias[n]
            out[m, n] = rnd(value, mode)


def store_rounded(out, m, j, value, mode):
    """out[m, j] = value rounded to the model dtype: out float32 (the rounded value), or uint16 (its bfloat16 or
    float16 bits, by `mode`); Numba code only."""
    raise NotImplementedError("store_rounded is only callable from Numba-compiled code")


@overload(store_rounded, inline="always")
def _store_rounded_by_type(out, m, j, value, mode):
    if out.dtype == types.float32:
        def as_float(out, m, j, value, mode):
            out[m, j] = rnd(value, mode)
        return as_float
    if out.dtype == types.uint16:
        def as_bits(out, m, j, value, mode):
            out[m, j] = narrow_bf16(value) if mode == BF16 else narrow_f16(value)
        return as_bits
    return None


def matmul_rows(x, matrix, blocks, mode, out):
    """out [M, N] f32 = x [M, K] f32 @ W.T (+ bias), rounded as the eager linear; Numba code only."""
    raise NotImplementedError("matmul_rows is only callable from Numba-compiled code")


@overload(matmul_rows)
def _matmul_rows_by_kind(x, matrix, blocks, mode, out):
    if matrix.types[0].dtype in (types.uint8, types.int8):      # packed: 4-bit (two codes a byte) or 8-bit

        def packed(x, matrix, blocks, mode, out):
            codes, scales, mins, min_factor, bias = matrix
            packed_linear(x, codes, scales, mins, min_factor, mode != F32, blocks, out)
            _finish(out, bias, mode, True)
        return packed

    def dense(x, matrix, blocks, mode, out):
        weight, _, _, _, bias = matrix
        dense_linear(x, weight, blocks, out)
        _finish(out, bias, mode, False)
    return dense


def _column(matrices, field):
    """(matrices[0][field], matrices[1][field], ...) for two or three matrices; Numba code only."""
    raise NotImplementedError("_column is only callable from Numba-compiled code")


@overload(_column)
def _column_of(matrices, field):
    if len(matrices) == 2:
        return lambda matrices, field: (matrices[0][field], matrices[1][field])
    if len(matrices) == 3:
        return lambda matrices, field: (matrices[0][field], matrices[1][field], matrices[2][field])
    return None                                     # other counts: a typing error, not a wrong tuple


def matmul_rows_many(x, matrices, blocks, mode, outs):
    """matmul_rows for two or three matrices that read the same x (q, k, v; gate, up); Numba code only."""
    raise NotImplementedError("matmul_rows_many is only callable from Numba-compiled code")


@overload(matmul_rows_many)
def _matmul_rows_many_by_kind(x, matrices, blocks, mode, outs):
    if len(matrices) not in (2, 3):
        return None                                 # a typing error naming matmul_rows_many
    same = all(kind == matrices.types[0] for kind in matrices.types)
    if same and matrices.types[0].types[0].dtype in (types.uint8, types.int8):
        # one packed layout: x quantized once, one parallel loop over all the outputs

        def shared(x, matrices, blocks, mode, outs):
            packed_linear_many(x, _column(matrices, 0), _column(matrices, 1), _column(matrices, 2),
                               _column(matrices, 3), mode != F32, blocks, outs)
            for i in range(len(matrices)):
                _finish(outs[i], matrices[i][4], mode, True)
        return shared
    if len(matrices) == 2:
        def each_of_two(x, matrices, blocks, mode, outs):
            matmul_rows(x, matrices[0], blocks, mode, outs[0])
            matmul_rows(x, matrices[1], blocks, mode, outs[1])
        return each_of_two

    def each_of_three(x, matrices, blocks, mode, outs):
        matmul_rows(x, matrices[0], blocks, mode, outs[0])
        matmul_rows(x, matrices[1], blocks, mode, outs[1])
        matmul_rows(x, matrices[2], blocks, mode, outs[2])
    return each_of_three


@njit(nogil=True, cache=True)
def _rms_norm(h, weight, eps, mode, out):
    # transformers' LlamaRMSNorm: normalise in float32, cast to the dtype, then times the weight (in the dtype);
    # h float32 or 16-bit bits (widen)
    rows, width = h.shape
    for m in range(rows):
        total = np.float32(0.0)
        for k in range(width):
            value = widen(h[m, k])
            total += value * value
        inv = np.float32(1.0) / np.sqrt(total / np.float32(width) + np.float32(eps))
        for k in range(width):
            out[m, k] = rnd(weight[k] * rnd(widen(h[m, k]) * inv, mode), mode)


@njit(nogil=True, cache=True)
def _rope(x, heads, head_dim, cos, sin, mode):
    # x [M, heads * D] in place: x * cos + rotate_half(x) * sin, each product and the sum in the dtype
    rows = x.shape[0]
    half = head_dim // 2
    for m in range(rows):
        for h in range(heads):
            base = h * head_dim
            for d in range(half):
                x1 = x[m, base + d]
                x2 = x[m, base + half + d]
                x[m, base + d] = rnd(rnd(x1 * cos[m, d], mode) + rnd(-x2 * sin[m, d], mode), mode)
                x[m, base + half + d] = rnd(rnd(x2 * cos[m, half + d], mode) + rnd(x1 * sin[m, half + d], mode),
                                            mode)


@njit(nogil=True, cache=True)
def _heads_first(x, num_rows, num_tokens, heads, head_dim):
    # x [B * T, heads * D] (row b's tokens in turn) -> [B, heads, T, D], a copy
    out = np.empty((num_rows, heads, num_tokens, head_dim), np.float32)
    for b in range(num_rows):
        for h in range(heads):
            for t in range(num_tokens):
                for d in range(head_dim):
                    out[b, h, t, d] = x[b * num_tokens + t, h * head_dim + d]
    return out


@njit(nogil=True, cache=True)
def _tokens_first(x, mode):
    # x [B, heads, T, D] -> [B * T, heads * D], each value rounded to the model dtype
    num_rows, heads, num_tokens, head_dim = x.shape
    out = np.empty((num_rows * num_tokens, heads * head_dim), np.float32)
    for b in range(num_rows):
        for h in range(heads):
            for t in range(num_tokens):
                for d in range(head_dim):
                    out[b * num_tokens + t, h * head_dim + d] = rnd(x[b, h, t, d], mode)
    return out


@njit(nogil=True, cache=True)
def decode_layer(h, w_in, w_post, eps, q_m, k_m, v_m, o_m, gate_m, up_m, down_m, cos, sin,
                 num_heads, num_kv_heads, head_dim, k_append, v_append, append_mode, k_cache, v_cache,
                 positions, num_tokens, tree, depth, tile_t, scale, window, mode, blocks, out):
    """h [M, H] -> out [M, H]: the layer's output hidden states, in the model dtype as torch holds them (float32,
    or h as uint16 bfloat16 / int16 float16 bits and out as uint16 bits of either: no conversion outside).
    M = B x T: T tokens of each of B rows, row b's in turn (T = 1: a decode step; T > 1: a verification pass).

    w_in, w_post [H] f32: the norms' weights; *_m: matrices (see the module docstring); cos, sin [M, D] f32
    (each token's RoPE, in the dtype); k_append / v_append: the caches [B, Hkv, S_max, D] as append_rows takes
    them (float32 or uint16 bits, `append_mode`), k_cache / v_cache: the same caches as attend takes them;
    positions [B] int64: each row's slot of its first token (its length before them); tree [T, T] uint8 and
    depth [T] int64: a token tree's (B = 1; attend's), or [0, 0] and [0] for chains; tile_t: attend's queries per
    work item; scale, window (0: none)."""
    rows, hidden = h.shape
    num_rows = rows // num_tokens
    x = np.empty((rows, hidden), np.float32)
    _rms_norm(h, w_in, eps, mode, x)
    q = np.empty((rows, num_heads * head_dim), np.float32)
    k = np.empty((rows, num_kv_heads * head_dim), np.float32)
    v = np.empty((rows, num_kv_heads * head_dim), np.float32)
    matmul_rows_many(x, (q_m, k_m, v_m), blocks, mode, (q, k, v))
    _rope(q, num_heads, head_dim, cos, sin, mode)
    _rope(k, num_kv_heads, head_dim, cos, sin, mode)
    # [B, heads, T, D] as append_rows and attend take them (for one token a row, views)
    if num_tokens == 1:
        q4 = q.reshape(rows, num_heads, 1, head_dim)
        k4 = k.reshape(rows, num_kv_heads, 1, head_dim)
        v4 = v.reshape(rows, num_kv_heads, 1, head_dim)
    else:
        q4 = _heads_first(q, num_rows, num_tokens, num_heads, head_dim)
        k4 = _heads_first(k, num_rows, num_tokens, num_kv_heads, head_dim)
        v4 = _heads_first(v, num_rows, num_tokens, num_kv_heads, head_dim)
    append_rows(k_append, v_append, k4, v4, positions, append_mode)
    attn = np.empty((num_rows, num_heads, num_tokens, head_dim), np.float32)
    attend(q4, k_cache, v_cache, positions + num_tokens, np.float32(scale), window, np.float32(0.0), tree, depth,
           attn, tile_t)
    merged = _tokens_first(attn, mode)                                    # [M, Hq * D]
    o = np.empty((rows, hidden), np.float32)
    matmul_rows(merged, o_m, blocks, mode, o)
    for m in range(rows):
        for j in range(hidden):
            o[m, j] = rnd(widen(h[m, j]) + o[m, j], mode)     # o is now the residual stream
    _rms_norm(o, w_post, eps, mode, x)
    inner = gate_m[0].shape[0]
    gate = np.empty((rows, inner), np.float32)
    up = np.empty((rows, inner), np.float32)
    matmul_rows_many(x, (gate_m, up_m), blocks, mode, (gate, up))
    for m in range(rows):
        for j in range(inner):
            g = gate[m, j]
            gate[m, j] = rnd(rnd(g / (np.float32(1.0) + np.exp(-g)), mode) * up[m, j], mode)   # silu(g) * up
    down = np.empty((rows, hidden), np.float32)
    matmul_rows(gate, down_m, blocks, mode, down)
    for m in range(rows):
        for j in range(hidden):
            store_rounded(out, m, j, o[m, j] + down[m, j], mode)
