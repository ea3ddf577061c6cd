"""cpu_kernels.quantized_linear against torch: the packed matrix widened by plain torch ops, then torch's
matmul in float64. With `integer` (16-bit models), groups of a multiple of 32 inputs take the integer path,
which first quantizes the activations to int16 per run of 32 (llama.cpp's scheme with 16 bits instead of 8): the reference applies the
same quantization with torch ops, and the error it adds against exact activations is bounded separately."""
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


def _int16_runs(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 as the integer path sees it: each run of 32 scaled to int16 by its largest |x|,
    rounded half to even, and scaled back."""
    runs = x.reshape(x.shape[0], -1, 32)
    peak = runs.abs().amax(-1, keepdim=True)
    inv = torch.where(peak > 0, torch.tensor(32767.0) / peak, torch.zeros(()))
    return (torch.round(runs * inv) * (peak / 32767.0)).reshape(x.shape)


def _reference(x: torch.Tensor, dense: torch.Tensor, mins: torch.Tensor | None, group: int) -> torch.Tensor:
    """What the kernels compute, in float64: the integer path (`integer`, groups of a multiple of 32) multiplies
    the codes' part by the int16 activations and the mins by the exact ones; the float kernels (`group` given
    as 1 here when `integer` is off) use x as it is."""
    if group % 32:
        return x.double() @ dense.t()
    lows = mins.double().repeat_interleave(group, dim=1) if mins is not None else torch.zeros_like(dense)
    return _int16_runs(x).double() @ (dense - lows).t() + x.double() @ lows.t()


@pytest.mark.parametrize("bits, with_mins", [(4, True), (8, False), (8, True)])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("out, inputs, group", [(64, 96, 32), (37, 128, 128), (200, 576, 64), (8, 96, 96),
                                                (5, 16, 16), (6, 48, 48)])
def test_matches_torch(bits, with_mins, rows, out, inputs, group):
    # (8, 96, 96): groups of 3 runs (scales repeated per run); 16 and 48: not runs of 32 (the float kernels)
    qweight, scales, mins, dense = _packed(out, inputs, group, bits, with_mins)
    x = torch.randn(rows, inputs)
    got = cpu_kernels.quantized_linear(x, qweight, scales, mins, integer=True)
    want = _reference(x, dense, mins, group)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    exact = x.double() @ dense.t()
    float_products = cpu_kernels.quantized_linear(x, qweight, scales, mins)           # float32 models
    torch.testing.assert_close(float_products.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    # int16 activations: each off by at most 2^-16 of its run's largest
    assert (got.double() - exact).abs().max() <= 1e-4 * exact.abs().max() + 1e-6


def test_zero_and_non_finite_activations():
    qweight, scales, mins, dense = _packed(16, 64, 32, 8, False)
    x = torch.randn(3, 64)
    x[0, :32] = 0.0                      # a run of zeros: its scale is 0, not a division by zero
    x[1, 5] = float("inf")               # a non-finite activation: NaN outputs, as a float matmul gives
    x[2, 40] = float("nan")
    got = cpu_kernels.quantized_linear(x, qweight, scales, integer=True)
    torch.testing.assert_close(got[0].double(), _reference(x[:1], dense, None, 32)[0], rtol=1e-5, atol=1e-5)
    assert got[1:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_scales_are_widened_exactly(dtype):
    qweight, scales, mins, dense = _packed(48, 64, 32, 4, True, dtype=dtype)
    x = torch.randn(2, 64)
    for integer in (False, True):
        torch.testing.assert_close(cpu_kernels.quantized_linear(x, qweight, scales, mins, integer).double(),
                                   _reference(x, dense, mins, 32 if integer else 1), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_are_read_right():
    qweight, scales, mins, dense = _packed(32, 64, 32, 4, True)
    x = torch.randn(64, 3).t()                                   # [3, 64], not contiguous
    for integer in (False, True):
        torch.testing.assert_close(cpu_kernels.quantized_linear(x, qweight, scales, mins, integer).double(),
                                   _reference(x, dense, mins, 32 if integer else 1), rtol=1e-5, atol=1e-5)


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
