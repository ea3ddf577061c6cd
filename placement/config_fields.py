"""Reading config.json fields, shared by every family description: dtypes, required integers, RoPE.

Both spellings of RoPE in the wild are read: `rope_theta` + `rope_scaling` (most published checkpoints)
and `rope_parameters` (what transformers 5 writes; per layer type for Gemma 3). Pure Python: no torch.
"""
from __future__ import annotations

from typing import Any

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16", "torch.float32": "float32", "torch.bfloat16": "bfloat16",
                  "torch.float16": "float16"}
ROPE_SCALING_TYPES = ("linear", "dynamic", "llama3", "longrope")


class ConfigError(ValueError):
    """A config.json this library cannot run; the message names the field and what would work."""


def normalize_dtype(name: Any) -> str:
    """'bf16', 'torch.bfloat16', 'bfloat16' -> 'bfloat16'; raises ConfigError for anything else."""
    key = str(name).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unsupported dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}")
    return key


def require(config: dict, key: str, kind=int) -> Any:
    """config[key], which must be present (and a positive integer when kind is int)."""
    if key not in config or config[key] is None:
        raise ConfigError(f"config is missing {key!r} (model_type {config.get('model_type')!r})")
    value = config[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def common_fields(config: dict) -> dict:
    """The Architecture fields every family reads the same way (from their usual config keys)."""
    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return dict(model_type=config["model_type"], vocab_size=require(config, "vocab_size"),
                hidden_size=require(config, "hidden_size"), num_layers=require(config, "num_hidden_layers"),
                num_heads=require(config, "num_attention_heads"),
                max_position_embeddings=require(config, "max_position_embeddings"),
                dtype=normalize_dtype(config.get("torch_dtype") or config.get("dtype") or "float32"),
                eos_token_ids=eos_ids, bos_token_id=config.get("bos_token_id"), config=dict(config))


def rope_scaling(params: dict | None, *, theta_default: float = 10000.0) -> tuple[float, dict | None]:
    """One RoPE description (a `rope_scaling` or `rope_parameters` dict, or None) -> (theta, scaling dict
    with a 'rope_type' key, or None for plain RoPE). ConfigError for a type this library cannot run."""
    if not params:
        return float(theta_default), None
    scaling = dict(params)
    theta = float(scaling.pop("rope_theta", theta_default))
    scaling.pop("partial_rotary_factor", None)          # a field of its own (Architecture.partial_rotary_factor)
    rope_type = scaling.pop("type", None)
    rope_type = scaling.get("rope_type", rope_type) or "default"
    scaling["rope_type"] = rope_type
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_SCALING_TYPES:
        raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: none, "
                          f"{', '.join(ROPE_SCALING_TYPES)}")
    return theta, scaling


def rope_fields(config: dict, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(rope_theta, scaling) of a config in either spelling; `layer_type` picks the entry of a per-layer-type
    `rope_parameters` ({"full_attention": {...}, "sliding_attention": {...}})."""
    params = config.get("rope_parameters") or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    theta_default = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or None
    if scaling is None:
        return rope_scaling(params, theta_default=theta_default)
    theta, scaling = rope_scaling(scaling, theta_default=theta_default)
    return float(config.get("rope_theta") or params.get("rope_theta") or theta), scaling


def window_layers(config: dict, num_layers: int, *, default_all: bool = False) -> tuple[int, ...]:
    """Indices of the sliding-window layers from `layer_types` ("sliding_attention"), or all layers when
    `default_all` and the config has no `layer_types`."""
    layer_types = config.get("layer_types")
    if layer_types is None:
        return tuple(range(num_layers)) if default_all else ()
    if not isinstance(layer_types, list) or len(layer_types) != num_layers:
        raise ConfigError(f"config field 'layer_types' must list one type per layer ({num_layers}), "
                          f"got {layer_types!r}")
    return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
