"""Llama, Mistral and Qwen2: one pre-norm decoder (RMSNorm, RoPE, GQA attention, SwiGLU) with options.

Options (`arch.options`): `attention_bias` (q/k/v biases: Llama's `attention_bias`, always for Qwen2),
`o_proj_bias` (Llama's attention_bias covers o_proj too), `mlp_bias` (Llama). Sliding windows: Mistral's
`sliding_window` on every layer; Qwen2's from `max_window_layers` on when `use_sliding_window`.
"""
from __future__ import annotations

from placement.config_fields import ConfigError, common_fields, require, rope_fields
from placement.families.base import PreNormDecoder, Shape


def decoder_fields(config: dict, common: dict) -> dict:
    """The fields of a llama-like decoder beyond `common_fields`: sizes, heads, norm, RoPE (partial
    rotary, longrope checked), activation."""
    num_heads = common["num_heads"]
    theta, scaling = rope_fields(config)
    head_dim = int(config.get("head_dim") or common["hidden_size"] // num_heads)
    params = config.get("rope_parameters") or {}
    partial = float(config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)
    if scaling is not None and scaling["rope_type"] == "longrope":
        scaling = longrope_fields(config, scaling, int(head_dim * partial) // 2)
    return dict(intermediate_size=require(config, "intermediate_size"),
                num_kv_heads=config.get("num_key_value_heads") or num_heads, head_dim=head_dim,
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
                partial_rotary_factor=partial,
                hidden_act=config.get("hidden_act") or config.get("hidden_activation") or "silu")


def longrope_fields(config: dict, scaling: dict, num_factors: int) -> dict:
    """longrope's scaling with its original context (config.json's top-level value first, as transformers
    reads it; 4096 by default) and both factor lists checked: `num_factors` (rotary dims / 2) numbers each."""
    for key in ("short_factor", "long_factor"):
        factors = scaling.get(key)
        if not isinstance(factors, list) or len(factors) != num_factors or \
                not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f > 0 for f in factors):
            raise ConfigError(f"longrope needs rope_scaling {key!r}: {num_factors} positive numbers (rotary "
                              f"dimensions / 2), got {factors!r}"[:200])
    original = config.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings") \
        or 4096
    return {**scaling, "original_max_position_embeddings": int(original)}


class LlamaFamily(PreNormDecoder):
    model_types = ("llama", "mistral", "qwen2")
    math = "offload.models.decoder:DecoderModel"

    def parse(self, config: dict) -> dict:
        common = common_fields(config)
        model_type, num_layers = common["model_type"], common["num_layers"]
        window, window_layers = None, ()
        if model_type == "mistral" and config.get("sliding_window"):
            window, window_layers = int(config["sliding_window"]), tuple(range(num_layers))
        if model_type == "qwen2" and config.get("use_sliding_window") and config.get("sliding_window"):
            first = int(config.get("max_window_layers", num_layers))
            window, window_layers = int(config["sliding_window"]), tuple(range(first, num_layers))
        bias = bool(config.get("attention_bias", False)) if model_type == "llama" else model_type == "qwen2"
        options = dict(attention_bias=bias, o_proj_bias=model_type == "llama" and bias,
                       mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)))
        return dict(**common, **decoder_fields(config, common), sliding_window=window,
                    sliding_window_layers=window_layers, options=options)

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        t = super().attention_tensors(arch, p)
        if arch.options["attention_bias"]:
            t.update(self.attention_bias_tensors(arch, p, o_proj=arch.options["o_proj_bias"]))
        return t

    def mlp_tensors(self, arch, p: str) -> dict[str, Shape]:
        t = super().mlp_tensors(arch, p)
        if arch.options["mlp_bias"]:
            t.update({name.replace(".weight", ".bias"): (shape[0],) for name, shape in list(t.items())})
        return t


LLAMA = LlamaFamily()
