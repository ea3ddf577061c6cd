"""One normalised description of a supported Hugging Face decoder-only architecture.

`Architecture.from_config(config_dict)` reads a `config.json` through its family's description
(placement/families: one torch-free module per family, found by model_type) and names every tensor of
the checkpoint with its exact shape. The planner counts bytes from it; the runtime loads and checks
tensors by it. Fields every family has are typed fields; what only one family reads lives in `options`,
read by that family's description and math alone. Pure Python: no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from placement.config_fields import DTYPE_BYTES, ConfigError, normalize_dtype
from placement.families import SUPPORTED_MODEL_TYPES, FamilyDescription, Shape, family_of

__all__ = ["Architecture", "ConfigError", "DTYPE_BYTES", "SUPPORTED_MODEL_TYPES", "Shape", "normalize_dtype"]


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
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None    # {"rope_type": "linear"|"dynamic"|"llama3"|"longrope", ...} or None
    partial_rotary_factor: float = 1.0  # RoPE on the first rotary_dim dims of each head
    hidden_act: str = "silu"
    sliding_window: int | None = None   # tokens, for the layers in `sliding_window_layers`
    sliding_window_layers: tuple[int, ...] = ()
    attn_logit_softcap: float | None = None   # scores -> cap * tanh(scores / cap) before softmax
    max_cache_len: int | None = None    # positions the model can embed at all (learned positions), or None
    kv_rebuild_len: int | None = None   # a row's cache is recomputed once the row grows past it (Phi-3 longrope)
    num_experts: int = 0                # routed experts of each MoE layer (0: a dense model)
    num_experts_per_tok: int = 0        # experts each token is routed to
    moe_layers: tuple[int, ...] = ()    # the decoder layers whose MLP is routed experts
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    options: dict = field(default_factory=dict)   # family-specific (see the family's description)
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        family_of(self.model_type)                  # ConfigError for an unsupported model_type
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_kv_heads}")
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be 1..num_experts ({self.num_experts}), "
                              f"got {self.num_experts_per_tok}")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict) -> "Architecture":
        """Normalise a Hugging Face config.json dict. Raises ConfigError with a one-line message."""
        if not isinstance(config, dict):
            raise ConfigError("config.json must hold a JSON object")
        return cls(**family_of(config.get("model_type")).parse(config))

    # ---- derived ------------------------------------------------------------------------------
    @property
    def family(self) -> FamilyDescription:
        """This model's family description (placement/families)."""
        return family_of(self.model_type)

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding table (OPT's word_embed_proj_dim may differ from hidden)."""
        return next(iter(self.embedding_tensors().values()))[1]

    @property
    def rotary_dim(self) -> int:
        """Dimensions of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    def window_of(self, layer: int) -> int | None:
        """Sliding-window length of decoder layer `layer`, or None for full attention."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    # ---- tensors (the family's table) ----------------------------------------------------------
    @property
    def checkpoint_prefix(self) -> str:
        """What every checkpoint name starts with beyond the usual "model." / "lm_head." names
        ("language_model." for the text model inside a multimodal checkpoint)."""
        return self.family.checkpoint_prefix

    def layer_prefix(self, layer: int) -> str:
        return self.family.layer_prefix(self, layer)

    def layer_tensors(self, layer: int) -> dict[str, Shape]:
        """Checkpoint name -> shape for every tensor of decoder layer `layer`."""
        return self.family.layer_tensors(self, layer)

    def embedding_tensors(self) -> dict[str, Shape]:
        """What runs before layer 0, the token table first."""
        return self.family.embedding_tensors(self)

    def final_norm_tensors(self) -> dict[str, Shape]:
        """What runs after the last layer, before the LM head."""
        return self.family.final_norm_tensors(self)

    def lm_head_tensors(self) -> dict[str, Shape]:
        """The LM head; empty when tied to the token embedding (counted once, under the embedding)."""
        return self.family.lm_head_tensors(self)

    def router_tensors(self, layer: int) -> dict[str, Shape]:
        """What routes layer `layer`'s tokens to its experts; empty for a dense layer."""
        return self.family.router_tensors(self, layer)

    def expert_tensors(self, layer: int, expert: int) -> dict[str, Shape]:
        """Routed expert `expert` of layer `layer` (one of `num_experts`); empty for a dense layer."""
        return self.family.expert_tensors(self, layer, expert)

    def all_tensors(self) -> dict[str, Shape]:
        t = dict(self.embedding_tensors())
        for i in range(self.num_layers):
            t.update(self.layer_tensors(i))
        t.update(self.final_norm_tensors())
        t.update(self.lm_head_tensors())
        return t

    @property
    def token_table(self) -> str:
        """The checkpoint name of the token embedding table (a tied LM head reads it too)."""
        return next(iter(self.embedding_tensors()))

    def packable_tensors(self) -> dict[str, Shape]:
        """What a file may hold packed: the layers' matrices (quantizable_tensors), the token table (its rows
        gathered packed) and the LM head's matrix (multiplied packed)."""
        shapes = self.all_tensors()
        head = {name: shape for name, shape in self.lm_head_tensors().items() if len(shape) == 2}
        return {**self.quantizable_tensors(), self.token_table: shapes[self.token_table], **head}

    def quantizable_tensors(self) -> dict[str, Shape]:
        """The decoder layers' matrices but the routers: what a quantization packs (placement/quantization.py)."""
        routers = {name for i in self.moe_layers for name in self.router_tensors(i)}
        return {name: shape for i in range(self.num_layers) for name, shape in self.layer_tensors(i).items()
                if len(shape) == 2 and name.endswith(".weight") and name not in routers}

    @property
    def num_params(self) -> int:
        """Exact parameter count, tied embeddings counted once (as transformers counts them)."""
        return sum(math.prod(s) for s in self.all_tensors().values())

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        """K and V cache bytes of ONE decoder layer for one token."""
        return 2 * self.num_kv_heads * self.head_dim * DTYPE_BYTES[normalize_dtype(dtype or self.dtype)]

