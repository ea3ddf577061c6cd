"""Qwen3: the llama-like decoder with an RMSNorm over each head of q and k before RoPE."""
from __future__ import annotations

import torch

from offload.models.decoder import DecoderModel
from offload.models.layers import qkv_heads, rms_norm
from offload.models.rope import Rope


class Qwen3Model(DecoderModel):
    """Qwen3's math; only the attention inputs differ from Llama's (see decoder.py)."""

    def attention_inputs(self, lw: dict, h: torch.Tensor, ctx, layer: int) -> tuple[torch.Tensor, ...]:
        """Norm, projections, per-head q/k norms, RoPE. h: [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
        a, eps = self.arch, self.arch.rms_norm_eps
        q, k, v = qkv_heads(rms_norm(h, lw["input_layernorm.weight"], eps), lw, a.num_heads, a.num_kv_heads, a.head_dim)
        q, k = rms_norm(q, lw["self_attn.q_norm.weight"], eps), rms_norm(k, lw["self_attn.k_norm.weight"], eps)
        cos, sin = ctx
        return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin), v
