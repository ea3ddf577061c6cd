"""The kernels release the GIL and may be called from several threads at once."""
import math
import subprocess
import sys
import threading

import numpy as np
import torch

import cpu_kernels
from cpu_kernels._attention_kernel import attend, tile_queries
from tests.cpu_kernels.reference import random_caches


def test_kernel_runs_without_the_gil():
    # With a huge switch interval the interpreter never forces a thread off the GIL: the main thread
    # can only run while the worker is inside the kernel if the kernel released the GIL. Decided by
    # what the main thread observes, not by timing. (Checked to fail with a `nogil=False` build of the
    # kernel without parallel=True; Numba's parallel launch also lets go of the GIL.)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1, 128, generator=g).numpy()
    k, v = random_caches(1, 2, 8192, 128, torch.float32, g)
    lengths = np.array([8192], dtype=np.int64)
    out = np.empty_like(q)
    args = (q, k.numpy(), v.numpy(), lengths, np.float32(1 / math.sqrt(128)), 0, np.float32(0.0),
            np.zeros((0, 0), np.uint8), np.zeros(0, np.int64), out, tile_queries(1, 4))
    attend(*args)  # compiled (or loaded) before the measurement

    started, seen, done = threading.Event(), threading.Event(), threading.Event()
    calls = []

    def worker():
        started.set()
        while not seen.is_set() and len(calls) < 2000:  # bounded if the GIL is never released
            attend(*args)  # numpy arrays only: no torch call that could drop the GIL for us
            calls.append(1)
        done.set()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        started.wait()
        finished_before_main_ran = done.is_set()
        seen.set()
        thread.join()
    finally:
        sys.setswitchinterval(previous)
    assert not finished_before_main_ran, "the main thread only ran after the worker finished: GIL held"


def test_concurrent_calls_from_threads_give_the_single_threaded_results():
    g = torch.Generator().manual_seed(1)
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q = torch.randn(2, 8, 3, 64, generator=g)
        k, v = random_caches(2, 2, 300, 64, dtype, g)
        lengths = torch.tensor([300, 57])
        cases.append((q, k, v, lengths, cpu_kernels.attention(q, k, v, lengths)))
    failures = []

    def run(case):
        q, k, v, lengths, expected = case
        for _ in range(20):
            if not torch.equal(cpu_kernels.attention(q, k, v, lengths), expected):
                failures.append(str(k.dtype))
            # rewrite each row's last token with its own value: the cache must not change
            k_last = torch.stack([k[0, :, 299:300], k[1, :, 56:57]])  # [B, Hkv, 1, D]
            v_last = torch.stack([v[0, :, 299:300], v[1, :, 56:57]])
            cpu_kernels.append_kv(k, v, k_last, v_last, [299, 56])

    # each thread owns its case; only the kernel launches overlap
    threads = [threading.Thread(target=run, args=(case,)) for case in cases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


def test_second_process_loads_the_compiled_kernel_from_the_cache():
    # this process has compiled (or loaded) the bf16 decode kernel; a fresh process must not recompile
    k = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)
    cpu_kernels.attention(torch.zeros(1, 2, 1, 64), k, k, [4])
    script = ("import torch, cpu_kernels\n"
              "from cpu_kernels._attention_kernel import attend\n"
              "k = torch.zeros(1, 1, 8, 64, dtype=torch.bfloat16)\n"
              "cpu_kernels.attention(torch.zeros(1, 2, 1, 64), k, k, [4])\n"
              "print(sum(attend.stats.cache_misses.values()), sum(attend.stats.cache_hits.values()))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    misses, hits = map(int, result.stdout.split())
    assert (misses, hits) == (0, 1)
