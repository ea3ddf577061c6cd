"""cpu_kernels.dense_linear_rows against torch: a few rows times a dense float32 / bfloat16 / float16
matrix, summed in float32, against the same product in float64; its and wide_linear's errors."""
from __future__ import annotations

import pytest
import torch

import cpu_kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, out, inputs", [(1, 70, 64), (3, 33, 100), (4, 512, 576)])
def test_matches_torch(dtype, rows, out, inputs):
    gen = torch.Generator().manual_seed(rows + out)
    weight = (torch.randn(out, inputs, generator=gen) * 0.1).to(dtype)
    x = torch.randn(rows, inputs, generator=gen)
    got = cpu_kernels.dense_linear_rows(x, weight)
    want = x.double() @ weight.double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("function, weight_error", [
    (cpu_kernels.dense_linear_rows, "weight must be a 2-D float32/bfloat16/float16 CPU tensor"),
    (cpu_kernels.wide_linear, "weight must be a PackedMatrix or a 2-D float32/bfloat16/float16 CPU tensor")])
def test_bad_inputs_are_one_clear_error(function, weight_error):
    weight = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"x must be a float32 \[M, 16\] CPU tensor"):
        function(torch.randn(2, 8), weight)
    with pytest.raises(ValueError, match=r"x must be a float32 \[M, 16\] CPU tensor"):
        function(torch.randn(2, 16).double(), weight)
    with pytest.raises(ValueError, match=weight_error):
        function(torch.randn(2, 16), weight.double())
