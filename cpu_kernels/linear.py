"""Torch-facing entry points: a few rows times a packed matrix, on the CPU.

    matrix = PackedMatrix.of(qweight, scales, mins)     # checked once; numpy views of the tensors
    y = matrix(x)                                       # x float32 [M, K] -> float32 [M, N]
    y = quantized_linear(x, qweight, scales, mins)      # the same, in one call
    y = dense_linear_rows(x, weight)                    # x float32 [M, K] @ a dense float32/16-bit W.T
    y = wide_linear(x, matrix or weight)                # many rows (prefill): torch's float32 GEMM on chunks
    out = gated_experts(x, experts, share, dtype, integer)   # a MoE layer's routed SiLU experts in one call

The matrix stays packed (4-bit codes two to a byte, or 8-bit codes) and is read once per call; nothing of
its dense size is allocated, and its scales are read in their stored dtype (float32, bfloat16, float16).
A `PackedMatrix` holds zero-copy views, so a caller that keeps it (offload's QuantizedWeight does) pays
the checks and the views once, not per token. The Numba kernels run with the GIL released; threads follow
`numba.set_num_threads`.

The kernels above read the matrix once for all rows, so their time grows with the rows; past a few rows
(`PACKED_MAX_ROWS`, `DENSE_MAX_ROWS`) `wide_linear` is faster: the matrix widened to float32 a chunk of rows
at a time into one reused buffer (never its whole dense size; no fresh pages to fault in) and each chunk
multiplied by torch's float32 GEMM. Dense 16-bit matrices take it too where oneDNN has no native bfloat16 /
float16 GEMM (`native_half_gemm`; on AVX2 its emulation runs ~20 GFLOP/s, float32 ~100).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache, cached_property

import numba
import numpy as np
import torch

from ._checks import CACHE_DTYPES, cache_view
from ._experts_kernel import BFLOAT16, FLOAT16, FLOAT32, dense_experts, packed_experts
from ._linear_kernel import dense_linear, packed_linear
from ._unpack_kernel import unpack_rows
from .ops import _LAUNCH_LOCK, _needs_launch_lock

BLOCKS_PER_THREAD = 16     # outputs handed out in blocks (the kernels' lane sums live per block)
# Up to how many rows the one-read kernels beat wide_linear (measured on 2 Zen 3 cores, W [5632, 2048]; ms):
# packed with integer products (16-bit models) 7.8 at 32 rows against 8.9, 31 at 128 against 24; with float32
# products 10.4 at 16 rows against ~8; dense 16-bit 3.6 at 8 rows against 6.9, 11.0 at 32 against 8.3
PACKED_MAX_ROWS = {True: 64, False: 8}         # by `integer`
DENSE_MAX_ROWS = 16
WIDE_CHUNK_BYTES = 4 << 20                     # float32 rows per GEMM call (2-16 MB measured alike, 1 MB slower)
_wide = threading.local()                      # each thread's reused chunk buffer

@dataclass(frozen=True)
class PackedMatrix:
    """W [N, K] packed per group, as numpy views of its tensors (which it keeps alive)."""

    codes: np.ndarray              # uint8 [N, K/2] (4-bit, low nibble first) or int8 [N, K]
    scales: np.ndarray             # [N, G]: float32, or uint16 (bfloat16 bits) / int16 (float16 bits)
    mins: np.ndarray               # [N, G] like scales; 4-bit without mins: the scales; 8-bit: [1, 1] unused
    min_factor: float              # w = code * scale + min_factor * min: 1 (mins), -8 (int4-sym), 0 (int8)
    tensors: tuple                 # the torch tensors the views alias

    @classmethod
    def of(cls, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> "PackedMatrix":
        """qweight uint8 [N, K / 2] (4-bit: w = code * scale + min, or (code - 8) * scale without `mins`) or int8
        [N, K] (w = code * scale, + min when `mins` is given); scales and mins [N, G] float32/bfloat16/float16,
        G dividing K (ValueError naming the shapes and dtypes otherwise). Non-contiguous tensors are copied once."""
        for name, tensor in (("qweight", qweight), ("scales", scales), ("mins", mins)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.dim() != 2
                                       or tensor.device.type != "cpu"):
                raise ValueError(f"{name} must be a 2-D CPU tensor, got {getattr(tensor, 'shape', type(tensor))}")
        if qweight.dtype not in (torch.uint8, torch.int8):
            raise ValueError(f"qweight must be uint8 (4-bit) or int8, got {qweight.dtype}")
        for name, tensor in (("scales", scales), ("mins", mins)):
            if tensor is not None and tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
        outputs, width = qweight.shape
        packed = 2 if qweight.dtype == torch.uint8 else 1
        groups = scales.shape[1]
        if scales.shape[0] != outputs or groups == 0 or (width * packed) % groups \
                or (packed == 2 and (width * packed // groups) % 2) or (mins is not None and mins.shape != scales.shape):
            raise ValueError(f"shapes do not fit: qweight {tuple(qweight.shape)} [N, K{' / 2' if packed == 2 else ''}], "
                             f"scales {tuple(scales.shape)} [N, G] (G dividing K"
                             f"{' into even groups' if packed == 2 else ''}), mins "
                             f"{None if mins is None else tuple(mins.shape)}")
        tensors = tuple(t.detach().contiguous() for t in (qweight, scales, mins) if t is not None)
        views = [tensors[0].numpy()] + [cache_view(t, fp16_as_int16=True) for t in tensors[1:]]
        min_factor = 1.0 if mins is not None else -8.0 if packed == 2 else 0.0
        if mins is None:             # 4-bit: the scales serve as mins (times -8); 8-bit: none read
            views.append(views[1] if packed == 2 else np.zeros((1, 1), dtype=views[1].dtype))
        return cls(codes=views[0], scales=views[1], mins=views[2], min_factor=min_factor, tensors=tensors)

    @cached_property
    def layout(self) -> tuple:
        """What one Numba compilation and one tuple of matrices share: codes and scales dtypes and shapes, and
        min_factor (computed once: gated_experts compares it for every routed expert of every call)."""
        return self.codes.dtype, self.codes.shape, self.scales.dtype, self.scales.shape, self.min_factor

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K)."""
        return self.codes.shape[0], self.codes.shape[1] * (2 if self.codes.dtype == np.uint8 else 1)

    def __call__(self, x: torch.Tensor, integer: bool = False) -> torch.Tensor:
        """x float32 [M, K] (CPU) -> x @ W.T float32 [M, N]. `integer`: x may be quantized per run of 32
        inputs (for 16-bit models: see _int_dot.py); else float32 products, exact to rounding."""
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu":
            raise ValueError(f"x must be a 2-D CPU tensor, got {getattr(x, 'shape', type(x))}")
        if x.dtype != torch.float32:
            raise ValueError(f"x must be float32, got {x.dtype} with shape {tuple(x.shape)}")
        outputs, inputs = self.shape
        if x.shape[1] != inputs:
            raise ValueError(f"shapes do not fit: x {tuple(x.shape)} [M, K] and the matrix [N, K] = {self.shape}")
        x_np = x.detach().contiguous().numpy()
        out = torch.empty((x.shape[0], outputs), dtype=torch.float32)
        blocks = min(outputs, numba.get_num_threads() * BLOCKS_PER_THREAD)
        _run(packed_linear, x_np, self.codes, self.scales, self.mins, self.min_factor, integer, blocks, out.numpy())
        return out


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     mins: torch.Tensor | None = None, integer: bool = False) -> torch.Tensor:
    """x [M, K] float32 @ W.T -> float32 [M, N]; W as `PackedMatrix.of` takes it; `integer` as PackedMatrix."""
    return PackedMatrix.of(qweight, scales, mins)(x, integer)


def dense_linear_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x float32 [M, K] (CPU) @ weight.T -> float32 [M, N], weight [N, K] float32, bfloat16 or float16 on the CPU,
    read in place (16-bit as bit patterns) and summed in float32: for a few rows, faster than torch's GEMV
    (measured on 2 cores: bfloat16 ~22-25 GB/s against ~18, float32 ~25 against ~18)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type != "cpu" \
            or weight.dtype not in CACHE_DTYPES:
        raise ValueError(f"weight must be a 2-D float32/bfloat16/float16 CPU tensor, got "
                         f"{getattr(weight, 'shape', type(weight))} {getattr(weight, 'dtype', '')}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32 \
            or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x must be a float32 [M, {weight.shape[1]}] CPU tensor, got "
                         f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=torch.float32)
    blocks = max(1, min(weight.shape[0], numba.get_num_threads() * BLOCKS_PER_THREAD))
    _run(dense_linear, x.detach().contiguous().numpy(), cache_view(weight.detach().contiguous(), fp16_as_int16=True),
         blocks, out.numpy())
    return out


def wide_linear(x: torch.Tensor, weight) -> torch.Tensor:
    """x float32 [M, K] (CPU) @ W.T -> float32 [M, N] for many rows: W (a PackedMatrix, or a dense float32 /
    bfloat16 / float16 CPU tensor [N, K]) widened to float32 WIDE_CHUNK_BYTES of rows at a time into this
    thread's reused buffer, each chunk times x by torch's float32 GEMM. Packed weights come out as their
    float32 dequantization (exact: code * scale + min); 16-bit ones exactly widened."""
    packed = isinstance(weight, PackedMatrix)
    if not packed and (not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type != "cpu"
                       or weight.dtype not in CACHE_DTYPES):
        raise ValueError(f"weight must be a PackedMatrix or a 2-D float32/bfloat16/float16 CPU tensor, got "
                         f"{getattr(weight, 'shape', type(weight))} {getattr(weight, 'dtype', '')}")
    outputs, inputs = weight.shape
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32 \
            or x.shape[1] != inputs:
        raise ValueError(f"x must be a float32 [M, {inputs}] CPU tensor, got {getattr(x, 'shape', type(x))} "
                         f"{getattr(x, 'dtype', '')}")
    step = max(1, WIDE_CHUNK_BYTES // (4 * inputs))
    buffer = getattr(_wide, "buffer", None)
    if buffer is None or buffer.numel() < step * inputs:
        buffer = _wide.buffer = torch.empty(step * inputs, dtype=torch.float32)
    x_t = x.t()                                                         # [K, M]
    out_t = torch.empty((outputs, x.shape[0]), dtype=torch.float32)     # [N, M]: each chunk's rows contiguous
    for first in range(0, outputs, step):
        count = min(step, outputs - first)
        chunk = buffer[:count * inputs].view(count, inputs)             # W[first:first + count] in float32
        if packed:
            _run(unpack_rows, weight.codes, weight.scales, weight.mins, weight.min_factor, first, chunk.numpy())
        else:
            chunk.copy_(weight[first:first + count])
        torch.mm(chunk, x_t, out=out_t[first:first + count])
    return out_t.t().contiguous()


@cache
def native_half_gemm(dtype: torch.dtype) -> bool:
    """Whether torch multiplies `dtype` (bfloat16 / float16) matrices on this CPU natively (oneDNN with
    AVX-512 BF16/FP16 or AMX), rather than in an emulation slower than widening to float32."""
    try:
        check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}[dtype]
        return bool(check())
    except (KeyError, AttributeError, RuntimeError):
        return False


ROUNDING = {torch.float32: FLOAT32, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}


def gated_experts(x: torch.Tensor, experts: list, share: torch.Tensor, dtype: torch.dtype,
                  integer: bool = False) -> torch.Tensor:
    """A MoE layer's routed experts on a few rows in one Numba call: x float32 [M, H], `experts` the h experts'
    (gate, up, down) matrices (gate and up [I, H], down [H, I]; all PackedMatrix of one layout, `integer` as
    PackedMatrix, or all dense CPU tensors of one float32/bfloat16/float16 dtype), share float32 [h, M] (each
    row's weight for expert j, 0 where the row is not routed to it) -> float32 [M, H] holding values of
    `dtype`: sum_j share[j] * down_j(silu(gate_j(x)) * up_j(x)) with the roundings of the expert-by-expert path
    in `dtype` (each projection, the activation, the product, the scaled output, each add, experts ascending).
    Tuples handed to Numba are padded to a power of two, so that few lengths are ever compiled."""
    count = len(experts)
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.device.type != "cpu" or x.dtype != torch.float32:
        raise ValueError(f"x must be a float32 [M, H] CPU tensor, got {getattr(x, 'shape', type(x))} "
                         f"{getattr(x, 'dtype', '')}")
    if count == 0 or not isinstance(share, torch.Tensor) or share.shape != (count, x.shape[0]) \
            or share.dtype != torch.float32 or dtype not in ROUNDING:
        raise ValueError(f"need h >= 1 experts, share float32 [h, M] = [{count}, {x.shape[0]}] and a float32/bfloat16/"
                         f"float16 dtype, got share {getattr(share, 'shape', None)} and {dtype}")
    rows, hidden = x.shape
    size = 1 << (count - 1).bit_length()                                # padded length
    ups = [m for gate, up, _ in experts for m in (gate, up)]
    downs = [down for _, _, down in experts]
    out = torch.empty((rows, hidden), dtype=torch.float32)
    blocks = max(1, numba.get_num_threads() * BLOCKS_PER_THREAD)
    share_np = share.contiguous().numpy()
    if isinstance(downs[0], PackedMatrix):
        for group in (ups, downs):
            if len({m.layout if isinstance(m, PackedMatrix) else None for m in group}) != 1:
                raise ValueError("the experts' matrices must be PackedMatrix of one layout per projection")
        if ups[0].shape != (downs[0].shape[1], hidden) or downs[0].shape[0] != hidden:
            raise ValueError(f"shapes do not fit: gate/up {ups[0].shape}, down {downs[0].shape}, x {tuple(x.shape)}")

        def parts(group, length):
            pad = length - len(group)
            return (tuple([m.codes for m in group] + [group[0].codes[:0]] * pad),
                    tuple([m.scales for m in group] + [group[0].scales[:0]] * pad),
                    tuple([m.mins for m in group] + [group[0].mins[:0]] * pad), (group[0].min_factor,) * length)

        _run(packed_experts, x.contiguous().numpy(), *parts(ups, 2 * size), *parts(downs, size), share_np,
             ROUNDING[dtype], integer, blocks, out.numpy())
        return out
    matrices = ups + downs
    if any(not isinstance(m, torch.Tensor) or m.dtype != downs[0].dtype or m.device.type != "cpu" or m.dim() != 2
           for m in matrices) or downs[0].dtype not in CACHE_DTYPES or ups[0].shape != (downs[0].shape[1], hidden) \
            or any(m.shape != ups[0].shape for m in ups) or any(m.shape != downs[0].shape for m in downs) \
            or downs[0].shape[0] != hidden:
        raise ValueError("the experts' matrices must be CPU tensors of one float32/bfloat16/float16 dtype, gate and "
                         f"up [I, {hidden}], down [{hidden}, I]")

    def views(group, length):
        arrays = [cache_view(m.detach().contiguous(), fp16_as_int16=True) for m in group]
        return tuple(arrays + [arrays[0][:0]] * (length - len(arrays)))

    _run(dense_experts, x.contiguous().numpy(), views(ups, 2 * size), views(downs, size), share_np,
         ROUNDING[dtype], blocks, out.numpy())
    return out


def _run(kernel, *args) -> None:
    """Run a kernel, serialised where the threading layer needs it."""
    if _needs_launch_lock():
        with _LAUNCH_LOCK:
            kernel(*args)
    else:
        kernel(*args)
