"""Tiny random Hugging Face checkpoints of every supported family and variant, for parity tests.

Built with transformers' own config and model classes and written with `save_pretrained` (single file or
sharded), so the files are exactly what a published checkpoint looks like. Reused by the runtime's tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 128
DEEP_LAYERS = 5          # the llama5 checkpoint of the offloading tests: deep enough for every layout
_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.1)
_LLAMA = dict(_COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
_GEMMA = dict(_LLAMA, num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
              hidden_activation="gelu_pytorch_tanh")
_OPT = dict(_COMMON, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=64)

# variant -> (transformers config class name, config kwargs). Sequences in the tests run to ~32 tokens:
# longer than the sliding windows (4) and the dynamic-RoPE variant's max_position_embeddings (16).
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", _LLAMA),
    "llama_bias": ("LlamaConfig", dict(_LLAMA, attention_bias=True, mlp_bias=True)),
    "llama_tied": ("LlamaConfig", dict(_LLAMA, tie_word_embeddings=True)),
    "llama_head_dim": ("LlamaConfig", dict(_LLAMA, head_dim=24)),
    "llama_rope_linear": ("LlamaConfig", dict(_LLAMA, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 10000.0})),
    "llama_rope_dynamic": ("LlamaConfig", dict(_LLAMA, max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),
    "llama_rope_llama3": ("LlamaConfig", dict(_LLAMA, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 500000.0})),
    "mistral_window": ("MistralConfig", dict(_LLAMA, sliding_window=4, head_dim=32)),
    "qwen2_tied": ("Qwen2Config", dict(_LLAMA, tie_word_embeddings=True)),
    "qwen2_window": ("Qwen2Config", dict(_LLAMA, num_hidden_layers=3, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(_LLAMA, head_dim=24)),
    "qwen3_tied_window": ("Qwen3Config", dict(_LLAMA, num_hidden_layers=3, tie_word_embeddings=True,
                                              use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    # soft-caps small enough to bite on tiny random weights; every other layer slides (0 and 2)
    "gemma2": ("Gemma2Config", dict(_GEMMA, attn_logit_softcapping=1.0, final_logit_softcapping=3.0)),
    "gemma2_default_caps": ("Gemma2Config", dict(_GEMMA, num_hidden_layers=2)),
    "gemma3": ("Gemma3TextConfig", dict(_GEMMA, layer_types=["sliding_attention", "full_attention",
                                                             "sliding_attention"], rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "phi3": ("Phi3Config", dict(_LLAMA, partial_rotary_factor=0.5, head_dim=16)),
    # longrope: past 16 positions the long factors, and cos/sin scaled by sqrt(1 + ln(64/16) / ln(16))
    "phi3_longrope": ("Phi3Config", dict(_LLAMA, head_dim=16, partial_rotary_factor=0.75, sliding_window=8,
                                         original_max_position_embeddings=16,
                                         rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                          "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
                                                          "long_factor": [1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                                                          "original_max_position_embeddings": 16})),
    # mixtures of experts: top-2 of 4 (Mixtral, renormalised, window on every layer); Qwen2-MoE with a shared
    # expert, a dense layer (1) and windows on 0 and 2, weights not renormalised; Qwen3-MoE top-3 of 8
    "mixtral_window": ("MixtralConfig", dict(_LLAMA, num_local_experts=4, num_experts_per_tok=2, sliding_window=4)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(_LLAMA, num_hidden_layers=3, num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=32, shared_expert_intermediate_size=48,
                                         mlp_only_layers=[1], use_sliding_window=True, sliding_window=4,
                                         max_window_layers=3)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_LLAMA, head_dim=24, num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=32, norm_topk_prob=True)),
    "opt": ("OPTConfig", _OPT),
    "opt_post_ln": ("OPTConfig", dict(_OPT, do_layer_norm_before=False)),
    "opt_proj": ("OPTConfig", dict(_OPT, word_embed_proj_dim=32)),
}


# transformers runs soft-capped attention eagerly only (SDPA has no soft-capping)
EAGER_ONLY = {"Gemma2Config"}


def attn_implementation(config) -> str:
    return "eager" if type(config).__name__ in EAGER_ONLY else "sdpa"


def hf_config(variant: str, **overrides):
    """transformers' config of `variant`, with `overrides` (e.g. num_hidden_layers=5) applied."""
    import transformers
    class_name, kwargs = VARIANTS[variant]
    return getattr(transformers, class_name)(**{**kwargs, **overrides})


def build_checkpoint(path: Path, variant: str, *, sharded: bool = False, dtype: torch.dtype = torch.float32,
                     seed: int = 0, **overrides):
    """Write a random `variant` checkpoint (config `overrides` applied) to `path`; returns the
    transformers model (eval, float32)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config = hf_config(variant, **overrides)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation(config)).eval()
    path.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": "40KB"} if sharded else {}
    model.to(dtype).save_pretrained(str(path), safe_serialization=True, **kwargs)
    return model.float()


def load_hf(path: Path, dtype: torch.dtype = torch.float32):
    """The reference: transformers' own loading of the same folder."""
    from transformers import AutoConfig, AutoModelForCausalLM
    implementation = attn_implementation(AutoConfig.from_pretrained(str(path)))
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=implementation).eval()


def edit_config(path: Path, **changes) -> None:
    """Rewrite keys of config.json (None deletes a key)."""
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    config_path.write_text(json.dumps(config, indent=2))


def reset_dynamic_rope(hf_model) -> None:
    """transformers' dynamic RoPE keeps the longest length it has seen across calls; start each call fresh."""
    for module in hf_model.modules():
        if hasattr(module, "original_inv_freq") and hasattr(module, "original_max_seq_len"):
            module.inv_freq = module.original_inv_freq.clone()
            module.max_seq_len_cached = module.original_max_seq_len


def hf_logits(hf_model, prompt: list[int]) -> torch.Tensor:
    """transformers' float32 logits [T, V] for ONE row."""
    reset_dynamic_rope(hf_model)
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0].float()


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """transformers' greedy generate for ONE row (no padding): the new ids, ending at eos if produced."""
    reset_dynamic_rope(hf_model)
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                pad_token_id=0, **{"do_sample": False, **kwargs})
    return out[0, len(prompt):].tolist()
