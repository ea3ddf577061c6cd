"""TorchAttention (the attention-backend contract) and RoPE against independent references."""
from __future__ import annotations

import pytest
import torch

from offload.attention.contract import Chunk
from offload.attention.device import TorchAttention
from offload.models.rope import Rope
from placement.architecture import Architecture


def _reference(q, k, v, pos, window):
    """One row, plain math: q [Hq, T, D], k/v [Hkv, S, D], query t at position pos[t]."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5                     # [Hq, T, S]
    j = torch.arange(k.shape[1])
    visible = j[None, :] <= pos[:, None]
    if window is not None:
        visible &= j[None, :] > pos[:, None] - window
    return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("window", [None, 3])
def test_ragged_rows_chunks_and_decode_match_plain_attention(window):
    torch.manual_seed(0)
    Hq, Hkv, D, S = 4, 2, 8, 20
    backend = TorchAttention(max_batch_size=3, max_seq_len=S, num_kv_heads=Hkv, head_dim=D,
                             dtype=torch.float32, device="cpu", sliding_window=window)
    full_k, full_v = torch.randn(3, Hkv, S, D), torch.randn(3, Hkv, S, D)
    start = torch.tensor([0, 0, 0])
    for T in (5, 4, 1, 1, 3):                      # chunks of a prefill, then decode steps
        lengths = start + T
        q = torch.randn(3, Hq, T, D)
        k_new = torch.stack([full_k[b, :, s:s + T] for b, s in enumerate(start.tolist())])
        v_new = torch.stack([full_v[b, :, s:s + T] for b, s in enumerate(start.tolist())])
        out = backend.attend(q, k_new, v_new, Chunk(start=start, num_tokens=T, device=torch.device("cpu")))
        for b in range(3):
            n = int(lengths[b])
            want = _reference(q[b], full_k[b, :, :n], full_v[b, :, :n], torch.arange(n - T, n), window)
            torch.testing.assert_close(out[b], want, atol=1e-5, rtol=1e-5)
        start = lengths - torch.tensor([0, 1, 0]) * (T > 1)    # row 1 re-writes its last slot: stale ok


def test_overflow_is_rejected():
    backend = TorchAttention(max_batch_size=1, max_seq_len=4, num_kv_heads=1, head_dim=2,
                             dtype=torch.float32, device="cpu")
    x = torch.zeros(1, 1, 3, 2)
    with pytest.raises(AssertionError):
        backend.attend(x, x, x, Chunk(start=torch.tensor([2]), num_tokens=3, device=torch.device("cpu")))


def _hf_inv_freq(config_kwargs, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = LlamaConfig(**config_kwargs)
    return ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, "cpu", seq_len=seq_len)[0]


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 8.0, "rope_theta": 10000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
])
def test_rope_frequencies_match_transformers(rope):
    kwargs = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=64,
                  num_hidden_layers=1, vocab_size=8, max_position_embeddings=131072 if "original_max_position_embeddings" in rope else 4096,
                  rope_parameters=rope)
    arch = Architecture.from_config({"model_type": "llama", **kwargs})
    ours = Rope.of(arch)
    if rope["rope_type"] != "dynamic":
        torch.testing.assert_close(ours.inv_freq, _hf_inv_freq(kwargs), atol=0, rtol=0)
        return
    positions = torch.tensor([[9000]])                # past max_position_embeddings: the base grows
    want = _hf_inv_freq(kwargs, seq_len=torch.tensor(9001))
    torch.testing.assert_close(ours._dynamic_inv_freq(positions, None)[0, 0], want, atol=0, rtol=1e-6)
