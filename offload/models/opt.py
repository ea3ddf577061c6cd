"""OPT: learned positions (offset 2), LayerNorm before (most sizes) or after (opt-350m) each block,
ReLU MLP, biases everywhere, optional project_in/project_out when word_embed_proj_dim != hidden_size."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.models.layers import activation, layer_norm, linear, merge_heads, plain_mlp, split_heads
from placement.architecture import Architecture
from placement.families.opt import POSITION_OFFSET



class OPTModel:
    """The math of OPT as functions over weight dicts; knows nothing about placement."""

    attention_scale = 1.0    # q is scaled right after q_proj, as transformers does

    def __init__(self, arch: Architecture, device=None):
        self.arch = arch
        self.act = activation(arch.hidden_act)
        self.scaling = arch.head_dim ** -0.5

    def embed(self, w: dict, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [B, T] -> h: [B, T, H]
        x = F.embedding(input_ids, w["model.decoder.embed_tokens.weight"])       # [B, T, E]
        if "model.decoder.project_in.weight" in w:
            x = linear(x, w["model.decoder.project_in.weight"])                  # [B, T, H]
        return x + F.embedding(positions + POSITION_OFFSET, w["model.decoder.embed_positions.weight"])

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None):
        return None

    def _norm(self, lw: dict, name: str, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, lw.get(f"{name}.weight"), lw.get(f"{name}.bias"))

    def attention_inputs(self, lw: dict, h: torch.Tensor, ctx, layer: int) -> tuple[torch.Tensor, ...]:
        """(Pre-)LayerNorm and projections. h: [B, T, H] -> q, k, v [B, Hq, T, D] (q already scaled; Hkv = Hq)."""
        a = self.arch
        x = self._norm(lw, "self_attn_layer_norm", h) if a.options["do_layer_norm_before"] else h
        q = linear(x, lw["self_attn.q_proj.weight"], lw.get("self_attn.q_proj.bias")) * self.scaling
        k = linear(x, lw["self_attn.k_proj.weight"], lw.get("self_attn.k_proj.bias"))
        v = linear(x, lw["self_attn.v_proj.weight"], lw.get("self_attn.v_proj.bias"))
        return tuple(split_heads(t, a.num_heads, a.head_dim) for t in (q, k, v))

    def attention_output(self, lw: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """out_proj + residual, MLP + residual, LayerNorms before or after. -> h [B, T, H]."""
        before = self.arch.options["do_layer_norm_before"]
        h = h + linear(merge_heads(attn), lw["self_attn.out_proj.weight"], lw.get("self_attn.out_proj.bias"))
        if not before:
            h = self._norm(lw, "self_attn_layer_norm", h)
        x = self._norm(lw, "final_layer_norm", h) if before else h
        h = h + plain_mlp(x, lw, self.act)
        return h if before else self._norm(lw, "final_layer_norm", h)

    def head(self, w_norm: dict, w_head: dict, h: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm (pre-LN models), project_out, LM head. -> logits [B, T, V] float32."""
        if self.arch.options["has_final_layer_norm"]:
            h = layer_norm(h, w_norm.get("model.decoder.final_layer_norm.weight"),
                           w_norm.get("model.decoder.final_layer_norm.bias"))
        if "model.decoder.project_out.weight" in w_norm:
            h = linear(h, w_norm["model.decoder.project_out.weight"])
        return linear(h, w_head["lm_head.weight"]).float()
