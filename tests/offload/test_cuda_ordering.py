"""The CUDA-only ordering rules, checked on any machine with recording stand-ins for torch.cuda streams and
events: what the copy stream waits for before writing a ring slot, and which host buffers stay pinned."""
import gc
import weakref

import torch

import offload.host_attention as host_attention
from offload.copy_engine import CudaCopyEngine


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
    engine = CudaCopyEngine(torch.device("cuda"), depth=2)
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


def test_a_pinned_host_cache_keeps_its_registered_buffer(monkeypatch):
    returned = []

    def allocate(num_bytes, *, pin):
        buffer = torch.empty(num_bytes, dtype=torch.uint8)
        returned.append(weakref.ref(buffer))      # a registration ends when this object is collected
        return buffer

    monkeypatch.setattr(host_attention, "allocate_host_bytes", allocate)
    k, v = host_attention.allocate_host_kv(max_batch_size=2, num_kv_heads=2, max_seq_len=8, head_dim=4,
                                           dtype=torch.float16, pin=True)
    gc.collect()
    assert len(returned) == 2 and all(ref() is not None for ref in returned)
    assert k.shape == (2, 2, 8, 4) and bool((k == 0).all()) and bool((v == 0).all())
    del k, v
    gc.collect()
    assert all(ref() is None for ref in returned)
