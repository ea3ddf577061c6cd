"""How the prefetcher moves bytes and signals: a CUDA copy stream with events, or a background thread.

Both engines implement the same calls, per ring slot, and hold no scheduling logic (that is
`offload.weights.prefetch.Prefetcher`'s, shared by both):

    adopt(ring)              the device ring the copies write into: its memory must outlive them

    submit(slot, dst, src)   start copying flat host bytes `src` into device slot `dst`, after the compute
                             that last read the slot (its release) is done
    wait_copy(slot) -> s     make the compute wait until the slot's copy is done; returns the seconds the
                             HOST was blocked (0.0 on CUDA: the compute stream waits, not the host)
    record_release(slot)     mark "every compute reading the slot has been launched"
    is_copy_done(slot)       non-blocking query
    synchronize() / close()  wait for every submitted copy / stop
"""
from __future__ import annotations

import queue
import threading
import time

import torch


class CudaCopyEngine:
    """Copies on a dedicated `torch.cuda.Stream`; per slot a copy-done and a compute-done event."""

    def __init__(self, device: torch.device, num_slots: int):
        assert device.type == "cuda", device
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        # the ring was just allocated on the compute stream, whose queued kernels may still use that memory
        # (the caching allocator reuses blocks in stream order): the first copies must come after them
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self._copy_done = [torch.cuda.Event() for _ in range(num_slots)]
        self._compute_done = [torch.cuda.Event() for _ in range(num_slots)]
        self._is_compute_recorded = [False] * num_slots

    def adopt(self, ring: torch.Tensor) -> None:
        # the ring was allocated on the compute stream but is written on this one: when it is freed, the
        # caching allocator must not reuse the block until this stream's queued copies are done
        ring.record_stream(self.stream)

    def submit(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        with torch.cuda.stream(self.stream):
            if self._is_compute_recorded[slot]:
                # the copy engine must not overwrite the slot before the kernels reading it have run
                self.stream.wait_event(self._compute_done[slot])
            dst.copy_(src, non_blocking=True)
            self._copy_done[slot].record(self.stream)

    def wait_copy(self, slot: int) -> float:
        # no host sync: the compute stream waits on the event, the host keeps launching
        torch.cuda.current_stream(self.device).wait_event(self._copy_done[slot])
        return 0.0

    def record_release(self, slot: int) -> None:
        self._compute_done[slot].record(torch.cuda.current_stream(self.device))
        self._is_compute_recorded[slot] = True

    def is_copy_done(self, slot: int) -> bool:
        return self._copy_done[slot].query()

    def synchronize(self) -> None:
        # an event sync: Stream.synchronize counts as an implicit sync in torch's sync-debug mode (and a
        # finalizer raising there would skip the wait)
        event = torch.cuda.Event()
        event.record(self.stream)
        event.synchronize()

    def clear_errors(self) -> None:
        pass                                        # CUDA copy errors surface as exceptions at submit

    def close(self) -> None:
        self.synchronize()


class ThreadCopyEngine:
    """CPU fallback: one background thread copies; `threading.Event`s play the CUDA events' role.

    Torch compute on the CPU is synchronous, so "compute launched" (release) means "compute done":
    record_release has nothing to wait for and a released slot may be overwritten at once.
    """

    def __init__(self, num_slots: int):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._copy_done = [threading.Event() for _ in range(num_slots)]
        for event in self._copy_done:
            event.set()
        self._errors: list[BaseException | None] = [None] * num_slots
        self._thread = threading.Thread(target=self._run, name="offload-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            slot, dst, src = job
            try:
                dst.copy_(src)
            except BaseException as error:          # handed to the compute thread by wait_copy
                self._errors[slot] = error
            finally:
                self._copy_done[slot].set()

    def adopt(self, ring: torch.Tensor) -> None:
        pass                                        # each queued job holds its destination view

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the prefetch thread is not running (the weight source was closed)")
        self._copy_done[slot].clear()
        self._jobs.put((slot, dst, src))

    def wait_copy(self, slot: int) -> float:
        event, waited = self._copy_done[slot], 0.0
        if not event.is_set():
            start = time.perf_counter()
            while not event.wait(timeout=1.0):
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread stopped before finishing a copy")
            waited = time.perf_counter() - start
        error, self._errors[slot] = self._errors[slot], None
        if error is not None:
            raise RuntimeError(f"prefetch copy into ring slot {slot} failed: {error}") from error
        return waited

    def record_release(self, slot: int) -> None:
        pass

    def is_copy_done(self, slot: int) -> bool:
        return self._copy_done[slot].is_set()

    def synchronize(self) -> None:
        for event in self._copy_done:
            while not event.wait(timeout=1.0):
                if not self._thread.is_alive():
                    return

    def clear_errors(self) -> None:
        self._errors = [None] * len(self._errors)

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()


def make_copy_engine(device: torch.device, num_slots: int):
    """The CUDA engine for a CUDA device, the thread engine otherwise."""
    if device.type == "cuda":
        return CudaCopyEngine(device, num_slots)
    return ThreadCopyEngine(num_slots)
