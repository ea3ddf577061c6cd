"""Software prefetch for the Numba kernels: start reading cache lines from RAM before a loop needs them.

The hardware prefetchers follow one stream per loop well but start late and stop at page boundaries; a kernel
that computes on one block while it names the next block's lines keeps RAM busy while it computes (measured
1.06-1.25x on decode attention from RAM, where the K of one block and the V of the same block are two streams).
"""
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

CACHE_LINE = 64  # bytes
LOCALITY = 2  # llvm.prefetch locality: 2 = into L2 and below (prefetcht1); 3 (L1 too) measured the same


@intrinsic
def prefetch(typingctx, array, row, col):
    """llvm.prefetch (a read) of array[row, col]'s cache line, for a 2-D array: a hint only, never a fault."""
    if not isinstance(array, types.Array) or array.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        data = context.make_array(array_type)(context, builder, args[0])
        index = [context.cast(builder, value, kind, types.intp) for value, kind in zip(args[1:], signature.args[1:])]
        pointer = cgutils.get_item_pointer(context, builder, array_type, data, index, wraparound=False)
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        # llvm.prefetch.p0i8: the typed-pointer name (older LLVMs); newer ones upgrade it to llvm.prefetch.p0
        fn = builder.module.declare_intrinsic("llvm.prefetch", [byte_pointer],
                                              ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(pointer, byte_pointer), i32(0), i32(LOCALITY), i32(1)])
        return context.get_dummy_value()

    return types.void(array, row, col), codegen


@njit(nogil=True, inline="always")
def prefetch_row(block, row, end):
    """Prefetch every cache line of row `row` of a C-contiguous [N, D] array, if row < min(end, N)."""
    if row < min(end, block.shape[0]):
        for d in range(0, block.shape[1], max(1, CACHE_LINE // block.itemsize)):
            prefetch(block, row, d)
