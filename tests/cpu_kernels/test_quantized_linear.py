"""cpu_kernels.quantized_linear against torch: the packed matrix widened by plain torch ops, then torch's
matmul in float64."""
from __future__ import annotations

import pytest
import torch

import cpu_kernels


def _packed(out: int, inputs: int, group: int, bits: int, with_mins: bool, dtype=torch.float32, seed=0):
    """Random codes, scales, mins and the dense float64 matrix they stand for."""
    gen = torch.Generator().manual_seed(seed)
    groups = inputs // group
    scales = (torch.rand(out, groups, generator=gen) * 0.1 + 0.01).to(dtype)
    mins = (torch.randn(out, groups, generator=gen) * 0.3).to(dtype) if with_mins else None
    if bits == 4:
        codes = torch.randint(0, 16, (out, inputs), generator=gen, dtype=torch.uint8)
        qweight = codes[:, 0::2] | (codes[:, 1::2] << 4)
    else:
        codes = torch.randint(-128, 128, (out, inputs), generator=gen).to(torch.int8)
        qweight = codes
    dense = codes.double() * scales.double().repeat_interleave(group, dim=1)
    if mins is not None:
        dense += mins.double().repeat_interleave(group, dim=1)
    return qweight, scales, mins, dense


@pytest.mark.parametrize("bits, with_mins", [(4, True), (8, False), (8, True)])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("out, inputs, group", [(64, 96, 32), (37, 128, 128), (200, 576, 64), (5, 16, 16)])
def test_matches_torch(bits, with_mins, rows, out, inputs, group):
    qweight, scales, mins, dense = _packed(out, inputs, group, bits, with_mins)
    x = torch.randn(rows, inputs)
    got = cpu_kernels.quantized_linear(x, qweight, scales, mins)
    want = x.double() @ dense.t()
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_scales_are_widened_exactly(dtype):
    qweight, scales, mins, dense = _packed(48, 64, 32, 4, True, dtype=dtype)
    x = torch.randn(2, 64)
    torch.testing.assert_close(cpu_kernels.quantized_linear(x, qweight, scales, mins).double(), x.double() @ dense.t(),
                               rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_are_read_right():
    qweight, scales, mins, dense = _packed(32, 64, 32, 4, True)
    x = torch.randn(64, 3).t()                                   # [3, 64], not contiguous
    torch.testing.assert_close(cpu_kernels.quantized_linear(x, qweight, scales, mins).double(), x.double() @ dense.t(),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_one_clear_error():
    qweight, scales, mins, _ = _packed(32, 64, 32, 4, True)
    with pytest.raises(ValueError, match="x must be float32"):
        cpu_kernels.quantized_linear(torch.randn(1, 64).double(), qweight, scales, mins)
    with pytest.raises(ValueError, match=r"shapes do not fit: x \(1, 48\)"):
        cpu_kernels.quantized_linear(torch.randn(1, 48), qweight, scales, mins)
    with pytest.raises(ValueError, match="qweight must be uint8 \\(4-bit, with mins\\) or int8"):
        cpu_kernels.quantized_linear(torch.randn(1, 64), qweight, scales)
    with pytest.raises(ValueError, match="scales must be a 2-D CPU tensor"):
        cpu_kernels.quantized_linear(torch.randn(1, 64), qweight, scales[0], mins)
