"""One output of a packed matrix as integer dot products: the codes of a row times activations quantized per
run of 32 inputs, in LLVM IR that the x86 backend turns into `vpmaddwd` / `vpmaddubsw` (SSE2 and other CPUs
get the equivalent code of their own).

Why: widening each 4-bit code to float32 (zero-extend, convert, multiply-add: ~0.9 instructions a weight) made
the float kernels compute-bound at about half the memory bandwidth on 2 cores; as small integers a run of 32
weights costs ~10 instructions, so a row is read at memory speed.

The activations' precision follows the weights':
- 8-bit codes meet int16 activations (an error of 2^-16 of each run's largest, 256x finer than bfloat16);
  a run is two `vpmaddwd` (16 products and 8 pair sums each).
- 4-bit codes meet int8 activations (2^-8 of the run's largest; the weights' own step is 1/15 of their range,
  16x coarser; llama.cpp uses 8 bits for every layout). Runs go two at a time: with AVX2 a pair is one
  32-byte load of codes, two `vpmaddubsw` (32 unsigned codes times 32 signed activations each, 16 pair sums
  of at most 2 * 15 * 127, added as 16-bit sums: never saturated) and one `vpmaddwd` by ones; elsewhere the
  same integers through portable widening IR, so results match exactly.

    quantize_rows(x, four_bit, xq, xs, sums)    # x [M, K] f32 -> xq [M, K] int8 (four_bit) / int16, xs, sums [M, K/32]
    packed_dot(codes, n, xq, m, run_scales, s, block_scales or None, block_shift) -> float32   # W[n] . x[m]

A run is 32 inputs: 32 int8 codes, or 16 bytes of 4-bit codes (byte j: input 2j in its low nibble, 2j+1 in
its high one). To match, xq holds each pair of 4-bit runs (A, B) as A's even inputs, B's even, A's odd, B's
odd (the low nibbles of the pair's 32 bytes, then the high ones); a last run without a partner as its even
inputs, then its odd ones. The caller folds the weights' and the activations' scales of each run into
run_scales, or passes the weights' per block of 4 runs (block_scales), and adds mins * sums itself. Four
accumulators hide the latency of the adds.
"""
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

RUN = 32                      # inputs per run: one scale of the activations
INT16_MAX = np.float32(32767.0)
INT8_MAX = np.float32(127.0)
ACCUMULATORS = 4

# reassociation and FMA contraction, but NaN and inf kept meaningful (a non-finite activation gives NaN)
_FLAGS = ("reassoc", "contract", "nsz", "arcp")
_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


def _vec(element, count):
    return ir.VectorType(element, count)


@njit(nogil=True, cache=True)
def quantize_rows(x, four_bit, xq, xs, sums):
    """x [M, K] f32 (K a multiple of 32) -> xq [M, K] (int8 for 4-bit codes, laid out per pair of runs as the
    module docstring says; int16 for 8-bit codes, in order), xs [M, K/32] f32 (each run's scale: x ~ xq * xs) and sums [M, K/32] f32
    (each run's sum of x). A run of zeros gets scale 0; a run holding inf or NaN gets a NaN scale (its
    outputs become NaN)."""
    rows, inputs = x.shape
    half = RUN // 2
    limit = INT8_MAX if four_bit else INT16_MAX
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
            inv = limit / peak if finite and peak > 0 else np.float32(0.0)
            xs[m, r] = peak / limit if finite else np.float32(np.nan)
            if four_bit:
                # runs in pairs (A, B): A's even inputs, B's even, A's odd, B's odd; a last lone run: even, odd
                lone = r % 2 == 0 and r + 1 == inputs // RUN
                even_at = base if lone else (r - r % 2) * RUN + (r % 2) * half
                odd_at = even_at + (half if lone else RUN)
                for j in range(half):
                    xq[m, even_at + j] = np.rint(x[m, base + 2 * j] * inv)
                    xq[m, odd_at + j] = np.rint(x[m, base + 2 * j + 1] * inv)
            else:
                for j in range(RUN):
                    xq[m, base + j] = np.rint(x[m, base + j] * inv)


def activations_for(codes, rows, inputs):
    """An empty [rows, inputs] array for quantize_rows' activations: int8 for 4-bit codes (uint8), else int16."""
    return np.empty((rows, inputs), np.int8 if codes.dtype == np.uint8 else np.int16)


@overload(activations_for)
def _activations_for(codes, rows, inputs):
    # in Numba code the element type follows the codes' type, so each caller compiles to one array type
    dtype = np.int8 if codes.dtype == types.uint8 else np.int16
    return lambda codes, rows, inputs: np.empty((rows, inputs), dtype)


def _matrix_ok(array, dtypes) -> bool:
    return isinstance(array, types.Array) and array.ndim == 2 and array.layout == "C" and array.dtype in dtypes


def _has_avx2(context) -> bool:
    """Whether the code Numba generates here may use AVX2 (its target machine's features)."""
    features = getattr(context.codegen(), "_tm_features", "") or ""
    return "+avx2" in features.split(",")


@intrinsic
def packed_dot(typingctx, codes, n, xq, m, run_scales, s, block_scales, block_shift):
    """Row n of the packed matrix times row m of the activations: the sum over runs r of
    run_scales[s, r] * (codes[n] . xq[m] over run r), each run's sum also times block_scales[0, b >> block_shift]
    (b = r // 4, a block of 4 runs) unless block_scales is None. For 4-bit codes with block scales,
    run_scales holds each run's scale 4 times in a row ([s, 4 r .. 4 r + 3]: two runs' scales are then one
    8-lane load). 4-bit codes (uint8) take int8 activations, 8-bit codes (int8) int16 ones. Every array is 2-D and C-contiguous; rows are addressed in place (a row
    view per call would cost two atomic reference counts each, more than a short row's products)."""
    four_bit = isinstance(codes, types.Array) and codes.dtype == types.uint8
    blocked = not isinstance(block_scales, types.NoneType)
    if not (_matrix_ok(codes, (types.uint8, types.int8))
            and _matrix_ok(xq, (types.int8,) if four_bit else (types.int16,))
            and _matrix_ok(run_scales, (types.float32,))
            and (not blocked or _matrix_ok(block_scales, (types.float32,)))
            and all(isinstance(i, types.Integer) for i in (n, m, s, block_shift))):
        return None

    def codegen(context, builder, signature, args):
        def index_arg(position):
            return context.cast(builder, args[position], signature.args[position], types.intp)

        def row(position, row_index):
            # the first element of row `row_index` of the 2-D C-contiguous array argument `position`
            array = context.make_array(signature.args[position])(context, builder, args[position])
            width = builder.extract_value(array.shape, 1)
            return builder.gep(array.data, [builder.mul(row_index, width)])

        code_ptr = builder.bitcast(row(0, index_arg(1)), _I8.as_pointer())
        xq_ptr = row(2, index_arg(3))
        scale_ptr = row(4, index_arg(5))              # 4-bit with block scales: each run's 4 times (see pair)
        block_ptr = row(6, ir.Constant(cgutils.intp_t, 0)) if blocked else None
        shift_value = index_arg(7)
        scales_array = context.make_array(signature.args[4])(context, builder, args[4])
        runs = builder.extract_value(scales_array.shape, 1)
        if four_bit and blocked:
            runs = builder.udiv(runs, ir.Constant(runs.type, 4))
        index = runs.type
        avx2 = four_bit and _has_avx2(context)

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

        def x86(name, result, *operands):
            function = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(result, [value.type for value in operands]), name)
            return builder.call(function, list(operands))

        def nibbles(r):
            # 16 bytes of 4-bit codes -> <32 x i8>: the low nibbles (even inputs), then the high ones (odd)
            packed = load(code_ptr, builder.mul(r, const(RUN // 2)), _vec(_I8, 16))
            shifted = builder.bitcast(builder.lshr(builder.bitcast(packed, _vec(_I16, 8)),
                                                   ir.Constant(_vec(_I16, 8), [4] * 8)), _vec(_I8, 16))
            both = builder.shuffle_vector(packed, shifted, ir.Constant(_vec(_I32, 32), list(range(32))))
            return builder.and_(both, ir.Constant(_vec(_I8, 32), [15] * 32))

        def quad_sums(codes32, x32):
            # <32 x i8> unsigned codes, signed activations -> <8 x i32> sums of 4 adjacent products (portable)
            wide_codes, wide_x = builder.zext(codes32, _vec(_I16, 32)), builder.sext(x32, _vec(_I16, 32))
            halves = [[builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 16), list(range(start, start + 16))))
                       for v in (wide_codes, wide_x)] for start in (0, 16)]
            sums = builder.shuffle_vector(pair_sums(*halves[0]), pair_sums(*halves[1]),
                                          ir.Constant(_vec(_I32, 16), list(range(16))))
            even = builder.shuffle_vector(sums, sums, ir.Constant(_vec(_I32, 8), list(range(0, 16, 2))))
            odd = builder.shuffle_vector(sums, sums, ir.Constant(_vec(_I32, 8), list(range(1, 16, 2))))
            return builder.add(even, odd)

        def pair_dots(p):
            # 32 bytes of codes (runs 2p, 2p + 1): low nibbles [A's even inputs, B's even], high ones the odd;
            # xq holds the pair as A even, B even, A odd, B odd -> <8 x i32>, 4 partial sums per run
            packed = load(code_ptr, builder.mul(p, const(RUN)), _vec(_I8, 32))
            mask = ir.Constant(_vec(_I8, 32), [15] * 32)
            low = builder.and_(packed, mask)
            high = builder.and_(builder.bitcast(builder.lshr(builder.bitcast(packed, _vec(_I16, 16)),
                                                             ir.Constant(_vec(_I16, 16), [4] * 16)), _vec(_I8, 32)), mask)
            x_at = builder.mul(p, const(2 * RUN))
            x_even, x_odd = load(xq_ptr, x_at, _vec(_I8, 32)), load(xq_ptr, builder.add(x_at, const(RUN)), _vec(_I8, 32))
            if avx2:       # each 16-bit pair sum is at most 2 * 15 * 127, so two of them add without overflow
                both = builder.add(x86("llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), low, x_even),
                                   x86("llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), high, x_odd))
                return x86("llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), both, ir.Constant(_vec(_I16, 16), [1] * 16))
            return builder.add(quad_sums(low, x_even), quad_sums(high, x_odd))

        def run_dots(r, x_at):
            # <8 x i32> partial sums of run r's 32 products
            if four_bit:
                codes32, x32 = nibbles(r), load(xq_ptr, x_at, _vec(_I8, 32))
                if avx2:
                    pairs = x86("llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), codes32, x32)
                    return x86("llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), pairs, ir.Constant(_vec(_I16, 16), [1] * 16))
                wide_codes, wide_x = builder.zext(codes32, _vec(_I16, 32)), builder.sext(x32, _vec(_I16, 32))
                halves = [[builder.shuffle_vector(v, v, ir.Constant(_vec(_I32, 16), list(range(start, start + 16))))
                           for v in (wide_codes, wide_x)] for start in (0, 16)]
                return builder.add(pair_sums(*halves[0]), pair_sums(*halves[1]))
            x_low, x_high = load(xq_ptr, x_at, _vec(_I16, 16)), load(xq_ptr, builder.add(x_at, const(16)), _vec(_I16, 16))
            w_low = builder.sext(load(code_ptr, x_at, _vec(_I8, 16)), _vec(_I16, 16))
            w_high = builder.sext(load(code_ptr, builder.add(x_at, const(16)), _vec(_I8, 16)), _vec(_I16, 16))
            return builder.add(pair_sums(w_low, x_low), pair_sums(w_high, x_high))

        accumulators = [cgutils.alloca_once_value(builder, ir.Constant(_vec(_F32, 8), None))
                        for _ in range(ACCUMULATORS)]

        def splat(scale):
            vector = builder.insert_element(ir.Constant(_vec(_F32, 8), None), scale, ir.Constant(_I32, 0))
            return builder.shuffle_vector(vector, vector, ir.Constant(_vec(_I32, 8), [0] * 8))

        def accumulate(slot, dots, scale):
            total = builder.fadd(builder.load(accumulators[slot]), builder.fmul(dots, scale, flags=_FLAGS),
                                 flags=_FLAGS)
            builder.store(total, accumulators[slot])

        def run(r, slot, block_scale=None):
            dots = builder.sitofp(run_dots(r, builder.mul(r, const(RUN))), _vec(_F32, 8))
            if block_scale is not None:
                dots = builder.fmul(dots, block_scale, flags=_FLAGS)
            accumulate(slot, dots, splat(builder.load(builder.gep(scale_ptr, [r]))))

        def pair(p, slot, block_scale=None):
            # 4-bit runs 2p and 2p + 1 at once: lanes 0-3 of the sums are the first run's, 4-7 the second's
            dots = builder.sitofp(pair_dots(p), _vec(_F32, 8))
            if block_scale is not None:
                dots = builder.fmul(dots, block_scale, flags=_FLAGS)
            if blocked:                            # the widened row: one 8-lane load
                scale = load(scale_ptr, builder.mul(p, const(8)), _vec(_F32, 8))
            else:
                two = load(scale_ptr, builder.mul(p, const(2)), _vec(_F32, 2))
                scale = builder.shuffle_vector(two, two, ir.Constant(_vec(_I32, 8), [0, 0, 0, 0, 1, 1, 1, 1]))
            accumulate(slot, dots, scale)

        if four_bit:
            pairs = builder.lshr(runs, const(1))
            blocks = builder.udiv(pairs, const(ACCUMULATORS))
            with cgutils.for_range(builder, blocks) as loop:
                for slot in range(ACCUMULATORS):
                    p = builder.add(builder.mul(loop.index, const(ACCUMULATORS)), const(slot))
                    if blocked and slot % 2 == 0:          # a block is 4 runs: pairs 2b and 2b + 1
                        group = builder.lshr(p, builder.add(shift_value, const(1)))
                        block_scale = splat(builder.load(builder.gep(block_ptr, [group])))
                    pair(p, slot, block_scale if blocked else None)
            done = builder.mul(blocks, const(ACCUMULATORS))
            with cgutils.for_range(builder, builder.sub(pairs, done)) as loop:
                p = builder.add(done, loop.index)
                block_scale = None
                if blocked:
                    group = builder.lshr(p, builder.add(shift_value, const(1)))
                    block_scale = splat(builder.load(builder.gep(block_ptr, [group])))
                pair(p, 0, block_scale)
            odd = builder.icmp_unsigned("!=", builder.and_(runs, const(1)), const(0))
            with builder.if_then(odd):              # a last run of its own (never with block scales)
                last = builder.sub(runs, const(1))
                dots = builder.sitofp(run_dots(last, builder.mul(last, const(RUN))), _vec(_F32, 8))
                accumulate(1, dots, splat(builder.load(builder.gep(scale_ptr, [last]))))
        else:
            blocks = builder.udiv(runs, const(ACCUMULATORS))
            with cgutils.for_range(builder, blocks) as loop:
                block_scale = None
                if blocked:
                    block_scale = splat(builder.load(builder.gep(block_ptr, [builder.lshr(loop.index, shift_value)])))
                for slot in range(ACCUMULATORS):
                    run(builder.add(builder.mul(loop.index, const(ACCUMULATORS)), const(slot)), slot, block_scale)
            done = builder.mul(blocks, const(ACCUMULATORS))
            with cgutils.for_range(builder, builder.sub(runs, done)) as loop:
                run(builder.add(done, loop.index), 0)
        vector = builder.load(accumulators[0])
        for slot in range(1, ACCUMULATORS):
            vector = builder.fadd(vector, builder.load(accumulators[slot]), flags=_FLAGS)
        scalar = builder.extract_element(vector, ir.Constant(_I32, 0))
        for lane in range(1, 8):
            scalar = builder.fadd(scalar, builder.extract_element(vector, ir.Constant(_I32, lane)), flags=_FLAGS)
        return scalar

    return types.float32(codes, n, xq, m, run_scales, s, block_scales, block_shift), codegen
