"""Devices, named one way: every device the runtime holds is normalised here, at the boundary.

`torch.device("cuda") != torch.device("cuda:0")`, yet tensors created on "cuda" report "cuda:0", and a
tensor created on "cpu:0" reports "cpu": device checks that compare a user's spelling with a tensor's
fail. `resolve_device` turns what a user passes into the spelling tensors report (CUDA always with its
index, the CPU never with one), and `same_device` is the one comparison used at kernel and copy boundaries.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
_has_logged_cpu_tier = False


def canonical_device(device) -> torch.device:
    """The device as tensors on it report theirs: "cuda" -> "cuda:<current>", "cpu:0" -> "cpu"."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def same_device(a, b) -> bool:
    """True when `a` and `b` (devices or their spellings) name the same device."""
    return canonical_device(a) == canonical_device(b)


def resolve_device(device) -> torch.device:
    """What a user passed as `device` -> a canonical torch.device; ValueError naming what would work.

    None: CUDA (the current device) when available, else the CPU (which then stands in for the "gpu" tier).
    """
    global _has_logged_cpu_tier
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a torch device ({error}); "
                         "use 'cuda', 'cuda:1' or 'cpu'") from None
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device {device} is not supported; use 'cuda', 'cuda:1' or 'cpu'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    device = canonical_device(device)
    if device.type == "cpu" and not _has_logged_cpu_tier:
        _has_logged_cpu_tier = True
        log.info("running on the CPU: the plan's \"gpu\" tier is the CPU (no CUDA streams or pinned copies)")
    return device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device` without blocking the host: on CUDA it goes through pinned memory
    with a non-blocking copy (torch's pinned allocator keeps the staging block until the copy has run);
    on the CPU it is returned as it is."""
    assert tensor.device.type == "cpu", tensor.device
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def wait_for_device(device: torch.device) -> None:
    """Block the host until the work queued so far on `device`'s current stream is done (CUDA; a no-op on
    the CPU). An event sync, not torch.cuda.synchronize: it waits for this stream only and is not one of
    the implicit syncs `torch.cuda.set_sync_debug_mode` reports."""
    if device.type != "cuda":
        return
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    event.synchronize()
