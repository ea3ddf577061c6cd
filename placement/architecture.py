"""One normalised description of a supported Hugging Face decoder-only architecture.

`Architecture.from_config(config_dict)` reads a `config.json` of model_type llama, mistral, qwen2 or opt
(old-style `rope_scaling`/`rope_theta` and transformers-5 `rope_parameters` alike) and names every tensor
of the checkpoint with its exact shape. The planner counts bytes from it; the runtime loads and checks
tensors by it. Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "opt")
SUPPORTED_ROPE_TYPES = ("linear", "dynamic", "llama3")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16", "torch.float32": "float32", "torch.bfloat16": "bfloat16",
                  "torch.float16": "float16"}

Shape = tuple[int, ...]


class ConfigError(ValueError):
    """A config.json this library cannot run; the message names the field and what would work."""


def normalize_dtype(name: Any) -> str:
    """'bf16', 'torch.bfloat16', 'bfloat16' -> 'bfloat16'; raises ConfigError for anything else."""
    key = str(name).strip().lower()
    key = _DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_BYTES:
        raise ConfigError(f"unsupported dtype {name!r}; use one of {', '.join(DTYPE_BYTES)}")
    return key


def _require(config: dict, key: str, kind=int) -> Any:
    if key not in config or config[key] is None:
        raise ConfigError(f"config is missing {key!r} (model_type {config.get('model_type')!r})")
    value = config[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ConfigError(f"config field {key!r} must be a positive integer, got {value!r}")
    return value


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict with a 'rope_type' key, or None for plain RoPE)."""
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.pop("type", None)
        rope_type = scaling.get("rope_type", rope_type) or "default"
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
        elif rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: none, "
                              f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return float(theta), scaling


@dataclass(frozen=True)
class Architecture:
    """Shapes and options of one model; built by `from_config`, or by keyword in tests."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    dtype: str = "float32"              # the checkpoint's dtype ("torch_dtype"/"dtype" in the config)
    # llama / mistral / qwen2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "linear"|"dynamic"|"llama3", ...} or None
    attention_bias: bool = False        # q/k/v (and for llama o_proj) biases
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None   # tokens, for the layers in `sliding_window_layers`
    sliding_window_layers: tuple[int, ...] = ()
    hidden_act: str = "silu"
    # opt
    word_embed_proj_dim: int = 0        # 0 when equal to hidden_size (no project_in/project_out)
    do_layer_norm_before: bool = True
    has_final_layer_norm: bool = True
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        """Normalise a Hugging Face config.json dict. Raises ConfigError with a one-line message."""
        if not isinstance(config, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r}; supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        dtype = normalize_dtype(config.get("torch_dtype") or config.get("dtype") or "float32")
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        common = dict(model_type=model_type, vocab_size=_require(config, "vocab_size"),
                      hidden_size=_require(config, "hidden_size"),
                      num_layers=_require(config, "num_hidden_layers"),
                      num_heads=_require(config, "num_attention_heads"),
                      max_position_embeddings=_require(config, "max_position_embeddings"),
                      dtype=dtype, eos_token_ids=eos_ids, bos_token_id=config.get("bos_token_id"),
                      config=dict(config))
        if model_type == "opt":
            hidden = common["hidden_size"]
            if hidden % common["num_heads"]:
                raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads")
            proj = config.get("word_embed_proj_dim") or hidden
            before = bool(config.get("do_layer_norm_before", True))
            return cls(**common, intermediate_size=_require(config, "ffn_dim"),
                       num_kv_heads=common["num_heads"], head_dim=hidden // common["num_heads"],
                       tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
                       hidden_act=config.get("activation_function", "relu"),
                       word_embed_proj_dim=0 if proj == hidden else int(proj),
                       do_layer_norm_before=before,
                       has_final_layer_norm=before and not config.get("_remove_final_layer_norm", False),
                       enable_bias=bool(config.get("enable_bias", True)),
                       layer_norm_elementwise_affine=bool(config.get("layer_norm_elementwise_affine", True)))
        num_heads = common["num_heads"]
        head_dim = config.get("head_dim") or common["hidden_size"] // num_heads
        theta, scaling = _rope(config)
        num_layers = common["num_layers"]
        window, window_layers = None, ()
        if model_type == "mistral" and config.get("sliding_window"):
            window, window_layers = int(config["sliding_window"]), tuple(range(num_layers))
        if model_type == "qwen2" and config.get("use_sliding_window") and config.get("sliding_window"):
            first = int(config.get("max_window_layers", num_layers))
            window, window_layers = int(config["sliding_window"]), tuple(range(first, num_layers))
        bias = bool(config.get("attention_bias", False)) if model_type == "llama" else model_type == "qwen2"
        return cls(**common, intermediate_size=_require(config, "intermediate_size"),
                   num_kv_heads=config.get("num_key_value_heads") or num_heads, head_dim=int(head_dim),
                   tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                   rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
                   rope_scaling=scaling, attention_bias=bias,
                   o_proj_bias=model_type == "llama" and bias,
                   mlp_bias=model_type == "llama" and bool(config.get("mlp_bias", False)),
                   sliding_window=window, sliding_window_layers=window_layers,
                   hidden_act=config.get("hidden_act", "silu"))

    # ---- derived ------------------------------------------------------------------------------
    @property
    def is_opt(self) -> bool:
        return self.model_type == "opt"

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding table (OPT's word_embed_proj_dim may differ from hidden)."""
        return self.word_embed_proj_dim or self.hidden_size

    def window_of(self, layer: int) -> int | None:
        """Sliding-window length of decoder layer `layer`, or None for full attention."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    # ---- tensors ------------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"model.decoder.layers.{layer}." if self.is_opt else f"model.layers.{layer}."

    def layer_tensors(self, layer: int) -> dict[str, Shape]:
        """Checkpoint name -> shape for every tensor of decoder layer `layer`."""
        p, h, d = self.layer_prefix(layer), self.hidden_size, self.head_dim
        q_out, kv_out = self.num_heads * d, self.num_kv_heads * d
        t: dict[str, Shape] = {}
        if self.is_opt:
            for name, out in (("q_proj", h), ("k_proj", h), ("v_proj", h), ("out_proj", h)):
                t[f"{p}self_attn.{name}.weight"] = (out, h)
                if self.enable_bias:
                    t[f"{p}self_attn.{name}.bias"] = (out,)
            t[f"{p}fc1.weight"] = (self.intermediate_size, h)
            if self.enable_bias:
                t[f"{p}fc1.bias"] = (self.intermediate_size,)
            t[f"{p}fc2.weight"] = (h, self.intermediate_size)
            if self.enable_bias:
                t[f"{p}fc2.bias"] = (h,)
            if self.layer_norm_elementwise_affine:
                for norm in ("self_attn_layer_norm", "final_layer_norm"):
                    t[f"{p}{norm}.weight"] = (h,)
                    t[f"{p}{norm}.bias"] = (h,)
            return t
        t[f"{p}input_layernorm.weight"] = (h,)
        for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
            t[f"{p}self_attn.{name}.weight"] = (out, h)
            if self.attention_bias:
                t[f"{p}self_attn.{name}.bias"] = (out,)
        t[f"{p}self_attn.o_proj.weight"] = (h, q_out)
        if self.o_proj_bias:
            t[f"{p}self_attn.o_proj.bias"] = (h,)
        t[f"{p}post_attention_layernorm.weight"] = (h,)
        for name, shape in (("gate_proj", (self.intermediate_size, h)),
                            ("up_proj", (self.intermediate_size, h)),
                            ("down_proj", (h, self.intermediate_size))):
            t[f"{p}mlp.{name}.weight"] = shape
            if self.mlp_bias:
                t[f"{p}mlp.{name}.bias"] = (shape[0],)
        return t

    def embedding_tensors(self) -> dict[str, Shape]:
        """Token embedding, plus OPT's learned positions and project_in (all used before layer 0)."""
        if not self.is_opt:
            return {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size)}
        t: dict[str, Shape] = {"model.decoder.embed_tokens.weight": (self.vocab_size, self.embed_dim),
                               # OPT offsets positions by 2 (a fairseq legacy)
                               "model.decoder.embed_positions.weight":
                                   (self.max_position_embeddings + 2, self.hidden_size)}
        if self.word_embed_proj_dim:
            t["model.decoder.project_in.weight"] = (self.hidden_size, self.embed_dim)
        return t

    def final_norm_tensors(self) -> dict[str, Shape]:
        """Final norm, plus OPT's project_out (all used after the last layer, before the LM head)."""
        if not self.is_opt:
            return {"model.norm.weight": (self.hidden_size,)}
        t: dict[str, Shape] = {}
        if self.has_final_layer_norm and self.layer_norm_elementwise_affine:
            t["model.decoder.final_layer_norm.weight"] = (self.hidden_size,)
            t["model.decoder.final_layer_norm.bias"] = (self.hidden_size,)
        if self.word_embed_proj_dim:
            t["model.decoder.project_out.weight"] = (self.embed_dim, self.hidden_size)
        return t

    def lm_head_tensors(self) -> dict[str, Shape]:
        """The LM head; empty when tied to the token embedding (counted once, under the embedding)."""
        if self.tie_word_embeddings:
            return {}
        return {"lm_head.weight": (self.vocab_size, self.embed_dim)}

    def all_tensors(self) -> dict[str, Shape]:
        t = dict(self.embedding_tensors())
        for i in range(self.num_layers):
            t.update(self.layer_tensors(i))
        t.update(self.final_norm_tensors())
        t.update(self.lm_head_tensors())
        return t

    @property
    def num_params(self) -> int:
        """Exact parameter count, tied embeddings counted once (as transformers counts them)."""
        return sum(_numel(s) for s in self.all_tensors().values())

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """K and V cache bytes of ONE decoder layer for one token."""
        return 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[normalize_dtype(dtype or self.dtype)]


def _numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
