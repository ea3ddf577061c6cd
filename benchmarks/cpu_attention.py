"""Decode attention over a CPU KV cache: cpu_kernels.attention vs torch SDPA vs memory bandwidth.

For each cache dtype and shape (T = 1, every row at full length S) it prints, measured in one run:
  ours      time per call of cpu_kernels.attention and its achieved K+V read rate (GB/s)
  %bw       that rate as a fraction of the machine's measured read bandwidth
  sdpa      torch.nn.functional.scaled_dot_product_attention on the same cache tensors in the same
            dtype (q cast to it), GQA through `enable_gqa=True` (no K/V repeat copy)
  speedup   sdpa time / our time
Read bandwidth: cpu_kernels.speed.read_bandwidth (the best of numpy sums and a Numba wide-lane sum of 1 GiB).
Each timed call reads a different copy of the cache (copies sum to > 4x the L3 size) so that the
cache is read from RAM, as in a real decode step where every layer's cache is touched once.

    python benchmarks/cpu_attention.py            # Llama-3-8B-like GQA shapes + one MHA shape
    python benchmarks/cpu_attention.py --quick    # S <= 4096, B = 1 only
"""
import argparse
import math
import statistics
import time

import numba
import torch
import torch.nn.functional as F

import cpu_kernels
from cpu_kernels.speed import read_bandwidth

MIN_WORKING_SET_BYTES = 512 << 20  # > 4x a 32 MiB L3: timed calls read from RAM


def time_per_call(fn, num_copies: int, repeats: int) -> float:
    """Median seconds of fn(i) over `repeats` rounds, each round cycling through every copy once."""
    fn(0)  # compile / warm up
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(num_copies):
            fn(i)
        rounds.append((time.perf_counter() - start) / num_copies)
    return statistics.median(rounds)


def bench_shape(dtype, num_rows, num_heads, num_kv_heads, seq_len, head_dim, repeats):
    shape = (num_rows, num_kv_heads, seq_len, head_dim)
    cache_bytes = 2 * math.prod(shape) * torch.tensor([], dtype=dtype).element_size()  # K + V
    num_copies = max(1, math.ceil(MIN_WORKING_SET_BYTES / cache_bytes))
    caches = [(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)) for _ in range(num_copies)]
    q = torch.randn(num_rows, num_heads, 1, head_dim)
    q_cast = q.to(dtype)
    lengths = torch.full((num_rows,), seq_len)

    ours = time_per_call(lambda i: cpu_kernels.attention(q, caches[i][0], caches[i][1], lengths),
                         num_copies, repeats)
    theirs = time_per_call(lambda i: F.scaled_dot_product_attention(
        q_cast, caches[i][0], caches[i][1], enable_gqa=num_heads != num_kv_heads), num_copies, repeats)
    # same answer, so that the comparison is of equal work
    expected = F.scaled_dot_product_attention(q.double(), caches[0][0].double(), caches[0][1].double(),
                                              enable_gqa=num_heads != num_kv_heads)
    error = (cpu_kernels.attention(q, caches[0][0], caches[0][1], lengths) - expected).abs().max().item()
    assert error < 1e-4, f"kernel disagrees with float64 SDPA by {error}"
    return ours, theirs, cache_bytes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="S in {1024, 4096}, B = 1 only")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="cache lengths S (default 1024 4096 16384)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes B (default 1 4)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per measurement (median)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16"],
                        default=["float32", "bfloat16", "float16"], help="cache dtypes")
    parser.add_argument("--threads", type=int, help="numba threads (default: numba's default)")
    args = parser.parse_args(argv)
    seq_lens = args.seq_lens or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    batch_sizes = args.batch_sizes or ([1] if args.quick else [1, 4])
    if min(seq_lens + batch_sizes + [args.repeats]) < 1:
        parser.error("sizes and --repeats must be >= 1")
    if args.threads:
        numba.set_num_threads(args.threads)
    num_threads = numba.get_num_threads()
    torch.set_num_threads(num_threads)

    bandwidth = read_bandwidth(num_threads)
    print(f"threads: numba {num_threads}, torch {torch.get_num_threads()}; measured read bandwidth "
          f"{bandwidth:.1f} GB/s (best of numpy sums and a Numba wide-lane sum)")
    print("torch SDPA: same cache tensors and dtype, q cast to it, GQA via enable_gqa=True")
    shapes = [("GQA 32/8", b, 32, 8, s, 128) for b in batch_sizes for s in seq_lens]
    shapes += [("MHA 32/32", 1, 32, 32, s, 128) for s in seq_lens[-1:]]
    header = (f"{'dtype':9} {'shape':9} {'B':>2} {'S':>6} {'KV MB':>7} {'ours ms':>8} {'GB/s':>6} {'%bw':>5} "
              f"{'sdpa ms':>8} {'speedup':>7}")
    print(header)
    print("-" * len(header))
    for dtype in (getattr(torch, name) for name in args.dtypes):
        for name, num_rows, num_heads, num_kv_heads, seq_len, head_dim in shapes:
            ours, theirs, cache_bytes = bench_shape(dtype, num_rows, num_heads, num_kv_heads, seq_len,
                                                    head_dim, args.repeats)
            rate = cache_bytes / ours / 1e9
            print(f"{str(dtype).replace('torch.', ''):9} {name:9} {num_rows:>2} {seq_len:>6} "
                  f"{cache_bytes / 1e6:>7.1f} {ours * 1e3:>8.3f} {rate:>6.1f} {100 * rate / bandwidth:>4.0f}% "
                  f"{theirs * 1e3:>8.3f} {theirs / ours:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
