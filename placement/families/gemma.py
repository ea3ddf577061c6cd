"""Gemma 2 and Gemma 3: pre- and post-norms around attention and MLP, RMSNorm with (1 + weight), embeddings
scaled by sqrt(hidden), GeGLU (tanh GELU), attention scaled by `query_pre_attn_scalar`, sliding windows
on the layers `layer_types` marks "sliding_attention".

Gemma 2: logit soft-capping of attention scores (`attn_logit_softcapping`, a generic Architecture field the
attention backends apply) and of the final logits; by default every other layer slides (0, 2, ...).
Gemma 3 (`gemma3_text`, and the text part of the multimodal `gemma3` checkpoints, under `text_config`
and the `language_model.` prefix): q/k RMSNorm, every sixth layer global; sliding layers use RoPE base
`rope_local_base_freq` (or `rope_parameters["sliding_attention"]`), global layers `rope_theta` with the
config's scaling. Missing fields take Gemma3TextConfig's defaults (published configs are sparse).

Options: query_pre_attn_scalar, final_logit_softcap, attention_bias, qk_norm, local_rope_theta (None: the
sliding layers use the global RoPE, as Gemma 2).
"""
from __future__ import annotations

from placement.config_fields import ConfigError, common_fields, rope_fields, window_layers
from placement.families.base import PreNormDecoder, Shape
from placement.families.llama import decoder_fields

GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
                            rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096,
                            tie_word_embeddings=True, bos_token_id=2, eos_token_id=1)


class GemmaFamily(PreNormDecoder):
    """Gemma 2 when `is_gemma3` is false."""

    def __init__(self, *, model_types: tuple[str, ...], math: str, is_gemma3: bool, prefix: str = "model."):
        self.model_types, self.math, self.is_gemma3, self.prefix = model_types, math, is_gemma3, prefix

    def text_config(self, config: dict) -> dict:
        return config

    def parse(self, config: dict) -> dict:
        config = self.text_config(config)
        if self.is_gemma3:
            config = {**GEMMA3_TEXT_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
        common = common_fields(config)
        num_layers = common["num_layers"]
        if config.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention is set: an encoder (EmbeddingGemma), not a decoder "
                              "this library generates with")
        if config.get("layer_types") is not None:
            sliding = window_layers(config, num_layers)
        else:                                   # the transformers defaults: every 2nd / every 6th is global
            pattern = config.get("sliding_window_pattern", 6) if self.is_gemma3 else 2
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                raise ConfigError(f"config field 'sliding_window_pattern' must be a positive integer, got {pattern!r}")
            sliding = tuple(i for i in range(num_layers) if (i + 1) % pattern)
        window = config.get("sliding_window") or 4096          # transformers' default
        fields = decoder_fields(config, common)
        local_theta = None
        if self.is_gemma3:
            fields["rope_theta"], fields["rope_scaling"] = rope_fields(
                {**config, "rope_theta": config.get("rope_theta", _theta(config, "full_attention", 1_000_000.0))},
                "full_attention")
            local_theta = float(config.get("rope_local_base_freq") or _theta(config, "sliding_attention", 10_000.0))
        softcap = config.get("attn_logit_softcapping", None if self.is_gemma3 else 50.0)
        final_softcap = config.get("final_logit_softcapping", None if self.is_gemma3 else 30.0)
        options = dict(query_pre_attn_scalar=float(config.get("query_pre_attn_scalar") or 256),
                       final_logit_softcap=None if final_softcap is None else float(final_softcap),
                       attention_bias=bool(config.get("attention_bias", False)), qk_norm=self.is_gemma3,
                       local_rope_theta=local_theta)
        fields["hidden_act"] = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        fields["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
        return dict(**common, **fields, sliding_window=int(window) if sliding else None,
                    sliding_window_layers=sliding,
                    attn_logit_softcap=None if softcap is None else float(softcap), options=options)

    def norm_names(self, arch) -> tuple[str, ...]:
        return ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                "post_feedforward_layernorm")

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        t = super().attention_tensors(arch, p)
        if arch.options["attention_bias"]:
            t.update(self.attention_bias_tensors(arch, p, o_proj=True))
        if arch.options["qk_norm"]:
            t[f"{p}self_attn.q_norm.weight"] = (arch.head_dim,)
            t[f"{p}self_attn.k_norm.weight"] = (arch.head_dim,)
        return t


def _theta(config: dict, layer_type: str, default: float) -> float:
    params = config.get("rope_parameters") or {}
    entry = params.get(layer_type) if isinstance(params.get(layer_type), dict) else None
    return float((entry or {}).get("rope_theta", default))


class Gemma3Multimodal(GemmaFamily):
    """A `gemma3` checkpoint (vision + text): its text model, whose tensors sit under `language_model.`;
    the vision tower's tensors are not read."""

    def text_config(self, config: dict) -> dict:
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("a gemma3 config needs a 'text_config' object (the language model's config)")
        return {**text, "model_type": "gemma3",
                "torch_dtype": text.get("torch_dtype") or config.get("torch_dtype") or config.get("dtype"),
                "eos_token_id": text.get("eos_token_id", config.get("eos_token_id")),
                "tie_word_embeddings": config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))}


GEMMA2 = GemmaFamily(model_types=("gemma2",), math="offload.models.gemma:GemmaModel", is_gemma3=False)
GEMMA3 = GemmaFamily(model_types=("gemma3_text",), math="offload.models.gemma:GemmaModel", is_gemma3=True)
GEMMA3_MULTIMODAL = Gemma3Multimodal(model_types=("gemma3",), math="offload.models.gemma:GemmaModel",
                                     is_gemma3=True, prefix="language_model.model.")
