"""Phi-3 / Phi-3.5 (mini, medium) and Phi-4: the llama-like decoder with fused `qkv_proj` and
`gate_up_proj`, a `partial_rotary_factor` (RoPE on the first part of each head), `longrope` scaling (short
factors up to `original_max_position_embeddings`, long factors past it, cos/sin scaled by the attention
factor), and a sliding window on every layer when the config sets `sliding_window`.

Options: none beyond the generic fields (rope_scaling carries longrope's factors and
original_max_position_embeddings; partial_rotary_factor is a generic RoPE field).
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
        scaling = fields["rope_scaling"]
        if scaling is not None and scaling["rope_type"] == "longrope":
            original = scaling.get("original_max_position_embeddings") or \
                config.get("original_max_position_embeddings") or common["max_position_embeddings"]
            fields["rope_scaling"] = {**scaling, "original_max_position_embeddings": int(original)}
        params = config.get("rope_parameters") or {}
        factor = float(config.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)))
        window = config.get("sliding_window")
        return dict(**common, **fields, partial_rotary_factor=factor,
                    sliding_window=int(window) if window else None,
                    sliding_window_layers=tuple(range(common["num_layers"])) if window else (), options={})

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        h, d = arch.hidden_size, arch.head_dim
        return {f"{p}self_attn.qkv_proj.weight": ((arch.num_heads + 2 * arch.num_kv_heads) * d, h),
                f"{p}self_attn.o_proj.weight": (h, arch.num_heads * d)}

    def mlp_tensors(self, arch, p: str) -> dict[str, Shape]:
        h, i = arch.hidden_size, arch.intermediate_size
        return {f"{p}mlp.gate_up_proj.weight": (2 * i, h), f"{p}mlp.down_proj.weight": (h, i)}


PHI3 = Phi3Family()
