"""Family descriptions against transformers: every tensor name and shape of the new families' checkpoints,
both config spellings (rope_theta/rope_scaling and rope_parameters), and the multimodal Gemma 3 prefix."""
from __future__ import annotations

import pytest

from placement.architecture import Architecture, ConfigError
from placement.families import FAMILIES, family_of

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TINY = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "qwen3": ("Qwen3Config", dict(TINY, head_dim=24)),
    "qwen3_bias_tied": ("Qwen3Config", dict(TINY, attention_bias=True, tie_word_embeddings=True)),
    "gemma2": ("Gemma2Config", dict(TINY, head_dim=16, query_pre_attn_scalar=24, sliding_window=4)),
    "gemma2_bias": ("Gemma2Config", dict(TINY, head_dim=16, attention_bias=True, tie_word_embeddings=False)),
    "gemma3_text": ("Gemma3TextConfig", dict(TINY, head_dim=16, sliding_window=4)),
    "phi3": ("Phi3Config", dict(TINY, partial_rotary_factor=0.5)),
    "phi3_window": ("Phi3Config", dict(TINY, sliding_window=8, num_key_value_heads=4)),
}


def _hf_tensors(config) -> dict[str, tuple]:
    """transformers' checkpoint tensor names and shapes for `config` (meta device, no memory)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.get_text_config().tie_word_embeddings:
        shapes.pop("lm_head.weight", None)                        # saved once, under the embedding
    return shapes


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_table_is_transformers_state_dict(name):
    class_name, kwargs = CONFIGS[name]
    config = getattr(transformers, class_name)(**kwargs)
    arch = Architecture.from_config(config.to_dict())
    assert arch.all_tensors() == _hf_tensors(config)
    assert arch.num_params == sum(torch.Size(s).numel() for s in _hf_tensors(config).values())


def test_families_are_found_through_one_registry():
    assert {"llama", "mistral", "qwen2", "opt", "qwen3", "gemma2", "gemma3_text", "gemma3", "phi3"} <= set(FAMILIES)
    for model_type, family in FAMILIES.items():
        module, _, name = family.math.partition(":")
        assert module.startswith("offload.models.") and name, (model_type, family.math)
    with pytest.raises(ConfigError, match="unsupported model_type 'mamba'.*gemma2"):
        family_of("mamba")


def test_gemma_layer_types_windows_softcaps_and_local_rope():
    gemma2 = Architecture.from_config(transformers.Gemma2Config(**CONFIGS["gemma2"][1]).to_dict())
    assert gemma2.sliding_window_layers == (0, 2) and gemma2.window_of(1) is None and gemma2.window_of(2) == 4
    assert gemma2.attn_logit_softcap == 50.0 and gemma2.options["final_logit_softcap"] == 30.0
    assert gemma2.options["query_pre_attn_scalar"] == 24 and gemma2.tie_word_embeddings
    gemma3 = Architecture.from_config(transformers.Gemma3TextConfig(**dict(TINY, num_hidden_layers=12,
                                                                          head_dim=16)).to_dict())
    assert gemma3.sliding_window_layers == (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)          # every sixth is global
    assert gemma3.attn_logit_softcap is None and gemma3.options["final_logit_softcap"] is None
    assert gemma3.rope_theta == 1_000_000.0 and gemma3.options["local_rope_theta"] == 10_000.0


GEMMA3_OLD = {"model_type": "gemma3_text", **TINY, "head_dim": 16, "rope_theta": 500_000.0,
              "rope_local_base_freq": 20_000.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
              "sliding_window": 4, "sliding_window_pattern": 3}
PHI3_FACTORS = dict(short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[2.0, 3.0, 4.0, 5.0])
PHI3_OLD = {"model_type": "phi3", **TINY, "max_position_embeddings": 128, "original_max_position_embeddings": 32,
            "partial_rotary_factor": 0.5, "rope_theta": 10_000.0,
            "rope_scaling": {"type": "longrope", **PHI3_FACTORS}}
QWEN3_OLD = {"model_type": "qwen3", **TINY, "head_dim": 16, "rope_theta": 1_000_000.0,
             "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}


@pytest.mark.parametrize("old, class_name", [(GEMMA3_OLD, "Gemma3TextConfig"), (PHI3_OLD, "Phi3Config")])
def test_both_config_spellings_read_alike(old, class_name):
    """A published config (rope_theta / rope_scaling / rope_local_base_freq) and what transformers 5 writes
    for it (rope_parameters) describe the same model."""
    new = getattr(transformers, class_name)(**{k: v for k, v in old.items() if k != "model_type"}).to_dict()
    assert "rope_parameters" in new
    a, b = Architecture.from_config(old), Architecture.from_config(new)
    assert (a.rope_theta, a.rope_scaling, a.partial_rotary_factor, a.options, a.sliding_window_layers) == \
        (b.rope_theta, b.rope_scaling, b.partial_rotary_factor, b.options, b.sliding_window_layers)
    assert a.rope_scaling is not None


def test_old_spellings_values():
    gemma3 = Architecture.from_config(GEMMA3_OLD)
    assert gemma3.rope_theta == 500_000.0 and gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert gemma3.options["local_rope_theta"] == 20_000.0 and gemma3.sliding_window_layers == (0, 1)
    phi3 = Architecture.from_config(PHI3_OLD)
    assert phi3.rope_scaling == {"rope_type": "longrope", **PHI3_FACTORS, "original_max_position_embeddings": 32}
    assert phi3.rotary_dim == 8 and phi3.kv_rebuild_len == 32
    with pytest.raises(ConfigError, match="unsupported rope scaling type 'yarn'"):
        Architecture.from_config(QWEN3_OLD)


def test_multimodal_gemma3_reads_its_language_model_under_its_prefix():
    text = dict(TINY, head_dim=16, sliding_window=4)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    arch = Architecture.from_config(config.to_dict())
    assert arch.checkpoint_prefix == "language_model."
    assert arch.layer_prefix(1) == "language_model.model.layers.1."
    text_only = Architecture.from_config(transformers.Gemma3TextConfig(**text).to_dict())
    assert arch.num_params == text_only.num_params
    assert {f"language_model.{k}": v for k, v in text_only.all_tensors().items()} == arch.all_tensors()
    with pytest.raises(ConfigError, match="text_config"):
        Architecture.from_config({"model_type": "gemma3"})


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.2], "long_factor": [2.0, 3.0, 4.0, 5.0]}},
     "'short_factor': 4 positive numbers"),
    ({"rope_scaling": {"type": "longrope", "long_factor": [2.0, 3.0, 4.0, 5.0]}}, "'short_factor'"),
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": ["x"] * 4}}, "'long_factor'"),
])
def test_bad_longrope_factors_are_one_line_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        Architecture.from_config({**PHI3_OLD, **change})


def test_bad_gemma_configs_are_one_line_errors():
    base = {"model_type": "gemma3_text", **TINY, "head_dim": 16}
    with pytest.raises(ConfigError, match="sliding_window_pattern' must be a positive integer, got 0"):
        Architecture.from_config({**base, "sliding_window_pattern": 0})
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        Architecture.from_config({**base, "use_bidirectional_attention": True})
    gemma2 = Architecture.from_config({"model_type": "gemma2", **TINY, "head_dim": 16, "query_pre_attn_scalar": None})
    assert gemma2.sliding_window == 4096 and gemma2.options["query_pre_attn_scalar"] == 256   # transformers' defaults
