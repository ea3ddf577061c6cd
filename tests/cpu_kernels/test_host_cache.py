"""cpu_kernels.HostCache.append_and_attend: the same caches and outputs as append_kv then attention (which the
other tests hold to torch's rounding and SDPA), and SDPA itself over what it wrote; bad input leaves the caches
as they were."""
import pytest
import torch

import cpu_kernels
from tests.cpu_kernels.reference import reference_attention

CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _caches(num_rows, num_kv_heads, max_len, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_rows, num_kv_heads, max_len, head_dim, generator=g).to(dtype)
    return k, torch.randn(k.shape, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("new_dtype", ["float32", "cache"])
@pytest.mark.parametrize("num_new, window, softcap", [(1, None, None), (4, None, None), (3, 5, None),
                                                      (1, None, 30.0)])
def test_equals_append_then_attention(dtype, new_dtype, num_new, window, softcap):
    g = torch.Generator().manual_seed(7)
    max_rows, rows, num_kv_heads, group, max_len, head_dim = 4, 3, 2, 4, 300, 64
    k_cache, v_cache = _caches(max_rows, num_kv_heads, max_len, head_dim, dtype, seed=1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    start = torch.tensor([0, 290, 131])              # ragged rows, over more than one block of 128 positions
    q = torch.randn(rows, num_kv_heads * group, num_new, head_dim, generator=g)
    k_new, v_new = (torch.randn(rows, num_kv_heads, num_new, head_dim, generator=g) for _ in range(2))
    if new_dtype == "cache":
        k_new, v_new = k_new.to(dtype), v_new.to(dtype)

    out = cpu_kernels.HostCache.of(k_cache, v_cache).append_and_attend(
        q, k_new, v_new, start, sliding_window=window, softcap=softcap)
    cpu_kernels.append_kv(k_ref[:rows], v_ref[:rows], k_new, v_new, start)
    expected = cpu_kernels.attention(q, k_ref[:rows], v_ref[:rows], start + num_new, sliding_window=window,
                                     softcap=softcap)
    assert torch.equal(k_cache.view(torch.int16) if dtype != torch.float32 else k_cache,
                       k_ref.view(torch.int16) if dtype != torch.float32 else k_ref)
    assert torch.equal(v_cache.view(torch.int16) if dtype != torch.float32 else v_cache,
                       v_ref.view(torch.int16) if dtype != torch.float32 else v_ref)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    if softcap is None:                                   # and SDPA over what it wrote
        torch.testing.assert_close(out, reference_attention(q, k_cache[:rows], v_cache[:rows], start + num_new,
                                                            sliding_window=window), rtol=1e-5, atol=2e-6)


def test_a_token_tree():
    T, start = 5, 9
    g = torch.Generator().manual_seed(2)
    k_cache, v_cache = _caches(1, 2, 32, 64, torch.bfloat16, seed=3)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q = torch.randn(1, 8, T, 64, generator=g)
    k_new, v_new = (torch.randn(1, 2, T, 64, generator=g) for _ in range(2))
    parents = [-1, 0, 0, 1, 2]
    ancestors = torch.eye(T, dtype=torch.bool)
    for t, parent in enumerate(parents):
        while parent >= 0:
            ancestors[t, parent] = True
            parent = parents[parent]
    out = cpu_kernels.HostCache.of(k_cache, v_cache).append_and_attend(q, k_new, v_new, [start],
                                                                       ancestors=ancestors)
    cpu_kernels.append_kv(k_ref, v_ref, k_new, v_new, [start])
    torch.testing.assert_close(out, cpu_kernels.attention(q, k_ref, v_ref, [start + T], ancestors=ancestors),
                               rtol=0, atol=0)


@pytest.mark.parametrize("case, message", [
    ("too many rows", "must have 1 to 2 rows"),
    ("rows differ", "must hold the B = 1 rows of T = 2 tokens"),
    ("past the end", "positions must lie in"),
    ("tokens differ", "must hold the B = 1 rows of T = 2 tokens"),
    ("float64 q", "q must be float32"),
])
def test_bad_input_names_it_and_writes_nothing(case, message):
    k_cache, v_cache = _caches(2, 2, 16, 32, torch.float16, seed=4)
    before = k_cache.clone(), v_cache.clone()
    cache = cpu_kernels.HostCache.of(k_cache, v_cache)
    q, k_new, start = torch.zeros(1, 4, 2, 32), torch.zeros(1, 2, 2, 32), [3]
    if case == "too many rows":
        q, k_new, start = torch.zeros(3, 4, 2, 32), torch.zeros(3, 2, 2, 32), [0, 0, 0]
    elif case == "rows differ":
        k_new = torch.zeros(2, 2, 2, 32)
    elif case == "past the end":
        start = [15]
    elif case == "tokens differ":
        k_new = torch.zeros(1, 2, 3, 32)
    else:
        q = q.double()
    with pytest.raises(ValueError, match=message):
        cache.append_and_attend(q, k_new, k_new.clone(), start)
    assert torch.equal(k_cache.view(torch.int16), before[0].view(torch.int16))
    assert torch.equal(v_cache.view(torch.int16), before[1].view(torch.int16))


def test_a_deep_copy_writes_its_own_caches():
    import copy
    k_cache, v_cache = _caches(1, 2, 16, 32, torch.bfloat16, seed=6)
    cache = cpu_kernels.HostCache.of(k_cache, v_cache)
    twin = copy.deepcopy(cache)
    before = k_cache.clone()
    k_new = torch.ones(1, 2, 1, 32)
    twin.append_and_attend(torch.zeros(1, 4, 1, 32), k_new, k_new, [5])
    assert torch.equal(k_cache.view(torch.int16), before.view(torch.int16))          # the original untouched
    assert torch.equal(twin.k_cache[0, :, 5].float(), torch.ones(2, 32))             # the copy written
