"""cpu_kernels.quantized_linear against torch: the packed matrix widened by plain torch ops, then torch's
matmul in float64. With `integer` (16-bit models), groups of a multiple of 32 inputs take the integer path,
which first quantizes the activations per run of 32 (llama.cpp's scheme: int8 for 4-bit codes, int16 for
8-bit ones): the reference applies the same quantization with torch ops, and the error it adds against exact
activations is bounded separately."""
from __future__ import annotations

import pytest
import torch

import cpu_kernels


def _packed(out: int, inputs: int, group: int, bits: int, with_mins: bool, dtype=torch.float32, seed=0):
    """Random codes, scales, mins and the dense float64 matrix they stand for (4-bit without mins: int4-sym,
    w = (code - 8) * scale)."""
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
    offset = 8 if bits == 4 and not with_mins else 0
    dense = (codes.double() - offset) * scales.double().repeat_interleave(group, dim=1)
    if mins is not None:
        dense += mins.double().repeat_interleave(group, dim=1)
    return qweight, scales, mins, dense


def _limit(bits: int) -> float:
    """The integer path's largest activation code: int8 activations for 4-bit codes, int16 for 8-bit ones."""
    return 127.0 if bits == 4 else 32767.0


def _integer_runs(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [M, K] float32 as the integer path sees it: each run of 32 scaled to integers by its largest |x|,
    rounded half to even, and scaled back."""
    runs = x.reshape(x.shape[0], -1, 32)
    peak = runs.abs().amax(-1, keepdim=True)
    inv = torch.where(peak > 0, torch.tensor(_limit(bits)) / peak, torch.zeros(()))
    return (torch.round(runs * inv) * (peak / _limit(bits))).reshape(x.shape)


def _reference(x: torch.Tensor, dense: torch.Tensor, mins: torch.Tensor | None, group: int, bits: int) -> torch.Tensor:
    """What the kernels compute, in float64: the integer path (`integer`, groups of a multiple of 32) multiplies
    the codes' part by the quantized activations and the mins by the exact ones; the float kernels (`group`
    given as 1 here when `integer` is off) use x as it is."""
    if group % 32:
        return x.double() @ dense.t()
    lows = mins.double().repeat_interleave(group, dim=1) if mins is not None else torch.zeros_like(dense)
    return _integer_runs(x, bits).double() @ (dense - lows).t() + x.double() @ lows.t()


def _rounding_bound(x: torch.Tensor, dense: torch.Tensor, mins: torch.Tensor | None, group: int, bits: int):
    """The most the activations' rounding can move each output [M, N]: every activation is off by at most half
    a step (its run's largest / limit / 2), times the magnitude of the codes' part of its weight."""
    peaks = x.double().abs().reshape(x.shape[0], -1, 32).amax(-1).repeat_interleave(32, dim=1)    # [M, K]
    lows = mins.double().repeat_interleave(group, dim=1) if mins is not None else torch.zeros_like(dense)
    return (peaks / (2 * _limit(bits))) @ (dense - lows).abs().t()


@pytest.mark.parametrize("bits, with_mins", [(4, True), (4, False), (8, False), (8, True)])
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("out, inputs, group", [(64, 96, 32), (37, 128, 128), (200, 576, 64), (8, 96, 96),
                                                (24, 1024, 256), (5, 16, 16), (6, 48, 48)])
def test_matches_torch(bits, with_mins, rows, out, inputs, group):
    # the integer path's scale layouts: groups of 1 run (32), of 4 << b runs (128, 256: scales per 4 runs),
    # of 2 or 3 runs (64, 96: scales repeated per run); 16 and 48: not runs of 32 (the float kernels)
    qweight, scales, mins, dense = _packed(out, inputs, group, bits, with_mins)
    lows = -8 * scales if bits == 4 and mins is None else mins       # int4-sym: the -8 * scale the kernels add
    x = torch.randn(rows, inputs)
    got = cpu_kernels.quantized_linear(x, qweight, scales, mins, integer=True)
    want = _reference(x, dense, lows, group, bits)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    exact = x.double() @ dense.t()
    float_products = cpu_kernels.quantized_linear(x, qweight, scales, mins)           # float32 models
    torch.testing.assert_close(float_products.double(), exact, rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    if group % 32 == 0:               # the quantized activations: within half a step of each, and no closer
        bound = _rounding_bound(x, dense, lows, group, bits)
        assert ((got.double() - exact).abs() <= bound + 1e-5 * exact.abs().max()).all()
        assert (got.double() - exact).abs().max() > 1e-3 * bound.max()


def test_zero_and_non_finite_activations():
    for bits in (4, 8):
        qweight, scales, mins, dense = _packed(16, 64, 32, bits, bits == 4)
        x = torch.randn(3, 64)
        x[0, :32] = 0.0                      # a run of zeros: its scale is 0, not a division by zero
        x[1, 5] = float("inf")               # a non-finite activation: NaN outputs, as a float matmul gives
        x[2, 40] = float("nan")
        got = cpu_kernels.quantized_linear(x, qweight, scales, mins, integer=True)
        torch.testing.assert_close(got[0].double(), _reference(x[:1], dense, mins, 32, bits)[0], rtol=1e-5, atol=1e-5)
        assert got[1:].isnan().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [32, 128])
def test_16_bit_scales_are_widened_exactly(dtype, group):
    qweight, scales, mins, dense = _packed(48, 256, group, 4, True, dtype=dtype)
    x = torch.randn(2, 256)
    for integer in (False, True):
        torch.testing.assert_close(cpu_kernels.quantized_linear(x, qweight, scales, mins, integer).double(),
                                   _reference(x, dense, mins, group if integer else 1, 4), rtol=1e-5, atol=1e-5)


def test_non_contiguous_inputs_are_read_right():
    qweight, scales, mins, dense = _packed(32, 64, 32, 4, True)
    x = torch.randn(64, 3).t()                                   # [3, 64], not contiguous
    for integer in (False, True):
        torch.testing.assert_close(cpu_kernels.quantized_linear(x, qweight, scales, mins, integer).double(),
                                   _reference(x, dense, mins, 32 if integer else 1, 4), rtol=1e-5, atol=1e-5)


_PORTABLE = """
import sys, torch, cpu_kernels
qweight, scales, mins, x = torch.load(sys.argv[1])
torch.save(cpu_kernels.quantized_linear(x, qweight, scales, mins, integer=True), sys.argv[2])
"""


def test_cpus_without_avx2_compute_the_same_integers(tmp_path):
    # The 4-bit integer path uses AVX2's vpmaddubsw where the CPU has it and portable IR elsewhere: a CPU
    # without it (Numba told to compile for generic x86-64 with SSE2 only, its own cache) gets the same sums
    import os
    import subprocess
    import sys
    qweight, scales, mins, _ = _packed(40, 512, 128, 4, True, dtype=torch.bfloat16)
    x = torch.randn(3, 512)
    torch.save((qweight, scales, mins, x), tmp_path / "inputs.pt")
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CPU_FEATURES="+sse2",
               NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    subprocess.run([sys.executable, "-c", _PORTABLE, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, env=env, timeout=600)
    here = cpu_kernels.quantized_linear(x, qweight, scales, mins, integer=True)
    # the integers are exact on both; only the float32 sums of the scaled runs may round differently
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), here, rtol=1e-5, atol=1e-5 * here.abs().max().item())


def test_bad_inputs_are_one_clear_error():
    qweight, scales, mins, _ = _packed(32, 64, 32, 4, True)
    with pytest.raises(ValueError, match="x must be float32"):
        cpu_kernels.quantized_linear(torch.randn(1, 64).double(), qweight, scales, mins)
    with pytest.raises(ValueError, match=r"shapes do not fit: x \(1, 48\)"):
        cpu_kernels.quantized_linear(torch.randn(1, 48), qweight, scales, mins)
    with pytest.raises(ValueError, match="qweight must be uint8 \\(4-bit\\) or int8"):
        cpu_kernels.quantized_linear(torch.randn(1, 64), qweight.to(torch.int16), scales, mins)
    with pytest.raises(ValueError, match="scales must be a 2-D CPU tensor"):
        cpu_kernels.quantized_linear(torch.randn(1, 64), qweight, scales[0], mins)
