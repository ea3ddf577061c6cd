"""How fast this CPU runs decode steps itself: what `offload-plan --profile` learns for layers computed on
the CPU, measured with the kernels the runtime runs there.

Per kind of layer matrix ("dense": bfloat16; "int8", "int4": packed per group of 32, bf16 scales):
- the matmul rate: bytes of weights as held read per second by one-row products over matrices that do not
  fit in the caches (the dense and packed kernels of `_linear_kernel.py`);
- the memory read bandwidth (`read_bandwidth`): the physical limit the kernels' rates are compared against;
- the layer overhead: one fused decode step (`decode_layer`, what offload/models/cpu_decoder.py calls for
  a Llama-like layer, with the same conversions of the hidden states around it) of a tiny layer whose
  weights are small enough that only the dispatch of its work counts. Families the fused step does not
  cover run their eager math, which costs more per layer (the cost model keeps its default for them).
"""
from __future__ import annotations

import threading
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from ._append_kernel import TO_BF16
from ._checks import cache_view
from ._attention_kernel import NO_DEPTH, NO_TREE
from ._decoder_kernel import BF16, decode_layer
from ._linear_kernel import dense_linear
from .linear import BLOCKS_PER_THREAD, PackedMatrix

KINDS = ("dense", "int8", "int4")
GROUP = 32
LANES = 64  # float32 partial sums per thread in `_stream_sum`: eight AVX2 registers, no loop-carried stall


@njit(parallel=True, nogil=True, fastmath=True, cache=True)
def _stream_sum(data, parts):
    # data: [N, LANES] float32, read once in `parts` contiguous slabs (one per thread); each row is summed into
    # LANES independent partial sums, so the loop issues loads as fast as the core can and RAM sets the rate
    step = (data.shape[0] + parts - 1) // parts
    sums = np.zeros((parts, LANES), np.float32)
    for part in prange(parts):
        acc = np.zeros(LANES, np.float32)
        for i in range(part * step, min(data.shape[0], (part + 1) * step)):
            for lane in range(LANES):
                acc[lane] += data[i, lane]
        sums[part] = acc
    return sums.sum()


def read_bandwidth(num_threads: int | None = None, num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """The machine's memory read bandwidth in GB/s: the best of `repeats` reads of a float32 array of `num_bytes`
    (more than the caches hold), each way measured: numpy's sum on one thread and on `num_threads` threads (numba's
    count by default), and a Numba loop of wide partial sums on those threads (numpy's pairwise sum measured
    ~20% below it on a 2-core Zen 3: a kernel must not be compared against a limit it can beat)."""
    num_threads = num_threads or numba.get_num_threads()
    data = np.ones((max(num_bytes // 4 // LANES, num_threads), LANES), dtype=np.float32)
    flat = data.reshape(-1)
    chunks = np.array_split(flat, num_threads)
    _stream_sum(data[:num_threads], num_threads)  # compile
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        flat.sum()
        best = max(best, data.nbytes / (time.perf_counter() - start))
        threads = [threading.Thread(target=chunk.sum) for chunk in chunks]  # numpy drops the GIL
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = max(best, data.nbytes / (time.perf_counter() - start))
        start = time.perf_counter()
        _stream_sum(data, num_threads)
        best = max(best, data.nbytes / (time.perf_counter() - start))
    return best / 1e9


def _bf16_bits(shape, rng: np.random.Generator, scale: float) -> np.ndarray:
    values = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * scale)
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _matrix(kind: str, rows: int, cols: int, rng: np.random.Generator) -> tuple:
    """(codes, scales, mins, min_factor, bias) as decode_layer takes a matrix, random."""
    no_bias = np.zeros(0, np.float32)
    if kind == "dense":
        return _bf16_bits((rows, cols), rng, 0.02), np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), \
            0.0, no_bias
    scales = np.abs(_bf16_bits((rows, cols // GROUP), rng, 0.01))
    if kind == "int8":
        codes = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
        return codes, scales, np.zeros((1, 1), np.uint16), 0.0, no_bias
    codes = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
    return codes, scales, _bf16_bits((rows, cols // GROUP), rng, 0.01), 1.0, no_bias


def _held_bytes(matrix: tuple) -> int:
    codes, scales, mins, min_factor, _ = matrix
    return codes.nbytes + (scales.nbytes if codes.dtype != np.uint16 else 0) + (mins.nbytes if min_factor == 1 else 0)


def matmul_rate(kind: str, *, total_bytes: int = 96 << 20, repeats: int = 3) -> float:
    """Bytes of weights (as held) per second of one-row decode products with `kind` matrices: four matrices
    of `total_bytes` together, each read once per pass, the fastest of `repeats` passes."""
    rng = np.random.default_rng(0)
    cols = 4096
    per_row = _held_bytes(_matrix(kind, 32, cols, rng)) / 32
    rows = max(32, int(total_bytes / 4 / per_row) // 32 * 32)
    matrices = [_matrix(kind, rows, cols, rng) for _ in range(4)]
    x = torch.from_numpy(rng.standard_normal((1, cols), dtype=np.float32))
    out = np.empty((1, rows), np.float32)
    blocks = numba.get_num_threads() * BLOCKS_PER_THREAD
    packed = [PackedMatrix.of(torch.from_numpy(codes), torch.from_numpy(scales.view(np.int16)).view(torch.bfloat16),
                              torch.from_numpy(mins.view(np.int16)).view(torch.bfloat16) if min_factor == 1 else None)
              for codes, scales, mins, min_factor, _ in matrices] if kind != "dense" else []

    def one_pass():
        if kind == "dense":
            for codes, *_ in matrices:
                dense_linear(x.numpy(), codes, blocks, out)
        for matrix in packed:
            matrix(x, integer=True)                         # as in a 16-bit model
    one_pass()                                               # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return sum(_held_bytes(m) for m in matrices) / best


def layer_overhead(kind: str, *, steps: int = 200) -> float:
    """Seconds of one fused decode step of a tiny bfloat16 layer of `kind` matrices (median of `steps`)."""
    hidden, heads, kv_heads, head_dim, inner, max_len = 256, 4, 2, 64, 512, 64
    rng = np.random.default_rng(0)
    shapes = [(heads * head_dim, hidden), (kv_heads * head_dim, hidden), (kv_heads * head_dim, hidden),
              (hidden, heads * head_dim), (inner, hidden), (inner, hidden), (hidden, inner)]
    matrices = [_matrix(kind, rows, cols, rng) for rows, cols in shapes]
    norm = np.ones(hidden, np.float32)
    k_cache, v_cache = (np.zeros((1, kv_heads, max_len, head_dim), np.uint16) for _ in range(2))
    cos, sin = np.ones((1, head_dim), np.float32), np.zeros((1, head_dim), np.float32)
    h = torch.from_numpy(rng.standard_normal((1, 1, hidden), dtype=np.float32)).to(torch.bfloat16)
    blocks = numba.get_num_threads() * BLOCKS_PER_THREAD
    times = []
    for step in range(steps):
        start = time.perf_counter()
        result = torch.empty((1, 1, hidden), dtype=torch.bfloat16)      # as CpuDecoderSteps.step passes them
        x = cache_view(h.reshape(1, hidden), fp16_as_int16=True)
        decode_layer(x, norm, norm, 1e-5, *matrices, cos, sin, heads, kv_heads, head_dim, k_cache, v_cache,
                     TO_BF16, k_cache, v_cache, np.array([step % max_len], np.int64), 1, NO_TREE, NO_DEPTH, 1,
                     head_dim ** -0.5, 0, BF16, blocks, cache_view(result.view(1, hidden), fp16_as_int16=False))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_cpu_decode(total_bytes: int = 96 << 20) -> tuple[tuple, tuple]:
    """((kind, matmul bytes/s), ...), ((kind, layer overhead s), ...) for every kind (a few seconds);
    `total_bytes`: the matrices' size per kind (more than the CPU's caches hold, for a true rate)."""
    return (tuple((kind, matmul_rate(kind, total_bytes=total_bytes)) for kind in KINDS),
            tuple((kind, layer_overhead(kind)) for kind in KINDS))
