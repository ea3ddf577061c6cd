"""`load`: a checkpoint folder -> a ready `Model` (plain path: every weight and KV cache on one device)."""
from __future__ import annotations

import logging

import torch

from offload.checkpoint import Checkpoint, torch_dtype
from offload.engine import DEFAULT_PREFILL_CHUNK, Engine
from offload.kv_cache import TorchAttention
from offload.model import Model
from offload.models import build_model
from offload.resident import ResidentWeights
from placement.architecture import Architecture

log = logging.getLogger(__name__)
MAX_SEQ_LEN_CAP = 4096   # default cache length when the config allows more (a 128k cache is rarely wanted)


def default_max_seq_len(arch: Architecture) -> int:
    return min(arch.max_position_embeddings, MAX_SEQ_LEN_CAP)


def check_limits(arch: Architecture, max_batch_size: int, max_seq_len: int) -> None:
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if arch.is_opt and max_seq_len > arch.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds this OPT model's {arch.max_position_embeddings} "
                         "learned positions")


def load(path, device="cpu", dtype=None, max_batch_size: int = 1, max_seq_len: int | None = None,
         prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK, progress: bool = True) -> Model:
    """Load a Hugging Face model folder with every weight and the KV cache on `device`.

    dtype: None = the checkpoint's dtype, or "float32"/"bfloat16"/"float16". The KV cache is preallocated
    for max_batch_size x max_seq_len (default: the config's max_position_embeddings, capped at 4096).
    Raises CheckpointError for a bad folder, ValueError for bad arguments.
    """
    checkpoint = Checkpoint(path)
    arch = checkpoint.arch
    dtype = torch_dtype(dtype or arch.dtype)
    max_seq_len = default_max_seq_len(arch) if max_seq_len is None else max_seq_len
    check_limits(arch, max_batch_size, max_seq_len)
    device = torch.device(device)
    model = build_model(arch, device)
    weights = ResidentWeights.from_checkpoint(checkpoint, dtype=dtype, device=device, progress=progress)
    backends = [TorchAttention.for_layer(arch, i, scale=model.attention_scale, max_batch_size=max_batch_size,
                                         max_seq_len=max_seq_len, dtype=dtype, device=device)
                for i in range(arch.num_layers)]
    engine = Engine(arch=arch, model=model, weights=weights, backends=backends, device=device, dtype=dtype,
                    max_seq_len=max_seq_len, prefill_chunk_size=prefill_chunk_size)
    log.info("loaded %s: %s, %.1f MB weights, %.1f MB KV cache on %s", checkpoint.path, arch.model_type,
             weights.total_bytes / 1e6, sum(b.cache_bytes for b in backends) / 1e6, device)
    return Model(arch=arch, engine=engine, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                 eos_token_ids=checkpoint.eos_token_ids, sampling_defaults=checkpoint.sampling_defaults,
                 checkpoint=checkpoint)
