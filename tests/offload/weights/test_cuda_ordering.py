"""The CUDA-only ordering rules, checked on any machine with recording stand-ins for torch.cuda streams and
events: what the copy stream waits for before writing a ring slot, and which host buffers stay pinned."""
import gc

import torch

import offload.attention.host as host_attention
from offload.weights.copy_engine import CudaCopyEngine


class Log(list):
    pass


class FakeEvent:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def record(self, stream):
        self.log.append(("record", self.name, stream.name))

    def query(self):
        return True


class FakeStream:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.name))

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def synchronize(self):
        self.log.append(("synchronize", self.name))


def fake_cuda(monkeypatch) -> Log:
    log, names = Log(), iter(f"event{i}" for i in range(1000))
    compute = FakeStream(log, "compute")
    copy = FakeStream(log, "copy")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: copy)
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(log, next(names)))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            log.append(("enter", self.stream.name))

        def __exit__(self, *exc):
            log.append(("exit", self.stream.name))

    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    return log


class RecordingTensor:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def copy_(self, src, non_blocking=False):
        self.log.append(("copy", self.name, non_blocking))


def test_the_copy_stream_waits_for_compute_before_writing_a_slot(monkeypatch):
    log = fake_cuda(monkeypatch)
    engine = CudaCopyEngine(torch.device("cuda", 0), num_slots=2)
    copy_done, compute_done = [e.name for e in engine._copy_done], [e.name for e in engine._compute_done]
    # the ring was allocated on the compute stream just before: the copy stream starts after its work
    assert log == [("wait_stream", "copy", "compute")]
    log.clear()
    engine.submit(0, RecordingTensor(log, "slot0"), None)
    assert log == [("enter", "copy"), ("copy", "slot0", True), ("record", copy_done[0], "copy"), ("exit", "copy")]
    log.clear()
    assert engine.wait_copy(0) == 0.0
    engine.record_release(0)
    engine.submit(0, RecordingTensor(log, "slot0"), None)
    assert log == [("wait_event", "compute", copy_done[0]), ("record", compute_done[0], "compute"),
                   ("enter", "copy"), ("wait_event", "copy", compute_done[0]), ("copy", "slot0", True),
                   ("record", copy_done[0], "copy"), ("exit", "copy")]


def test_only_what_crosses_pcie_is_pinned(monkeypatch):
    """A CPU-attended layer's cache never leaves the host: pageable. The staging buffers its q, k, v and
    output pass through are copied asynchronously: pinned."""
    pins = []

    def allocate(num_bytes, *, pin):
        pins.append((num_bytes, pin))
        return torch.zeros(num_bytes, dtype=torch.uint8)

    monkeypatch.setattr(host_attention, "allocate_host_bytes", allocate)
    backend = host_attention.HostAttention(max_batch_size=2, max_seq_len=8, num_kv_heads=2, head_dim=4,
                                           dtype=torch.float16, device=torch.device("cuda", 0))
    assert pins == [(2 * 2 * 8 * 4 * 2, False)] * 2
    assert backend.k_cache.shape == (2, 2, 8, 4) and bool((backend.k_cache == 0).all())
    pins.clear()
    backend.staging.buffer("q", (2, 4, 1, 4), torch.float32)
    assert pins == [(2 * 4 * 4 * 4, True)]


class RecordingEngine:
    """A copy engine that records what the prefetcher asks of it (and copies on the spot)."""

    def __init__(self, log):
        self.log = log

    def adopt(self, ring):
        self.log.append(("adopt", ring.data_ptr(), ring.numel()))

    def submit(self, slot, dst, src):
        self.log.append(("submit", slot))
        dst.copy_(src)

    def wait_copy(self, slot):
        return 0.0

    def record_release(self, slot):
        pass

    def is_copy_done(self, slot):
        return True

    def synchronize(self):
        pass

    def close(self):
        self.log.append(("close",))


def _packed(num_items=3):
    from offload.weights.host_memory import PackedItem
    return [PackedItem.pack({"w": torch.full((64,), float(i))}) for i in range(num_items)]


def test_the_ring_is_handed_to_the_copy_engine_before_any_copy(monkeypatch):
    """On CUDA, adopt() records the ring on the copy stream: freed, its memory waits for the copies."""
    import offload.weights.prefetch as prefetch
    log = []
    monkeypatch.setattr(prefetch, "make_copy_engine", lambda device, depth: RecordingEngine(log))
    prefetcher = prefetch.Prefetcher([0, 1, 2], _packed(), device="cpu", prefetch_depth=2)
    assert log[0] == ("adopt", prefetcher.ring.data_ptr(), prefetcher.ring_bytes)
    assert [entry[0] for entry in log[1:]] == ["submit", "submit"]
    prefetcher.close()
    prefetcher.close()
    assert log.count(("close",)) == 1


def test_a_prefetcher_dropped_without_close_waits_for_its_copies_and_frees_its_memory(monkeypatch):
    import offload.weights.prefetch as prefetch
    log = []
    monkeypatch.setattr(prefetch, "make_copy_engine", lambda device, depth: RecordingEngine(log))
    prefetcher = prefetch.Prefetcher([0, 1, 2], _packed(), device="cpu", prefetch_depth=2)
    prefetcher.acquire(0)
    del prefetcher
    gc.collect()
    assert log[-1] == ("close",)          # engine.close(): CUDA synchronizes the copy stream there


def test_a_dropped_prefetcher_stops_its_copy_thread():
    from offload.weights.prefetch import Prefetcher
    prefetcher = Prefetcher([0, 1, 2], _packed(), device="cpu", prefetch_depth=2)
    engine = prefetcher.copy_engine
    assert engine.is_alive
    del prefetcher
    gc.collect()
    assert not engine.is_alive
