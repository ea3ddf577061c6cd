"""The generation loop shared by `Model.generate`, `Model.stream` and `Session`: prefill, then decode
steps until every row has produced a stop token or max_new_tokens."""
from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from offload.devices import wait_for_device
from offload.generation.engine import Engine
from offload.generation.sampling import Sampler
from offload.generation.stats import GenerationStats


def read_tokens(tokens: torch.Tensor) -> list[int]:
    """The sampled ids [B] as host ints: the one wait of a decode step (the next step's input and the stop
    check need them). On CUDA a non-blocking copy into pinned memory and an event sync: it waits for the
    compute stream's queued work only, and is not an implicit sync (sync-debug mode stays quiet)."""
    if tokens.device.type != "cuda":
        return tokens.tolist()
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    wait_for_device(tokens.device)
    return host.tolist()


def generate_steps(engine: Engine, rows: list[list[int]], *, starts: list[int], max_new_tokens: int,
                   sampler: Sampler, stop_ids: frozenset[int], stats: GenerationStats,
                   cache_lengths: list[int]) -> Iterator[list[int | None]]:
    """Yield, per step, each row's new token (None once the row has stopped).

    `cache_lengths` is updated in place: after prefill and after each decode step it holds how many tokens
    of each row have their KV in the cache (callers that keep the cache, like sessions, read it).
    Timings exclude the time the consumer spends between steps.
    """
    B = len(rows)
    switch = engine.arch.kv_rebuild_len
    history = [list(r) for r in rows] if switch is not None else None   # every token fed, to rebuild from
    t0 = time.perf_counter()
    logits = engine.prefill(rows, starts)                                     # [B, V]
    wait_for_device(engine.device)                       # the prefill time includes its queued GPU work
    stats.prefill_seconds += time.perf_counter() - t0
    stats.num_prompt_tokens += sum(len(r) for r in rows)
    cache_lengths[:] = [s + len(r) for s, r in zip(starts, rows)]
    is_stopped = [False] * B
    for step in range(max_new_tokens):
        t0 = time.perf_counter()
        if step > 0:
            if switch is not None:
                for b in range(B):
                    history[b].append(ids[b])
            if switch is not None and switch in cache_lengths:
                # a row passes the original context: its keys were rotated with longrope's short factors;
                # like transformers, recompute the whole batch (rows now past it get the long factors)
                assert not any(starts), "a cache that may be rebuilt is filled from slot 0 (Session sees to it)"
                logits = engine.prefill(history, [0] * B)                     # [B, V]
                cache_lengths[:] = [len(h) for h in history]
            else:
                logits = engine.decode(ids, cache_lengths)                    # [B, V]
                cache_lengths[:] = [n + 1 for n in cache_lengths]
        ids = read_tokens(sampler.sample(logits))                             # B host ints
        if step > 0:
            stats.decode_seconds += time.perf_counter() - t0
            stats.num_decode_tokens += is_stopped.count(False)
        out: list[int | None] = []
        for b in range(B):
            if is_stopped[b]:
                out.append(None)
                continue
            out.append(ids[b])
            is_stopped[b] = ids[b] in stop_ids
        yield out
        if all(is_stopped):
            return
