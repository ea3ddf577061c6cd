"""One output of a packed matrix as integer dot products: the codes of a row times activations quantized to
int16 per run of 32 inputs, in LLVM IR that the x86 backend turns into `vpmaddwd` (16 products and 8 pair
sums in one instruction; SSE2 and other CPUs get the equivalent code of their own).

Why: widening each 4-bit code to float32 (zero-extend, convert, multiply-add: ~0.9 instructions a weight) made
the float kernels compute-bound at about half the memory bandwidth on 2 cores; as 16-bit integers a run of
32 weights costs ~12 instructions, so a row is read at memory speed. llama.cpp does the same with 8-bit
activations; 16-bit keeps the error ~2^-16 of each run's largest activation, 256x finer than bfloat16.

    quantize_rows(x, four_bit, xq, xs, sums)      # x [M, K] f32 -> xq int16 [M, K], xs, sums [M, K/32] f32
    packed_dot(codes, n, xq, xs, sums, m, scales, mins or None, s, shift) -> float32   # W[n] . x[m]

A run is 32 inputs: 32 int8 codes, or 16 bytes of 4-bit codes (byte j: input 2j in its low nibble, 2j+1 in
its high one; xq holds a 4-bit run's even inputs first, then its odd ones, to match). Run r belongs to group
r >> shift (groups of 32 << shift inputs); its partial sum is scaled by scale[group] * xs[r] in float32, and
min[group] * sums[r] is added (w = code * scale + min). Four accumulators hide the latency of the adds.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

RUN = 32                      # inputs per run: one int16 scale of the activations
INT16_MAX = np.float32(32767.0)
ACCUMULATORS = 4

# reassociation and FMA contraction, but NaN and inf kept meaningful (a non-finite activation gives NaN)
_FLAGS = ("reassoc", "contract", "nsz", "arcp")
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(element, count):
    return ir.VectorType(element, count)


@njit(nogil=True, cache=True)
def quantize_rows(x, four_bit, xq, xs, sums):
    """x [M, K] f32 (K a multiple of 32) -> xq [M, K] int16 (4-bit: each run's even inputs, then its odd
    ones), xs [M, K/32] f32 (each run's scale: x ~ xq * xs) and sums [M, K/32] f32 (each run's sum of x).
    A run of zeros gets scale 0; a run holding inf or NaN gets a NaN scale (its outputs become NaN)."""
    rows, inputs = x.shape
    half = RUN // 2
    for m in range(rows):
        for r in range(inputs // RUN):
            base = r * RUN
            peak = np.float32(0.0)
            total = np.float32(0.0)
            for j in range(RUN):
                peak = max(peak, abs(x[m, base + j]))
                total += x[m, base + j]
            sums[m, r] = total
            finite = peak < np.float32(np.inf) and total == total     # no inf, no NaN (NaN reaches the sum)
            inv = INT16_MAX / peak if finite and peak > 0 else np.float32(0.0)
            xs[m, r] = peak / INT16_MAX if finite else np.float32(np.nan)
            if four_bit:
                for j in range(half):
                    xq[m, base + j] = np.int16(np.rint(x[m, base + 2 * j] * inv))
                    xq[m, base + half + j] = np.int16(np.rint(x[m, base + 2 * j + 1] * inv))
            else:
                for j in range(RUN):
                    xq[m, base + j] = np.int16(np.rint(x[m, base + j] * inv))


def _widen_ir(builder, value, dtype):
    """A loaded scale or min -> float32: float32 as is, uint16 as bfloat16 bits, int16 as float16 bits."""
    if dtype == types.float32:
        return value
    if dtype == types.uint16:
        bits = builder.shl(builder.zext(value, _I32), ir.Constant(_I32, 16))
        return builder.bitcast(bits, _F32)
    return builder.fpext(builder.bitcast(value, ir.HalfType()), _F32)


def _matrix_ok(array, dtypes) -> bool:
    return isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype in dtypes


@intrinsic
def packed_dot(typingctx, codes, n, xq, xs, sums, m, scales, mins, s, shift):
    """Row n of the packed matrix times row m of the activations: the sum over runs r of
    scale[s, r >> shift] * xs[m, r] * (codes[n] . xq[m] over run r) (+ min[s, r >> shift] * sums[m, r]),
    s: the row of scales and mins (n, or 0 for a row's scales repeated per run).
    Every array is 2-D and C-contiguous; rows are addressed in place (a row view per call would cost two
    atomic reference counts each, more than a short row's products)."""
    scale_types = (types.float32, types.uint16, types.int16)
    has_mins = not isinstance(mins, types.NoneType)
    if not (_matrix_ok(codes, (types.uint8, types.int8)) and _matrix_ok(xq, (types.int16,))
            and _matrix_ok(xs, (types.float32,)) and _matrix_ok(sums, (types.float32,))
            and _matrix_ok(scales, scale_types)
            and (not has_mins or (_matrix_ok(mins, scale_types) and mins.dtype == scales.dtype))
            and all(isinstance(i, types.Integer) for i in (n, m, s, shift))):
        return None
    four_bit = codes.dtype == types.uint8

    def codegen(context, builder, signature, args):
        def index_arg(position):
            return context.cast(builder, args[position], signature.args[position], types.intp)

        def row(position, row_index):
            # the first element of row `row_index` of the 2-D C-contiguous array argument `position`
            array = context.make_array(signature.args[position])(context, builder, args[position])
            width = builder.extract_value(array.shape, 1)
            return builder.gep(array.data, [builder.mul(row_index, width)])

        n_value, m_value, s_value = index_arg(1), index_arg(5), index_arg(8)
        code_ptr = builder.bitcast(row(0, n_value), _I8.as_pointer())
        xq_ptr, xs_ptr, sums_ptr = row(2, m_value), row(3, m_value), row(4, m_value)
        scale_ptr = row(6, s_value)
        min_ptr = row(7, s_value) if has_mins else None
        xs_array = context.make_array(signature.args[3])(context, builder, args[3])
        runs = builder.extract_value(xs_array.shape, 1)               # xs: one per run
        index = runs.type
        shift_value = index_arg(9)

        def const(value):
            return ir.Constant(index, value)

        def load(ptr, offset, vector_type):
            loaded = builder.load(builder.bitcast(builder.gep(ptr, [offset]), vector_type.as_pointer()))
            loaded.align = 1
            return loaded

        def pair_sums(a, b):
            # a, b <16 x i16> -> <8 x i32> sums of adjacent products: the pattern that becomes vpmaddwd
            products = builder.mul(builder.sext(a, _vec(_I32, 16)), builder.sext(b, _vec(_I32, 16)))
            even = builder.shuffle_vector(products, products, ir.Constant(_vec(_I32, 8), list(range(0, 16, 2))))
            odd = builder.shuffle_vector(products, products, ir.Constant(_vec(_I32, 8), list(range(1, 16, 2))))
            return builder.add(even, odd)

        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), None))
                        for _ in range(ACCUMULATORS)]
        min_accumulators = [cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0)) for _ in range(ACCUMULATORS)]

        def run(r, slot):
            x_at = builder.mul(r, const(RUN))
            x_low, x_high = load(xq_ptr, x_at, _vec(_I16, 16)), load(xq_ptr, builder.add(x_at, const(16)), _vec(_I16, 16))
            if four_bit:
                packed = load(code_ptr, builder.mul(r, const(RUN // 2)), _vec(_I8, 16))
                low = builder.and_(packed, ir.Constant(_vec(_I8, 16), [15] * 16))
                high = builder.lshr(packed, ir.Constant(_vec(_I8, 16), [4] * 16))
                w_low, w_high = builder.zext(low, _vec(_I16, 16)), builder.zext(high, _vec(_I16, 16))
            else:
                w_low = builder.sext(load(code_ptr, x_at, _vec(_I8, 16)), _vec(_I16, 16))
                w_high = builder.sext(load(code_ptr, builder.add(x_at, const(16)), _vec(_I8, 16)), _vec(_I16, 16))
            dots = builder.sitofp(builder.add(pair_sums(w_low, x_low), pair_sums(w_high, x_high)), _vec(_F32, 8))
            group = builder.lshr(r, shift_value)
            scale = _widen_ir(builder, builder.load(builder.gep(scale_ptr, [group])), scales.dtype)
            scale = builder.fmul(scale, builder.load(builder.gep(xs_ptr, [r])), flags=_FLAGS)
            splat = builder.insert_element(ir.Constant(_vec(_F32, 8), None), scale, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(splat, splat, ir.Constant(_vec(_I32, 8), [0] * 8))
            total = builder.fadd(builder.load(accumulators[slot]), builder.fmul(dots, splat, flags=_FLAGS),
                                 flags=_FLAGS)
            builder.store(total, accumulators[slot])

        blocks = builder.udiv(runs, const(ACCUMULATORS))
        with cgutils.for_range(builder, blocks) as loop:
            for slot in range(ACCUMULATORS):
                run(builder.add(builder.mul(loop.index, const(ACCUMULATORS)), const(slot)), slot)
        done = builder.mul(blocks, const(ACCUMULATORS))
        with cgutils.for_range(builder, builder.sub(runs, done)) as loop:
            run(builder.add(done, loop.index), 0)
        if has_mins:              # its own loop, which LLVM vectorises: sum over runs of min[group] * sums[r]
            with cgutils.for_range(builder, runs) as loop:
                group = builder.lshr(loop.index, shift_value)
                low_bound = _widen_ir(builder, builder.load(builder.gep(min_ptr, [group])), mins.dtype)
                term = builder.fmul(low_bound, builder.load(builder.gep(sums_ptr, [loop.index])), flags=_FLAGS)
                builder.store(builder.fadd(builder.load(min_accumulators[0]), term, flags=_FLAGS),
                              min_accumulators[0])
        vector = builder.load(accumulators[0])
        scalar = builder.load(min_accumulators[0])
        for slot in range(1, ACCUMULATORS):
            vector = builder.fadd(vector, builder.load(accumulators[slot]), flags=_FLAGS)
            scalar = builder.fadd(scalar, builder.load(min_accumulators[slot]), flags=_FLAGS)
        for lane in range(8):
            scalar = builder.fadd(scalar, builder.extract_element(vector, ir.Constant(_I32, lane)), flags=_FLAGS)
        return scalar

    return types.float32(codes, n, xq, xs, sums, m, scales, mins, s, shift), codegen
