"""Phi-3 / Phi-3.5 / Phi-4: the llama-like decoder with fused qkv and gate/up projections; RoPE on the first
`rotary_dim` dimensions of each head, longrope (offload/models/rope.py)."""
from __future__ import annotations

import torch

from offload.models.decoder import DecoderModel
from offload.models.layers import linear, merge_heads, rms_norm, split_heads
from offload.models.rope import Rope


class Phi3Model(DecoderModel):
    """Phi-3's math; the embedding, norms, RoPE tables and head are Llama's (see decoder.py)."""

    def attention_inputs(self, lw: dict, h: torch.Tensor, ctx, layer: int) -> tuple[torch.Tensor, ...]:
        """Norm, fused qkv projection split into q, k, v, partial RoPE. h: [B, T, H] -> q [B, Hq, T, D], k, v."""
        a = self.arch
        qkv = linear(rms_norm(h, lw["input_layernorm.weight"], a.rms_norm_eps), lw["self_attn.qkv_proj.weight"])
        q_out, kv_out = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        q = split_heads(qkv[..., :q_out], a.num_heads, a.head_dim)                     # [B, Hq, T, D]
        k = split_heads(qkv[..., q_out:q_out + kv_out], a.num_kv_heads, a.head_dim)    # [B, Hkv, T, D]
        v = split_heads(qkv[..., q_out + kv_out:], a.num_kv_heads, a.head_dim)
        cos, sin = ctx
        return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin), v

    def attention_output(self, lw: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """o_proj + residual, post-attention norm, fused gate/up MLP, residual. attn: [B, Hq, T, D] -> h."""
        h = h + linear(merge_heads(attn), lw["self_attn.o_proj.weight"])
        x = rms_norm(h, lw["post_attention_layernorm.weight"], self.arch.rms_norm_eps)
        gate, up = linear(x, lw["mlp.gate_up_proj.weight"]).chunk(2, dim=-1)           # [B, T, I] each
        return h + linear(up * self.act(gate), lw["mlp.down_proj.weight"])
