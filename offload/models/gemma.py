"""Gemma 2 and Gemma 3: norms before and after attention and MLP, (1 + weight) RMSNorm, embeddings scaled
by sqrt(hidden), GeGLU, `query_pre_attn_scalar`, final logit soft-capping; Gemma 3 adds q/k norms and a
local RoPE (its own base) on the sliding-window layers. Attention soft-capping and the windows are the
attention backends' (arch.attn_logit_softcap, arch.window_of)."""
from __future__ import annotations

import torch

from offload.models.layers import (activation, embedding, gated_mlp, gemma_rms_norm, linear, merge_heads, qkv_heads,
                                   soft_cap)
from offload.models.rope import Rope
from placement.architecture import Architecture


class GemmaModel:
    """The math of Gemma 2 / Gemma 3 as functions over weight dicts; knows nothing about placement."""

    def __init__(self, arch: Architecture, device=None):
        self.arch, o = arch, arch.options
        self.attention_scale = o["query_pre_attn_scalar"] ** -0.5
        self.act = activation(arch.hidden_act)
        self.rope = Rope.of(arch, device)                          # global layers (every layer of Gemma 2)
        self.local_rope = None if o["local_rope_theta"] is None else \
            Rope.of(arch, device, theta=o["local_rope_theta"], scaling=None)
        # sqrt(hidden) as transformers holds it: a float32 scalar, cast to the table's dtype before use
        self.embed_scale = torch.tensor(arch.hidden_size ** 0.5, dtype=torch.float32)

    def embed(self, w: dict, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids: [B, T] -> h: [B, T, H], scaled in the table's dtype (a packed table's: the model's)
        rows = embedding(input_ids, w["model.embed_tokens.weight"])
        return rows * self.embed_scale.to(rows.dtype)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None):
        """(global cos/sin, local cos/sin or None) for `positions` [B, T]."""
        local = None if self.local_rope is None else self.local_rope.cos_sin(positions, dtype, seq_lens)
        return self.rope.cos_sin(positions, dtype, seq_lens), local

    def attention_inputs(self, lw: dict, h: torch.Tensor, ctx, layer: int) -> tuple[torch.Tensor, ...]:
        """Norm, projections, (Gemma 3) q/k norms, RoPE. h: [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
        a, eps = self.arch, self.arch.rms_norm_eps
        x = gemma_rms_norm(h, lw["input_layernorm.weight"], eps)
        q, k, v = qkv_heads(x, lw, a.num_heads, a.num_kv_heads, a.head_dim)
        if a.options["qk_norm"]:
            q = gemma_rms_norm(q, lw["self_attn.q_norm.weight"], eps)
            k = gemma_rms_norm(k, lw["self_attn.k_norm.weight"], eps)
        global_rope, local_rope = ctx
        cos, sin = local_rope if local_rope is not None and a.window_of(layer) is not None else global_rope
        return Rope.apply(q, cos, sin), Rope.apply(k, cos, sin), v

    def attention_output(self, lw: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """o_proj, post-attention norm, residual; pre-MLP norm, GeGLU, post-MLP norm, residual.
        attn: [B, Hq, T, D] -> h [B, T, H]."""
        eps = self.arch.rms_norm_eps
        out = linear(merge_heads(attn), lw["self_attn.o_proj.weight"], lw.get("self_attn.o_proj.bias"))
        h = h + gemma_rms_norm(out, lw["post_attention_layernorm.weight"], eps)
        x = gemma_rms_norm(h, lw["pre_feedforward_layernorm.weight"], eps)
        return h + gemma_rms_norm(gated_mlp(x, lw, "mlp.", self.act), lw["post_feedforward_layernorm.weight"], eps)

    def head(self, w_norm: dict, w_head: dict, h: torch.Tensor) -> torch.Tensor:
        """Final norm, LM head, final soft-capping (in the model dtype, as transformers). h: [B, T, H] ->
        logits [B, T, V] float32."""
        x = gemma_rms_norm(h, w_norm["model.norm.weight"], self.arch.rms_norm_eps)
        return soft_cap(linear(x, w_head["lm_head.weight"]), self.arch.options["final_logit_softcap"]).float()
