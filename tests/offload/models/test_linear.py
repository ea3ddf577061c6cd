"""offload.models.layers.linear on a few CPU rows: which kernel it takes and what it rounds, against torch.

Dense weights: a Numba dot per output, rounded once with the bias, as torch's F.linear (addmm) rounds.
Packed weights: a 16-bit model's activations go through the integer path (int16 per run of 32), a float32
model's through the exact float kernels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload.models.layers import linear
from offload.weights.quant import quantize
from placement.cost import CPU_DECODE_MAX_ROWS
from placement.quantization import Quantization


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_rows_match_torch(dtype, bias):
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(96, 64, generator=gen) * 0.2).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    x = torch.randn(2, 1, 64, generator=gen).to(dtype)                 # [B, T, in]: 2 rows
    got, want = linear(x, weight, b), F.linear(x, weight, b)
    assert got.dtype == dtype and got.shape == (2, 1, 96)
    # float32 sums in another order: within one rounding step of the dtype at each row's scale
    step = torch.finfo(dtype).eps * want.float().abs().amax(dim=-1, keepdim=True)
    assert ((got.float() - want.float()).abs() <= 2 * step).all()


@pytest.mark.parametrize("dtype, integer", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_packed_rows_take_the_path_of_their_dtype(dtype, integer):
    gen = torch.Generator().manual_seed(1)
    packed = quantize(torch.randn(48, 64, generator=gen).to(dtype), Quantization("int4", 32), "mlp.up_proj.weight")
    x = torch.randn(CPU_DECODE_MAX_ROWS, 64, generator=gen).to(dtype)
    want = packed.cpu_matrix()(x.float(), integer).to(dtype)
    assert torch.equal(linear(x, packed), want)
    other = packed.cpu_matrix()(x.float(), not integer).to(dtype)
    assert not torch.equal(want, other)              # the two paths differ, so the check above tells them apart
    # more rows than a decode step: dequantized and multiplied by torch
    many = torch.randn(CPU_DECODE_MAX_ROWS + 1, 64, generator=gen).to(dtype)
    torch.testing.assert_close(linear(many, packed), F.linear(many, packed.dequantize(dtype)))
