"""cpu_kernels.attention against torch SDPA (float32 and float64) on random inputs."""
import numba
import pytest
import torch

import cpu_kernels
from tests.cpu_kernels.reference import random_caches, reference_attention

CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NUM_KV_HEADS = 2


def _case(dtype, group, head_dim, num_queries, max_len=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_heads = NUM_KV_HEADS * group
    # ragged rows: the shortest possible (T), the full cache (S_max), and one in between
    lengths = torch.tensor([num_queries, max_len, num_queries + 37], dtype=torch.int32)
    q = torch.randn(len(lengths), num_heads, num_queries, head_dim, generator=g)
    k, v = random_caches(len(lengths), NUM_KV_HEADS, max_len, head_dim, dtype, g)
    return q, k, v, lengths


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("num_queries", [1, 7])
def test_matches_sdpa_in_float64(dtype, group, head_dim, num_queries):
    q, k, v, lengths = _case(dtype, group, head_dim, num_queries)
    out = cpu_kernels.attention(q, k, v, lengths)
    assert out.dtype == torch.float32 and out.shape == q.shape
    # 16-bit caches widen exactly to float32, so every dtype is held to float32 accuracy
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("num_queries", [1, 7])
def test_float32_cache_matches_float32_sdpa(num_queries):
    q, k, v, lengths = _case(torch.float32, 4, 128, num_queries, max_len=300)
    expected = reference_attention(q, k, v, lengths, dtype=torch.float32)
    torch.testing.assert_close(cpu_kernels.attention(q, k, v, lengths), expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("num_queries", [1, 7])
@pytest.mark.parametrize("window", [1, 3, 40, 500])
def test_sliding_window(dtype, num_queries, window):
    q, k, v, lengths = _case(dtype, 4, 64, num_queries, max_len=300, seed=window)
    out = cpu_kernels.attention(q, k, v, lengths, sliding_window=window)
    assert not out.isnan().any()
    expected = reference_attention(q, k, v, lengths, sliding_window=window)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=2e-6)


def test_window_of_one_returns_the_own_value():
    # a single visible position: softmax weight exactly 1, output = v at the query's own position
    q, k, v, lengths = _case(torch.bfloat16, 2, 64, 7)
    out = cpu_kernels.attention(q, k, v, lengths, sliding_window=1)
    for b, length in enumerate(lengths.tolist()):
        own = v[b, :, length - 7:length].float().repeat_interleave(2, dim=0)  # [Hq, T, D]
        torch.testing.assert_close(out[b], own, rtol=0, atol=0)


def test_length_one_decode_returns_the_first_value():
    q, k, v, _ = _case(torch.float16, 4, 80, 1)
    out = cpu_kernels.attention(q, k, v, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0].float().repeat_interleave(4, dim=1), rtol=0, atol=0)


def test_custom_scale_and_noncontiguous_q():
    q, k, v, lengths = _case(torch.float32, 2, 64, 7)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous strides
    assert not q_t.is_contiguous()
    out = cpu_kernels.attention(q_t, k, v, lengths.tolist(), scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths, scale=0.3), rtol=1e-5, atol=2e-6)


def test_long_prefill_chunk_over_a_long_cache():
    # a 512-token chunk after a 3584-token cached prefix: query tiles, blocks and masks at scale
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 4, 512, 64, generator=g)
    k, v = random_caches(1, 2, 4096, 64, torch.bfloat16, g)
    lengths = torch.tensor([4096])
    out = cpu_kernels.attention(q, k, v, lengths)
    torch.testing.assert_close(out, reference_attention(q, k, v, lengths), rtol=1e-5, atol=2e-6)
    windowed = cpu_kernels.attention(q, k, v, lengths, sliding_window=1000)
    expected = reference_attention(q, k, v, lengths, sliding_window=1000)
    torch.testing.assert_close(windowed, expected, rtol=1e-5, atol=2e-6)


def test_result_does_not_depend_on_thread_count():
    q, k, v, lengths = _case(torch.bfloat16, 4, 128, 7, max_len=400)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = cpu_kernels.attention(q, k, v, lengths)
    finally:
        numba.set_num_threads(before)
    assert torch.equal(single, cpu_kernels.attention(q, k, v, lengths))


def test_nan_in_a_visible_value_propagates():
    q, k, v, lengths = _case(torch.float32, 1, 64, 1)
    v[1, 0, 5, 3] = float("nan")
    out = cpu_kernels.attention(q, k, v, lengths)
    assert out[1, 0, 0, 3].isnan()
    assert not out[0].isnan().any() and not out[2].isnan().any()


def random_tree(num_tokens: int, seed: int) -> list[int]:
    """Parents of a random token tree in order: token 0 the root (-1), each later one under an earlier one."""
    g = torch.Generator().manual_seed(seed)
    return [-1] + [int(torch.randint(0, t, (), generator=g)) for t in range(1, num_tokens)]


def sdpa_over_tree(q, k, v, length: int, parents: list[int], window=None, softcap=None):
    """Torch SDPA (float64) with the mask a token tree means, built from the parents by walking them: query t
    sees the cache before the T new tokens and its own ancestors; logical positions by depth for the window."""
    T = len(parents)
    start = length - T
    depth = []
    for t, parent in enumerate(parents):
        depth.append(0 if parent < 0 else depth[parent] + 1)
    mask = torch.zeros(T, length, dtype=torch.bool)
    mask[:, :start] = True
    for t in range(T):
        u = t
        while u >= 0:
            mask[t, start + u] = True
            u = parents[u]
    if window is not None:
        key_pos = list(range(start)) + [start + d for d in depth]
        for t in range(T):
            for j in range(length):
                if key_pos[j] <= start + depth[t] - window:
                    mask[t, j] = False
    group = q.shape[1] // k.shape[1]
    kk = k[:, :, :length].double().repeat_interleave(group, dim=1)
    vv = v[:, :, :length].double().repeat_interleave(group, dim=1)
    scores = q.double() @ kk.transpose(2, 3) / q.shape[-1] ** 0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ vv).float()


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (None, 20.0)])
def test_a_token_tree_sees_the_prefix_and_its_ancestors(dtype, window, softcap):
    """Speculative decoding's token trees (ancestors [T, T]) against SDPA over the mask walked from the parents."""
    T, length = 12, 40
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, T, 64, generator=g)
    k, v = random_caches(1, NUM_KV_HEADS, 64, 64, dtype, g)
    for seed in range(3):
        parents = random_tree(T, seed)
        ancestors = torch.zeros(T, T, dtype=torch.bool)
        for t in range(T):
            u = t
            while u >= 0:
                ancestors[t, u] = True
                u = parents[u]
        out = cpu_kernels.attention(q, k, v, torch.tensor([length]), sliding_window=window, softcap=softcap,
                                    ancestors=ancestors)
        torch.testing.assert_close(out, sdpa_over_tree(q, k, v, length, parents, window, softcap), rtol=1e-5,
                                   atol=2e-6)
    chain = torch.ones(T, T, dtype=torch.bool).tril()             # a chain is the causal chunk
    torch.testing.assert_close(cpu_kernels.attention(q, k, v, torch.tensor([length]), ancestors=chain),
                               cpu_kernels.attention(q, k, v, torch.tensor([length])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="ancestors must mark each token itself and only earlier tokens"):
        cpu_kernels.attention(q, k, v, torch.tensor([length]), ancestors=torch.ones(T, T, dtype=torch.bool))
