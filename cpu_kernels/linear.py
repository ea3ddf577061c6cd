"""Torch-facing entry point: `quantized_linear`, a few rows times a packed matrix, on the CPU.

The matrix stays packed (4-bit codes two to a byte, or 8-bit codes) and is read once per call; nothing of
its dense size is allocated. Checks its inputs (ValueError naming shapes and dtypes) and runs the Numba
kernel with the GIL released; threads follow `numba.set_num_threads`.
"""
import numpy as np
import torch

from ._linear_kernel import int4_linear, int8_linear
from .ops import _LAUNCH_LOCK, _needs_launch_lock

def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     mins: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 @ W.T -> float32 [M, N], W [N, K] given packed per group (placement/quantization.py):
    qweight uint8 [N, K / 2] (4-bit, w = code * scale + min, `mins` required) or int8 [N, K] (w = code *
    scale, + min when `mins` is given); scales and mins [N, G] in any float dtype, G dividing K."""
    for name, tensor in (("x", x), ("qweight", qweight), ("scales", scales), ("mins", mins)):
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.dim() != 2
                                   or tensor.device.type != "cpu"):
            raise ValueError(f"{name} must be a 2-D CPU tensor, got {getattr(tensor, 'shape', type(tensor))}")
    if x.dtype != torch.float32:
        raise ValueError(f"x must be float32, got {x.dtype} with shape {tuple(x.shape)}")
    if qweight.dtype not in (torch.uint8, torch.int8) or (qweight.dtype == torch.uint8 and mins is None):
        raise ValueError(f"qweight must be uint8 (4-bit, with mins) or int8, got {qweight.dtype}")
    rows, inputs = x.shape
    outputs, width = qweight.shape
    packed = 2 if qweight.dtype == torch.uint8 else 1
    groups = scales.shape[1] if scales.dim() == 2 else 0
    if width * packed != inputs or scales.shape[0] != outputs or groups == 0 or inputs % groups \
            or (packed == 2 and (inputs // groups) % 2) or (mins is not None and mins.shape != scales.shape):
        raise ValueError(f"shapes do not fit: x {tuple(x.shape)} [M, K], qweight {tuple(qweight.shape)} "
                         f"[N, K{' / 2' if packed == 2 else ''}], scales {tuple(scales.shape)} [N, G] "
                         f"(G dividing K{' into even groups' if packed == 2 else ''}), mins "
                         f"{None if mins is None else tuple(mins.shape)}")
    x_np = x.detach().contiguous().numpy()
    size = inputs // groups
    scales_np = scales.detach().to(torch.float32).contiguous().numpy()
    if mins is None:
        mins_np = np.zeros_like(scales_np)
        sums = np.zeros((rows, groups), dtype=np.float32)
    else:
        mins_np = mins.detach().to(torch.float32).contiguous().numpy()
        sums = x_np.reshape(rows, groups, size).sum(axis=-1, dtype=np.float32)
    out = torch.empty((rows, outputs), dtype=torch.float32)
    codes = qweight.detach().contiguous().numpy()
    if packed == 2:
        args = (int4_linear, np.ascontiguousarray(x_np[:, 0::2]), np.ascontiguousarray(x_np[:, 1::2]), sums,
                codes, scales_np, mins_np, out.numpy())
    else:
        args = (int8_linear, x_np, sums, codes, scales_np, mins_np, out.numpy())
    _run(*args)
    return out


def _run(kernel, *args) -> None:
    """Run a kernel (even work items: Numba's default chunking), serialised where the threading layer needs it."""
    if _needs_launch_lock():
        with _LAUNCH_LOCK:
            kernel(*args)
    else:
        kernel(*args)
