"""cpu_kernels.attention with Gemma 2's attention logit soft-cap against a plain float64 eager reference."""
import numba
import numpy as np
import pytest
import torch

import cpu_kernels
from cpu_kernels._attention_kernel import attend, tile_queries
from cpu_kernels._checks import cache_view
from tests.cpu_kernels.reference import plain_attention, random_caches, reference_attention

CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_KV_HEADS = 2
GEMMA2_SOFTCAP = 50.0  # Gemma 2's attn_logit_softcapping


def _case(dtype, group, num_queries, head_dim=64, max_len=96, q_scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    # ragged rows: the shortest possible (T), the full cache (S_max), and one in between
    lengths = torch.tensor([num_queries, max_len, num_queries + 37], dtype=torch.int32)
    # q_scale spreads the scores (std ~ q_scale) so that a cap of a few units clearly bends them
    q = q_scale * torch.randn(len(lengths), NUM_KV_HEADS * group, num_queries, head_dim, generator=g)
    k, v = random_caches(len(lengths), NUM_KV_HEADS, max_len, head_dim, dtype, g)
    return q, k, v, lengths


def test_plain_reference_without_cap_is_sdpa():
    # the reference itself: with softcap None it must be the SDPA reference the other tests trust
    q, k, v, lengths = _case(torch.bfloat16, 2, 7)
    for window in (None, 5):
        torch.testing.assert_close(plain_attention(q, k, v, lengths, sliding_window=window),
                                   reference_attention(q, k, v, lengths, sliding_window=window),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("num_queries", [1, 7])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("softcap", [2.0, GEMMA2_SOFTCAP])
def test_softcap_matches_plain_reference(dtype, group, num_queries, window, softcap):
    q, k, v, lengths = _case(dtype, group, num_queries, seed=group)
    out = cpu_kernels.attention(q, k, v, lengths, sliding_window=window, softcap=softcap)
    assert out.dtype == torch.float32 and out.shape == q.shape
    expected = plain_attention(q, k, v, lengths, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)
    # the cap changed the answer: the test would catch a kernel that ignores it
    uncapped = plain_attention(q, k, v, lengths, sliding_window=window)
    assert (expected - uncapped).abs().max() > 1e-3


def test_softcap_none_is_bit_identical_to_no_argument():
    # softcap=None is the uncapped kernel path: the same bits as leaving the argument out, and as the
    # kernel called directly with its "no cap" value 0
    for dtype in CACHE_DTYPES:
        for num_queries in (1, 7):
            for window in (None, 3):
                q, k, v, lengths = _case(dtype, 4, num_queries, head_dim=80, max_len=300, seed=num_queries)
                default = cpu_kernels.attention(q, k, v, lengths, sliding_window=window)
                explicit = cpu_kernels.attention(q, k, v, lengths, sliding_window=window, softcap=None)
                assert torch.equal(default.view(torch.int32), explicit.view(torch.int32))
                direct = np.empty(q.shape, np.float32)
                attend(q.numpy(), cache_view(k, fp16_as_int16=True), cache_view(v, fp16_as_int16=True),
                       lengths.numpy().astype(np.int64), np.float32(80 ** -0.5), window or 0, np.float32(0.0),
                       np.zeros((0, 0), np.uint8), np.zeros(0, np.int64), direct, tile_queries(num_queries, 4))
                assert np.array_equal(direct.view(np.int32), default.numpy().view(np.int32))
                torch.testing.assert_close(default, reference_attention(q, k, v, lengths, sliding_window=window),
                                           rtol=1e-5, atol=2e-6)


def test_huge_cap_is_no_cap():
    # c * tanh(s / c) -> s as c grows
    q, k, v, lengths = _case(torch.float16, 2, 7)
    out = cpu_kernels.attention(q, k, v, lengths, softcap=1e6)
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("num_queries", [1, 7])
def test_saturated_scores(num_queries):
    # scale 100 puts nearly every score deep in tanh's flat tails (exactly +-1 after the cap), where the
    # kernel's tanh takes its exp branch; the huge raw scores must not overflow into inf or NaN
    q, k, v, lengths = _case(torch.bfloat16, 2, num_queries, q_scale=1.0)
    out = cpu_kernels.attention(q, k, v, lengths, scale=100.0, softcap=1.0, sliding_window=40)
    assert out.isfinite().all()
    expected = plain_attention(q, k, v, lengths, scale=100.0, softcap=1.0, sliding_window=40)
    # the scale multiplies the float32 rounding of each dot product (summed in another order by the kernel's
    # SIMD lanes: 8 with AVX2, 16 with AVX-512) by 100 before tanh: ~1e-5 of a score, so of the output
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_softcap_with_custom_scale_and_int_cap():
    q, k, v, lengths = _case(torch.float32, 4, 7)
    out = cpu_kernels.attention(q, k, v, lengths.tolist(), scale=0.05, softcap=3)
    torch.testing.assert_close(out, plain_attention(q, k, v, lengths, scale=0.05, softcap=3), rtol=1e-5,
                               atol=2e-6)


def test_long_prefill_chunk_with_softcap_and_window():
    # Gemma 2's local layers: cap 50 and a sliding window, over query tiles and several K/V blocks
    g = torch.Generator().manual_seed(7)
    q = 3.0 * torch.randn(1, 4, 512, 64, generator=g)
    k, v = random_caches(1, 2, 4096, 64, torch.bfloat16, g)
    lengths = torch.tensor([4096])
    for window in (None, 1000):
        out = cpu_kernels.attention(q, k, v, lengths, sliding_window=window, softcap=GEMMA2_SOFTCAP)
        expected = plain_attention(q, k, v, lengths, sliding_window=window, softcap=GEMMA2_SOFTCAP)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


def test_softcap_result_does_not_depend_on_thread_count():
    q, k, v, lengths = _case(torch.bfloat16, 4, 7, head_dim=128, max_len=400)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = cpu_kernels.attention(q, k, v, lengths, softcap=GEMMA2_SOFTCAP)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(single, cpu_kernels.attention(q, k, v, lengths, softcap=GEMMA2_SOFTCAP))


def test_nan_in_a_visible_key_propagates_through_the_cap():
    q, k, v, lengths = _case(torch.float32, 1, 1)
    k[1, 0, 5, 3] = float("nan")
    out = cpu_kernels.attention(q, k, v, lengths, softcap=GEMMA2_SOFTCAP)
    assert out[1, 0, 0].isnan().all()
    assert not out[0].isnan().any() and not out[2].isnan().any() and not out[1, 1].isnan().any()
