"""Phi-3 / Phi-3.5 (mini, medium) and Phi-4: the llama-like decoder with fused `qkv_proj` and
`gate_up_proj`, a `partial_rotary_factor` (RoPE on the first part of each head), `longrope` scaling (short
factors up to `original_max_position_embeddings`, long factors past it, cos/sin scaled by the attention
factor), and a sliding window on every layer when the config sets `sliding_window`.

Options: none beyond the generic fields (rope_scaling carries longrope's factors and
original_max_position_embeddings; partial_rotary_factor is a generic RoPE field; kv_rebuild_len says where
the cache is recomputed, as transformers' Phi-3 generation does).
"""
from __future__ import annotations

from placement.config_fields import common_fields
from placement.families.base import PreNormDecoder, Shape
from placement.families.llama import decoder_fields


class Phi3Family(PreNormDecoder):
    model_types = ("phi3",)
    math = "offload.models.phi3:Phi3Model"

    def parse(self, config: dict) -> dict:
        common = common_fields(config)
        fields = decoder_fields(config, common)
        window = config.get("sliding_window")
        scaling = fields["rope_scaling"]
        # transformers' Phi3ForCausalLM recomputes the cache when a row first grows past the original
        # context (its keys were rotated with the short factors)
        rebuild = scaling["original_max_position_embeddings"] if scaling and scaling["rope_type"] == "longrope" \
            else None
        return dict(**common, **fields, sliding_window=int(window) if window else None,
                    sliding_window_layers=tuple(range(common["num_layers"])) if window else (),
                    kv_rebuild_len=rebuild, options={})

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        h, d = arch.hidden_size, arch.head_dim
        return {f"{p}self_attn.qkv_proj.weight": ((arch.num_heads + 2 * arch.num_kv_heads) * d, h),
                f"{p}self_attn.o_proj.weight": (h, arch.num_heads * d)}

    def mlp_tensors(self, arch, p: str) -> dict[str, Shape]:
        h, i = arch.hidden_size, arch.intermediate_size
        return {f"{p}mlp.gate_up_proj.weight": (2 * i, h), f"{p}mlp.down_proj.weight": (h, i)}


PHI3 = Phi3Family()
