"""Qwen3 (0.6B-32B): the llama-like decoder with per-head RMSNorm on q and k (before RoPE), no qkv bias by
default, an explicit `head_dim`, tied embeddings in the small sizes; optional sliding windows from
`max_window_layers` on (`use_sliding_window`) or from `layer_types`.

Options: attention_bias.
"""
from __future__ import annotations

from placement.config_fields import common_fields, window_layers
from placement.families.base import PreNormDecoder, Shape
from placement.families.llama import decoder_fields


class Qwen3Family(PreNormDecoder):
    model_types = ("qwen3",)
    math = "offload.models.qwen3:Qwen3Model"

    def parse(self, config: dict) -> dict:
        common = common_fields(config)
        num_layers = common["num_layers"]
        window = int(config["sliding_window"]) if config.get("use_sliding_window") and config.get("sliding_window") \
            else None
        layers = ()
        if window is not None:
            layers = window_layers(config, num_layers) if config.get("layer_types") is not None else \
                tuple(range(int(config.get("max_window_layers", num_layers)), num_layers))
        return dict(**common, **decoder_fields(config, common), sliding_window=window if layers else None,
                    sliding_window_layers=layers, options=dict(attention_bias=bool(config.get("attention_bias", False))))

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        t = super().attention_tensors(arch, p)
        if arch.options["attention_bias"]:
            t.update(self.attention_bias_tensors(arch, p, o_proj=True))
        t[f"{p}self_attn.q_norm.weight"] = (arch.head_dim,)
        t[f"{p}self_attn.k_norm.weight"] = (arch.head_dim,)
        return t


QWEN3 = Qwen3Family()
