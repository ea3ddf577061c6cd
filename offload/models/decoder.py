"""Llama, Mistral and Qwen2: one pre-norm decoder (RMSNorm, RoPE, GQA attention, SwiGLU) with options.

The options come from the Architecture: q/k/v (and Llama's o_proj) biases, MLP biases, explicit head_dim,
RoPE scaling, per-layer sliding windows (applied by the attention backend, see `window_of`).
"""
from __future__ import annotations

import torch

from offload.models.layers import activation, embedding, gated_mlp, linear, merge_heads, qkv_heads, rms_norm
from offload.models.rope import Rope
from placement.architecture import Architecture


class DecoderModel:
    """The math of a llama-like model as functions over weight dicts; knows nothing about placement."""

    attention_scale = None     # SDPA's default 1/sqrt(head_dim)

    def __init__(self, arch: Architecture, device=None):
        self.arch = arch
        self.rope = Rope.of(arch, device)
        self.act = activation(arch.hidden_act)

    def embed(self, w: dict, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] -> h: [B, T, H]
        return embedding(input_ids, w["model.embed_tokens.weight"])

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None):
        """Per-chunk context shared by all layers: the RoPE cos/sin for `positions` [B, T].

        seq_lens [B]: each row's length once the current call is done (only dynamic RoPE reads it)."""
        return self.rope.cos_sin(positions, dtype, seq_lens)

    def attention_inputs(self, lw: dict, h: torch.Tensor, ctx, layer: int) -> tuple[torch.Tensor, ...]:
        """Norm, projections, RoPE. h: [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
        a = self.arch
        x = rms_norm(h, lw["input_layernorm.weight"], a.rms_norm_eps)
        q, k, v = qkv_heads(x, lw, a.num_heads, a.num_kv_heads, a.head_dim)
        cos, sin = ctx
        return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin), v

    def attention_output(self, lw: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """o_proj + residual, then post-attention norm, MLP, residual. attn: [B, Hq, T, D] -> h [B, T, H]."""
        h = h + linear(merge_heads(attn), lw["self_attn.o_proj.weight"], lw.get("self_attn.o_proj.bias"))
        x = rms_norm(h, lw["post_attention_layernorm.weight"], self.arch.rms_norm_eps)
        return h + self.mlp(lw, x)

    def mlp(self, lw: dict, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward block of a layer: x [B, T, H] (normed) -> [B, T, H], before the residual."""
        return gated_mlp(x, lw, "mlp.", self.act)

    def head(self, w_norm: dict, w_head: dict, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head. h: [B, T, H] -> logits [B, T, V] float32."""
        x = rms_norm(h, w_norm["model.norm.weight"], self.arch.rms_norm_eps)
        return linear(x, w_head["lm_head.weight"]).float()
