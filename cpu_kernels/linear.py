"""Torch-facing entry points: a few rows times a packed matrix, on the CPU.

    matrix = PackedMatrix.of(qweight, scales, mins)     # checked once; numpy views of the tensors
    y = matrix(x)                                       # x float32 [M, K] -> float32 [M, N]
    y = quantized_linear(x, qweight, scales, mins)      # the same, in one call
    y = dense_linear_rows(x, weight)                    # x float32 [M, K] @ a dense float32/16-bit W.T
    ys = stacked_linear(x, matrices, integer)           # C matrices of one shape in one parallel loop -> [C, M, N]
                                                        # (x shared, or x [C, M, K]: matrix i reads x[i])

The matrix stays packed (4-bit codes two to a byte, or 8-bit codes) and is read once per call; nothing of
its dense size is allocated, and its scales are read in their stored dtype (float32, bfloat16, float16).
A `PackedMatrix` holds zero-copy views, so a caller that keeps it (offload's QuantizedWeight does) pays
the checks and the views once, not per token. The Numba kernels run with the GIL released; threads follow
`numba.set_num_threads`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import torch

from ._checks import CACHE_DTYPES, cache_view
from ._linear_kernel import dense_linear, dense_linear_each, packed_linear, packed_linear_each
from .ops import _LAUNCH_LOCK, _needs_launch_lock

BLOCKS_PER_THREAD = 16     # outputs handed out in blocks (the kernels' lane sums live per block)

@dataclass(frozen=True)
class PackedMatrix:
    """W [N, K] packed per group, as numpy views of its tensors (which it keeps alive)."""

    codes: np.ndarray              # uint8 [N, K/2] (4-bit, low nibble first) or int8 [N, K]
    scales: np.ndarray             # [N, G]: float32, or uint16 (bfloat16 bits) / int16 (float16 bits)
    mins: np.ndarray               # [N, G] like scales, or [1, 1] unused (8-bit without mins)
    has_mins: bool
    tensors: tuple                 # the torch tensors the views alias

    @classmethod
    def of(cls, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> "PackedMatrix":
        """qweight uint8 [N, K / 2] (4-bit, w = code * scale + min, `mins` required) or int8 [N, K] (w = code *
        scale, + min when `mins` is given); scales and mins [N, G] float32/bfloat16/float16, G dividing K
        (ValueError naming the shapes and dtypes otherwise). Non-contiguous tensors are copied once."""
        for name, tensor in (("qweight", qweight), ("scales", scales), ("mins", mins)):
            if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.dim() != 2
                                       or tensor.device.type != "cpu"):
                raise ValueError(f"{name} must be a 2-D CPU tensor, got {getattr(tensor, 'shape', type(tensor))}")
        if qweight.dtype not in (torch.uint8, torch.int8) or (qweight.dtype == torch.uint8 and mins is None):
            raise ValueError(f"qweight must be uint8 (4-bit, with mins) or int8, got {qweight.dtype}")
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
        if mins is None:
            views.append(np.zeros((1, 1), dtype=views[1].dtype))
        return cls(codes=views[0], scales=views[1], mins=views[2], has_mins=mins is not None, tensors=tensors)

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
        _run(packed_linear, x_np, self.codes, self.scales, self.mins, self.has_mins, integer, blocks, out.numpy())
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


def stacked_linear(x: torch.Tensor, matrices: list, integer: bool = False) -> torch.Tensor:
    """x @ W_i.T for C matrices of one shape [N, K] in one parallel loop (one thread launch for all) -> float32
    [C, M, N]: x float32 [M, K] read by every matrix, or [C, M, K], matrix i reading x[i]. `matrices`: all
    PackedMatrix of one code type (`integer` as PackedMatrix) or all dense float32/bfloat16/float16 tensors of
    one dtype. A routed MoE layer's experts: their gate and up on the token rows, then their down projections
    on each expert's own rows. (The tuple handed to Numba is padded with empty matrices to a power of two, so
    that few lengths are ever compiled.)"""
    count = len(matrices)
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or x.device.type != "cpu" or x.dtype != torch.float32 \
            or (x.dim() == 3 and x.shape[0] != count) or count == 0:
        raise ValueError(f"x must be a float32 CPU tensor [M, K] or [{count}, M, K] (C >= 1 matrices), got "
                         f"{getattr(x, 'shape', type(x))} {getattr(x, 'dtype', '')}")
    xs3 = x.detach().contiguous()
    xs3 = xs3[None] if xs3.dim() == 2 else xs3
    rows, inputs = xs3.shape[1:]
    size = 1 << (count - 1).bit_length()                                # padded length
    if xs3.shape[0] > 1 and size > count:
        xs3 = torch.cat([xs3, xs3.new_zeros(size - count, rows, inputs)])
    first = matrices[0]
    if isinstance(first, PackedMatrix):
        kind = (first.codes.dtype, first.codes.shape, first.scales.dtype, first.scales.shape, first.has_mins)
        if any(not isinstance(m, PackedMatrix) or (m.codes.dtype, m.codes.shape, m.scales.dtype, m.scales.shape,
                                                   m.has_mins) != kind for m in matrices) or first.shape[1] != inputs:
            raise ValueError(f"matrices must be PackedMatrix of one shape [N, {inputs}], code and scale type")
        outputs = first.codes.shape[0]
        codes, scales, mins = [m.codes for m in matrices], [m.scales for m in matrices], [m.mins for m in matrices]
        pad = size - count
        codes += [first.codes[:0]] * pad
        scales += [first.scales[:0]] * pad
        mins += [first.mins[:0]] * pad
        kernel_args = (tuple(codes), tuple(scales), tuple(mins), (first.has_mins,) * size, integer)
        kernel = packed_linear_each
    else:
        if any(not isinstance(m, torch.Tensor) or m.shape != first.shape or m.dtype != first.dtype
               or m.device.type != "cpu" for m in matrices) or first.dim() != 2 or first.shape[1] != inputs \
                or first.dtype not in CACHE_DTYPES:
            raise ValueError(f"matrices must be CPU tensors of one shape [N, {inputs}] and one float32/bfloat16/"
                             "float16 dtype")
        outputs = first.shape[0]
        views = [cache_view(m.detach().contiguous(), fp16_as_int16=True) for m in matrices]
        kernel_args = (tuple(views + [views[0][:0]] * (size - count)),)
        kernel = dense_linear_each
    out = np.empty((count, rows, outputs), np.float32)
    empty = np.empty((rows, 0), np.float32)
    blocks = max(1, min(count * outputs, numba.get_num_threads() * BLOCKS_PER_THREAD))
    _run(kernel, xs3.numpy(), *kernel_args, blocks, tuple(list(out) + [empty] * (size - count)))
    return torch.from_numpy(out)


def _run(kernel, *args) -> None:
    """Run a kernel, serialised where the threading layer needs it."""
    if _needs_launch_lock():
        with _LAUNCH_LOCK:
            kernel(*args)
    else:
        kernel(*args)
