"""How fast this CPU runs decode steps itself: what `--profile` learns for layers computed on the CPU.

Per kind of layer matrix ("dense": the model dtype, bfloat16 here; "int8", "int4": packed, group 32, bf16
scales), with the same code the runtime runs:
- the matmul rate: bytes of weights as held read per second by one-row products over matrices that do not
  fit in the caches, with the kernels of the fused decode step (cpu_kernels' dense and packed kernels);
- the layer overhead: one decode step of a tiny Llama layer as the runtime runs it on the CPU (the fused
  step of offload/models/cpu_decoder.py: norms, projections, RoPE, attention over a host KV cache, MLP;
  weights small enough that only the dispatch of its work counts). Families the fused step does not
  cover run their eager math, which costs more per layer than this.
"""
from __future__ import annotations

import time

import numba
import numpy as np
import torch

from cpu_kernels._checks import cache_view
from cpu_kernels._linear_kernel import dense_linear
from cpu_kernels.linear import BLOCKS_PER_THREAD
from offload.attention.contract import Chunk
from offload.attention.host import HostAttention
from offload.models.cpu_decoder import CpuDecoderSteps
from offload.models.decoder import DecoderModel
from offload.weights.quant import quantize
from placement.architecture import Architecture
from placement.quantization import Quantization

KINDS = ("dense", "int8", "int4")
_TINY_LAYER = dict(model_type="llama", vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                   rope_theta=10000.0, hidden_act="silu")


def _matrix(kind: str, rows: int, cols: int, gen: torch.Generator):
    weight = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    return weight if kind == "dense" else quantize(weight, Quantization(kind, 32), "probe", fit=False)


def _held_bytes(weight) -> int:
    if isinstance(weight, torch.Tensor):
        return weight.numel() * weight.element_size()
    return sum(t.numel() * t.element_size() for t in weight.tensors("w").values())


def matmul_rate(kind: str, *, total_bytes: int = 96 << 20, repeats: int = 3) -> float:
    """Bytes of weights (as held) per second of one-row decode products with `kind` matrices: several
    matrices of `total_bytes` together, each read once per pass, the fastest of `repeats` passes."""
    gen = torch.Generator().manual_seed(0)
    cols = 4096
    per_row = _held_bytes(_matrix(kind, 32, cols, gen)) / 32
    rows = max(32, int(total_bytes / 4 / per_row) // 32 * 32)
    matrices = [_matrix(kind, rows, cols, gen) for _ in range(4)]
    x = torch.randn(1, cols, generator=gen)
    out = np.empty((1, rows), np.float32)
    blocks = numba.get_num_threads() * BLOCKS_PER_THREAD
    dense = [cache_view(w, fp16_as_int16=True) for w in matrices] if kind == "dense" else []
    packed = [w.cpu_matrix() for w in matrices] if kind != "dense" else []

    def one_pass():
        for w in dense:
            dense_linear(x.numpy(), w, blocks, out)
        for matrix in packed:
            matrix(x)
    one_pass()                                               # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return sum(_held_bytes(w) for w in matrices) / best


def layer_overhead(kind: str, *, steps: int = 200) -> float:
    """Seconds of one decode step of a tiny layer of `kind` matrices on the CPU (median of `steps`)."""
    arch = Architecture.from_config(_TINY_LAYER)
    model = DecoderModel(arch)
    gen = torch.Generator().manual_seed(0)
    prefix = arch.layer_prefix(0)
    weights = {name[len(prefix):]: (_matrix(kind, *shape, gen) if len(shape) == 2
                                    else torch.ones(shape, dtype=torch.bfloat16))
               for name, shape in arch.layer_tensors(0).items()}
    backend = HostAttention(max_batch_size=1, max_seq_len=64, num_kv_heads=arch.num_kv_heads,
                            head_dim=arch.head_dim, dtype=torch.bfloat16, device="cpu")
    h = torch.randn(1, 1, arch.hidden_size, generator=gen).to(torch.bfloat16)
    fused = CpuDecoderSteps(model, torch.bfloat16)
    times = []
    for step in range(steps):
        position = torch.tensor([step % 64])
        ctx = model.prepare(position[:, None], torch.bfloat16)
        start = time.perf_counter()
        chunk = Chunk(start=position, num_tokens=1, device=torch.device("cpu"))
        assert fused.step(0, weights, h, ctx, backend, chunk) is not None
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure_cpu_decode(total_bytes: int = 96 << 20) -> tuple[tuple, tuple]:
    """((kind, matmul bytes/s), ...), ((kind, layer overhead s), ...) for every kind (a few seconds);
    `total_bytes`: the matrices' size per kind (more than the CPU's caches hold, for a true rate)."""
    return (tuple((kind, matmul_rate(kind, total_bytes=total_bytes)) for kind in KINDS),
            tuple((kind, layer_overhead(kind)) for kind in KINDS))
