"""Every bad input to attention / append_kv is a one-line ValueError naming what is wrong."""
import pytest
import torch

import cpu_kernels

B, HQ, HKV, T, S, D = 2, 4, 2, 3, 16, 64


def _good(dtype=torch.bfloat16):
    q = torch.randn(B, HQ, T, D)
    k = torch.zeros(B, HKV, S, D, dtype=dtype)
    return q, k, torch.zeros_like(k), torch.tensor([T, S])


ATTENTION_CASES = {
    "q rank": (lambda q, k, v, n: (q[0], k, v, n), {}, "q must have rank 4"),
    "cache rank": (lambda q, k, v, n: (q, k[0], v[0], n), {}, "k_cache must have rank 4"),
    "q dtype": (lambda q, k, v, n: (q.double(), k, v, n), {}, "q must be float32"),
    "q not a tensor": (lambda q, k, v, n: (q.numpy(), k, v, n), {}, "q must be a torch.Tensor"),
    "cache dtype": (lambda q, k, v, n: (q, k.to(torch.float64), v.to(torch.float64), n), {}, "cache dtype"),
    "int cache": (lambda q, k, v, n: (q, k.to(torch.int16), v.to(torch.int16), n), {}, "cache dtype"),
    "k/v dtype mismatch": (lambda q, k, v, n: (q, k, v.float(), n), {}, "must match in shape and dtype"),
    "k/v shape mismatch": (lambda q, k, v, n: (q, k, v[:, :, :8].contiguous(), n), {}, "must match in shape"),
    "non-contiguous cache": (lambda q, k, v, n: (q, k.transpose(2, 3).contiguous().transpose(2, 3),
                                                 v, n), {}, "k_cache must be contiguous"),
    "batch mismatch": (lambda q, k, v, n: (q[:1], k, v, n[:1]), {}, "does not match caches"),
    "head dim mismatch": (lambda q, k, v, n: (q[..., :32], k, v, n), {}, "does not match caches"),
    "heads not a multiple": (lambda q, k, v, n: (q[:, :3], k, v, n), {}, "positive multiple"),
    "fewer q heads than kv": (lambda q, k, v, n: (q[:, :1], k, v, n), {}, "positive multiple"),
    "no queries": (lambda q, k, v, n: (q[:, :, :0], k, v, n), {}, "at least one query"),
    "length below T": (lambda q, k, v, n: (q, k, v, torch.tensor([T - 1, S])), {}, r"\[T, S_max\] = \[3, 16\]"),
    "length above S_max": (lambda q, k, v, n: (q, k, v, torch.tensor([T, S + 1])), {}, r"\[3, 16\]"),
    "float lengths": (lambda q, k, v, n: (q, k, v, n.float()), {}, "lengths must be an integer tensor"),
    "lengths shape": (lambda q, k, v, n: (q, k, v, torch.tensor([T, S, S])), {}, r"lengths must have shape \(2,\)"),
    "bad window": (lambda q, k, v, n: (q, k, v, n), {"sliding_window": 0}, "sliding_window"),
    "float window": (lambda q, k, v, n: (q, k, v, n), {"sliding_window": 2.5}, "sliding_window"),
    "bool window": (lambda q, k, v, n: (q, k, v, n), {"sliding_window": True}, "sliding_window"),
    "bool scale": (lambda q, k, v, n: (q, k, v, n), {"scale": True}, "scale must be a finite"),
    "bad scale": (lambda q, k, v, n: (q, k, v, n), {"scale": float("nan")}, "scale must be a finite"),
    "zero softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": 0.0}, r"softcap must be .*, got 0\.0$"),
    "negative softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": -50.0}, r"softcap .*, got -50\.0$"),
    "nan softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": float("nan")}, r"softcap .*, got nan$"),
    "inf softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": float("inf")}, r"softcap .*, got inf$"),
    "bool softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": True}, r"softcap .*, got True$"),
    "string softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": "50"}, r"softcap .*, got '50'$"),
    "tensor softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": torch.tensor(50.0)},
                       r"softcap .*, got tensor\(50\.\)$"),
    "complex softcap": (lambda q, k, v, n: (q, k, v, n), {"softcap": 50j}, r"softcap .*, got 50j$"),
    "softcap under float32": (lambda q, k, v, n: (q, k, v, n), {"softcap": 1e-40}, r"softcap .*, got 1e-40$"),
    "softcap over float32": (lambda q, k, v, n: (q, k, v, n), {"softcap": 1e39}, r"softcap .*, got 1e\+39$"),
    "meta cache": (lambda q, k, v, n: (q, k.to("meta"), v.to("meta"), n), {}, "must be a CPU tensor"),
}


@pytest.mark.parametrize("case", sorted(ATTENTION_CASES))
def test_attention_rejects(case):
    transform, kwargs, message = ATTENTION_CASES[case]
    args = transform(*_good())
    with pytest.raises(ValueError, match=message) as info:
        cpu_kernels.attention(*args, **kwargs)
    assert "\n" not in str(info.value)


def _good_append(dtype=torch.float16):
    k = torch.zeros(B, HKV, S, D, dtype=dtype)
    new = torch.randn(B, HKV, T, D)
    return k, torch.zeros_like(k), new, new.clone(), torch.tensor([0, S - T])


APPEND_CASES = {
    "new rank": (lambda k, v, kn, vn, p: (k, v, kn[0], vn[0], p), "k_new must have rank 4"),
    "new dtype": (lambda k, v, kn, vn, p: (k, v, kn.double(), vn.double(), p), "float32 or the cache dtype"),
    "other 16-bit dtype": (lambda k, v, kn, vn, p: (k, v, kn.bfloat16(), vn.bfloat16(), p),
                           "float32 or the cache dtype"),
    "k/v new mismatch": (lambda k, v, kn, vn, p: (k, v, kn, vn[:, :, :2], p), "must match in shape"),
    "heads mismatch": (lambda k, v, kn, vn, p: (k, v, kn[:, :1], vn[:, :1], p), "do not match caches"),
    "batch mismatch": (lambda k, v, kn, vn, p: (k, v, kn[:1], vn[:1], p[:1]), "do not match caches"),
    "dim mismatch": (lambda k, v, kn, vn, p: (k, v, kn[..., :8], vn[..., :8], p), "do not match caches"),
    "no tokens": (lambda k, v, kn, vn, p: (k, v, kn[:, :, :0], vn[:, :, :0], p), "do not match caches"),
    "negative position": (lambda k, v, kn, vn, p: (k, v, kn, vn, torch.tensor([-1, 0])), r"\[0, 13\]"),
    "past the end": (lambda k, v, kn, vn, p: (k, v, kn, vn, torch.tensor([0, S - T + 1])), r"\[0, 13\]"),
    "positions shape": (lambda k, v, kn, vn, p: (k, v, kn, vn, [0]), r"positions must have shape \(2,\)"),
    "float positions": (lambda k, v, kn, vn, p: (k, v, kn, vn, [0.0, 1.0]), "positions must hold integers"),
    "bool positions": (lambda k, v, kn, vn, p: (k, v, kn, vn, torch.tensor([False, True])),
                       "positions must be an integer tensor"),
    "non-contiguous cache": (lambda k, v, kn, vn, p: (k, v.transpose(0, 1).contiguous().transpose(0, 1),
                                                      kn, vn, p), "v_cache must be contiguous"),
    "cache dtype mismatch": (lambda k, v, kn, vn, p: (k, v.float(), kn, vn, p), "must match in shape and dtype"),
}


@pytest.mark.parametrize("case", sorted(APPEND_CASES))
def test_append_kv_rejects_and_leaves_the_cache_untouched(case):
    k, v, kn, vn, p = _good_append()
    args = APPEND_CASES[case][0](k, v, kn, vn, p)
    with pytest.raises(ValueError, match=APPEND_CASES[case][1]) as info:
        cpu_kernels.append_kv(*args)
    assert "\n" not in str(info.value)
    assert not k.any() and not v.any()
