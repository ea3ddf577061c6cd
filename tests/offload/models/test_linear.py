"""offload.models.layers.linear on CPU rows: which kernel it takes and what it rounds, against torch.

Dense weights: a Numba dot per output, rounded once with the bias, as torch's F.linear (addmm) rounds; in 16
bits on more rows, where torch's 16-bit GEMM is an emulation, the matrix widened to float32 for torch's
float32 GEMM. Packed weights on a few rows: a 16-bit model's activations go through the integer path (int8 /
int16 per run of 32), a float32 model's through the exact float kernels; on more rows (prefill) torch's
float32 GEMM on the matrix dequantized to float32."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import offload.models.layers as layers
from cpu_kernels import DENSE_MAX_ROWS, PACKED_MAX_ROWS
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
    assert _within_rounding(got, want, dtype)


def _within_rounding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    """float32 sums in another order: within one rounding step of the dtype at each row's scale (twice), and
    float32's own summation error (1e-5 of the row's scale: 64 inputs here)."""
    scale = want.double().abs().amax(dim=-1, keepdim=True)
    return bool(((got.double() - want.double()).abs() <= (2 * torch.finfo(dtype).eps + 1e-5) * scale).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [False, True])
def test_dense_16_bit_prefill_rows(dtype, native, monkeypatch):
    """Past DENSE_MAX_ROWS: torch's own 16-bit GEMM where it is native, else float32 GEMM on the widened matrix
    (rounded once with the bias)."""
    monkeypatch.setattr(layers, "native_half_gemm", lambda _: native)
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(96, 64, generator=gen) * 0.2).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype)
    for rows in (DENSE_MAX_ROWS, DENSE_MAX_ROWS + 1, 90):
        x = torch.randn(1, rows, 64, generator=gen).to(dtype)
        got, want = linear(x, weight, b), F.linear(x, weight, b)
        assert got.dtype == dtype and got.shape == (1, rows, 96)
        if native and rows > DENSE_MAX_ROWS:
            assert torch.equal(got, want)
        else:
            assert _within_rounding(got, want, dtype)


@pytest.mark.parametrize("dtype, integer", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_packed_rows_take_the_path_of_their_dtype(dtype, integer):
    gen = torch.Generator().manual_seed(1)
    packed = quantize(torch.randn(48, 64, generator=gen).to(dtype), Quantization("int4", 32), "mlp.up_proj.weight")
    for rows in (1, CPU_DECODE_MAX_ROWS, PACKED_MAX_ROWS[integer]):
        x = torch.randn(rows, 64, generator=gen).to(dtype)
        want = packed.cpu_matrix()(x.float(), integer).to(dtype)
        assert torch.equal(linear(x, packed), want)
        other = packed.cpu_matrix()(x.float(), not integer).to(dtype)
        assert not torch.equal(want, other)          # the two paths differ, so the check above tells them apart
    # more rows (prefill): float32 GEMM on the matrix dequantized in float32, rounded to the dtype once
    many = torch.randn(2, PACKED_MAX_ROWS[integer], 64, generator=gen).to(dtype)
    exact = many.double() @ packed.dequantize(torch.float32).double().t()
    got = linear(many, packed)
    assert got.dtype == dtype and got.shape == (2, PACKED_MAX_ROWS[integer], 48)
    assert _within_rounding(got, exact, dtype)
    if integer:                                      # not the integer path's quantized activations
        assert not torch.equal(got[0, :1], packed.cpu_matrix()(many[0, :1].float(), True).to(dtype))


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_a_large_packed_matrix_is_dequantized_a_chunk_of_rows_at_a_time(scheme, monkeypatch):
    """Off the CPU, a packed matrix of more than DEQUANT_MAX_WEIGHTS weights (a large vocabulary's LM head) is
    dequantized a chunk of rows at a time next to their matmuls (what the workspace holds): the same products
    as the whole matrix dequantized (meta tensors route through it; CPU tensors give the numbers)."""
    gen = torch.Generator().manual_seed(0)
    weight = quantize(torch.randn(45, 64, generator=gen), Quantization(scheme), "head", torch.float32)
    x, bias = torch.randn(3, 2, 64, generator=gen), torch.randn(45, generator=gen)
    want = F.linear(x, weight.dequantize(torch.float32), bias)
    got = layers.dequantized_linear(x, weight, bias, rows_at_a_time=7)            # 6 chunks of 7, one of 3
    assert _within_rounding(got, want, torch.float32)
    monkeypatch.setattr(layers, "dequant_rows", lambda shape: 7)
    chunks = []
    monkeypatch.setattr(layers, "dequantized_linear", lambda *args: chunks.append(args[-1]) or want)
    on_meta = type(weight)(qweight=weight.qweight.to("meta"), scales=weight.scales.to("meta"),
                           mins=None if weight.mins is None else weight.mins.to("meta"))
    assert linear(x.to("meta"), on_meta) is want and chunks == [7]


def test_a_packed_table_is_looked_up_row_by_row():
    gen = torch.Generator().manual_seed(1)
    table = quantize(torch.randn(50, 64, generator=gen), Quantization("int4"), "table", torch.bfloat16)
    ids = torch.tensor([[7, 0, 49], [7, 7, 1]])
    assert torch.equal(layers.embedding(ids, table), F.embedding(ids, table.dequantize()))
