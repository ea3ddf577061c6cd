"""cpu_kernels.wide_linear (many rows: the matrix widened to float32 a chunk of rows at a time, torch's float32
GEMM on each chunk) against the same product in float64, for packed matrices (the dense matrix they stand
for, built with plain torch ops) and dense float32 / bfloat16 / float16 ones; chunks of a few rows with a
ragged last one, and the one-row chunk."""
from __future__ import annotations

import pytest
import torch

import cpu_kernels
import cpu_kernels.linear as linear_module
from tests.cpu_kernels.test_quantized_linear import _packed


@pytest.fixture(params=[None, 5, 1], ids=["one-chunk", "chunks-of-5-rows", "chunks-of-1-row"])
def chunk_rows(request, monkeypatch):
    """WIDE_CHUNK_BYTES as a number of float32 rows of the inputs used below (None: the default)."""
    def set_for(inputs: int):
        if request.param is not None:
            monkeypatch.setattr(linear_module, "WIDE_CHUNK_BYTES", request.param * 4 * inputs)
    return set_for


@pytest.mark.parametrize("bits, with_mins", [(4, True), (4, False), (8, False), (8, True)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out, inputs, group", [(37, 128, 32), (24, 192, 64), (16, 256, 256), (9, 48, 16)])
def test_packed_matches_torch(bits, with_mins, scale_dtype, out, inputs, group, chunk_rows):
    chunk_rows(inputs)
    qweight, scales, mins, dense = _packed(out, inputs, group, bits, with_mins, dtype=scale_dtype, seed=out)
    matrix = cpu_kernels.PackedMatrix.of(qweight, scales, mins)
    x = torch.randn(70, inputs, generator=torch.Generator().manual_seed(inputs))
    got = cpu_kernels.wide_linear(x, matrix)
    want = x.double() @ dense.t()
    assert got.dtype == torch.float32 and got.shape == (70, out) and got.is_contiguous()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    # the widened rows themselves: x = I gives W.T, each weight its float32 value: code * scale rounded
    # once (exact with 16-bit scales), int4-sym's (code - 8) * scale likewise, + min one more rounding
    eye = cpu_kernels.wide_linear(torch.eye(inputs), matrix)
    slack = 0.0 if mins is None else 2 ** -23 * dense.abs().max().item()
    torch.testing.assert_close(eye.t().double(), dense.float().double(), rtol=2 ** -23, atol=slack)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 17, 70])
def test_dense_matches_torch(dtype, rows, chunk_rows):
    chunk_rows(96)
    gen = torch.Generator().manual_seed(rows)
    weight = (torch.randn(41, 96, generator=gen) * 0.1).to(dtype)
    x = torch.randn(rows, 96, generator=gen)
    got = cpu_kernels.wide_linear(x, weight)
    want = x.double() @ weight.double().t()
    assert got.dtype == torch.float32 and got.shape == (rows, 41)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_buffer_is_reused_and_fits_any_width(chunk_rows, monkeypatch):
    """One buffer per thread, grown only for a matrix whose chunk needs more, then kept for narrower ones."""
    chunk_rows(64)
    monkeypatch.delattr(linear_module._wide, "buffer", raising=False)          # this thread starts without one
    buffers = []
    for inputs in (64, 512, 64):
        weight = torch.randn(300, inputs)
        x = torch.randn(20, inputs)
        torch.testing.assert_close(cpu_kernels.wide_linear(x, weight).double(), x.double() @ weight.double().t(),
                                   rtol=1e-5, atol=1e-4)
        buffers.append(linear_module._wide.buffer)
    need = {inputs: max(1, linear_module.WIDE_CHUNK_BYTES // (4 * inputs)) * inputs for inputs in (64, 512)}
    assert buffers[0].numel() == need[64] and buffers[1].numel() == max(need.values())
    assert (buffers[1] is buffers[0]) == (need[512] <= need[64]) and buffers[2] is buffers[1]
