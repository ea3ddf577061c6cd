"""The kernels' 16-bit widening, exp and tanh against numpy/torch, exhaustively where the domain allows."""
import numpy as np
import torch
from numba import njit

from cpu_kernels._attention_kernel import FASTMATH
from cpu_kernels._bits import _half_bits_to_f32_soft, fast_exp, fast_tanh, widen


@njit
def _widen_all(bits, out):
    for i in range(bits.size):
        out[i] = widen(bits[i])


@njit
def _soft_f16_all(bits, out):
    for i in range(bits.size):
        out[i] = _half_bits_to_f32_soft(bits[i])


@njit
def _exp_all(x, out):
    for i in range(x.size):
        out[i] = fast_exp(x[i])


@njit(fastmath=FASTMATH)  # as the attention kernel compiles it
def _tanh_all(x, out):
    for i in range(x.size):
        out[i] = fast_tanh(x[i])


ALL_16_BIT = np.arange(65536, dtype=np.uint32).astype(np.uint16)


def _same_floats(ours: np.ndarray, theirs: np.ndarray) -> bool:
    # identical bits, except that any NaN matches any NaN (quieting a signalling NaN is allowed)
    both_nan = np.isnan(ours) & np.isnan(theirs)
    return bool(np.all((ours.view(np.uint32) == theirs.view(np.uint32)) | both_nan))


def test_bf16_widening_matches_torch_for_every_pattern():
    out = np.empty(65536, np.float32)
    _widen_all(ALL_16_BIT, out)
    theirs = torch.from_numpy(ALL_16_BIT.view(np.int16)).view(torch.bfloat16).float().numpy()
    assert _same_floats(out, theirs)


def test_f16_widening_matches_torch_for_every_pattern():
    theirs = torch.from_numpy(ALL_16_BIT.view(np.int16)).view(torch.float16).float().numpy()
    for kernel in (_widen_all, _soft_f16_all):
        out = np.empty(65536, np.float32)
        kernel(ALL_16_BIT.view(np.int16) if kernel is _widen_all else ALL_16_BIT, out)
        assert _same_floats(out, theirs)


def test_fast_exp_accuracy():
    x = np.concatenate([np.linspace(-87.0, 0.0, 400_001), np.linspace(0.0, 80.0, 1001)]).astype(np.float32)
    out = np.empty_like(x)
    _exp_all(x, out)
    exact = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - exact) / exact) < 3e-7
    special = np.array([-np.inf, -1000.0, -87.5, np.nan], np.float32)
    out = np.empty_like(special)
    _exp_all(special, out)
    assert out[0] == 0.0 and out[1] == 0.0 and out[2] == 0.0 and np.isnan(out[3])


def test_fast_tanh_accuracy():
    # both branches (|x| < 0.625: polynomial, else via exp), tiny arguments and the saturated tails
    x = np.concatenate([np.linspace(-20.0, 20.0, 400_001), np.logspace(-30, 1.5, 20_001),
                        -np.logspace(-30, 1.5, 20_001), [0.625, -0.625, np.nextafter(0.625, 0)]])
    x = x.astype(np.float32)
    out = np.empty_like(x)
    _tanh_all(x, out)
    exact = np.tanh(x.astype(np.float64))
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(out - exact) / ulp) < 2.0
    assert np.all(np.abs(out) <= 1.0)
    special = np.array([np.inf, -np.inf, 10.0, -10.0, 1e30, -1e30, 0.0, np.nan], np.float32)
    out = np.empty_like(special)
    _tanh_all(special, out)
    assert out[:6].tolist() == [1.0, -1.0, 1.0, -1.0, 1.0, -1.0] and out[6] == 0.0 and np.isnan(out[7])
