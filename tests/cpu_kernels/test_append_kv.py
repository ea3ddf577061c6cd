"""cpu_kernels.append_kv: round trip into every cache dtype, with torch's exact rounding."""
import numpy as np
import pytest
import torch

import cpu_kernels
from tests.cpu_kernels.reference import reference_attention

CACHE_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _special_values() -> torch.Tensor:
    """float32 values that exercise rounding: ties, overflow, subnormals, inf, nan, signed zeros."""
    values = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), -float("nan"),
              65504.0, 65519.99, 65520.0, 1e9, -1e9, 6.1e-5, 6.0e-8, 2.98e-8, 2.9802322e-08, 1e-10,
              3.0e38, 3.4028235e38, 1.17549435e-38, 1e-45]
    bits = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x3F807FFF,  # bf16 ties to even / just below
                     0x3F801000, 0x3F803000, 0x3F800FFF,  # fp16 ties to even / just below
                     0x33000000, 0x33000001, 0x387FC000, 0x387FE000,  # fp16 subnormal boundaries
                     0x7F7FFFFF, 0x477FF000, 0x477FEFFF], dtype=np.uint32)
    return torch.cat([torch.tensor(values, dtype=torch.float32), torch.from_numpy(bits.view(np.float32))])


def _random_bit_patterns(count: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**32, count, dtype=np.uint64).astype(np.uint32)
    return torch.from_numpy(bits.view(np.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_is_bit_identical_to_torch(dtype):
    values = torch.cat([_special_values(), _random_bit_patterns(200_000, seed=1)])
    head_dim = 64
    values = torch.cat([values, torch.zeros((-len(values)) % (2 * head_dim))])
    k_new = values.reshape(1, 1, -1, head_dim)[:, :, ::2].contiguous()  # [1, 1, T, D]
    v_new = values.reshape(1, 1, -1, head_dim)[:, :, 1::2].contiguous()
    num_new = k_new.shape[2]
    k_cache = torch.zeros(1, 1, num_new + 3, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    cpu_kernels.append_kv(k_cache, v_cache, k_new, v_new, [3])
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        ours = cache[:, :, 3:].view(torch.int16)
        theirs = new.to(dtype).view(torch.int16)
        assert torch.equal(ours, theirs), "bit patterns differ from torch's .to()"
        assert torch.equal(cache[:, :, :3].view(torch.int16), torch.zeros(1, 1, 3, head_dim, dtype=torch.int16))


@pytest.mark.parametrize("dtype", CACHE_DTYPES)
@pytest.mark.parametrize("new_dtype", ["float32", "cache"])
def test_round_trip_then_attend(dtype, new_dtype):
    # decode-style per-row positions: rows hold different numbers of tokens
    g = torch.Generator().manual_seed(3)
    num_rows, num_kv_heads, max_len, head_dim, num_new = 3, 2, 40, 80, 5
    k_cache = torch.zeros(num_rows, num_kv_heads, max_len, head_dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    expected_k = torch.zeros(k_cache.shape)
    expected_v = torch.zeros(k_cache.shape)
    positions = torch.tensor([0, 35, 17])
    k_new = torch.randn(num_rows, num_kv_heads, num_new, head_dim, generator=g)
    v_new = torch.randn(num_rows, num_kv_heads, num_new, head_dim, generator=g)
    if new_dtype == "cache":
        k_new, v_new = k_new.to(dtype), v_new.to(dtype)
    cpu_kernels.append_kv(k_cache, v_cache, k_new, v_new, positions)
    for b, start in enumerate(positions.tolist()):
        expected_k[b, :, start:start + num_new] = k_new[b].to(dtype).float()
        expected_v[b, :, start:start + num_new] = v_new[b].to(dtype).float()
    assert torch.equal(k_cache.float(), expected_k) and torch.equal(v_cache.float(), expected_v)

    # the appended tokens are what attention then reads
    lengths = positions + num_new
    q = torch.randn(num_rows, 4, num_new, head_dim, generator=g)
    out = cpu_kernels.attention(q, k_cache, v_cache, lengths)
    torch.testing.assert_close(out, reference_attention(q, k_cache, v_cache, lengths), rtol=1e-5, atol=2e-6)


def test_noncontiguous_new_tokens():
    k_cache = torch.zeros(2, 2, 8, 64, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_new = torch.randn(2, 3, 2, 64).transpose(1, 2)  # [B, Hkv=2, T=3, D], non-contiguous
    v_new = torch.randn(2, 3, 2, 64).transpose(1, 2)
    cpu_kernels.append_kv(k_cache, v_cache, k_new, v_new, torch.tensor([1, 5], dtype=torch.int32))
    assert torch.equal(k_cache[1, :, 5:8], k_new[1].to(torch.bfloat16))
    assert torch.equal(v_cache[0, :, 1:4], v_new[0].to(torch.bfloat16))
