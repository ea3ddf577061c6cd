"""The contract of a family description, and the pre-norm decoder tensor table most families share."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from placement.architecture import Architecture

Shape = tuple[int, ...]


class FamilyDescription(Protocol):
    """What placement (and the runtime's checkpoint reading) knows of a family; torch-free."""

    model_types: tuple[str, ...]   # the config.json model_type values it reads
    math: str                      # "offload.models.<module>:<Class>", the family's math in offload
    checkpoint_prefix: str         # before the usual "model." / "lm_head." names ("language_model.")

    def parse(self, config: dict) -> dict:
        """config.json (model_type already checked) -> the keyword arguments of `Architecture`."""

    def layer_prefix(self, arch: "Architecture", layer: int) -> str:
        """Checkpoint name prefix of decoder layer `layer` (its tensors' keys are relative to it)."""

    def layer_tensors(self, arch: "Architecture", layer: int) -> dict[str, Shape]:
        """Checkpoint name -> shape of every tensor of decoder layer `layer`."""

    def embedding_tensors(self, arch: "Architecture") -> dict[str, Shape]:
        """What runs before layer 0; the token table first (a tied LM head reads it)."""

    def final_norm_tensors(self, arch: "Architecture") -> dict[str, Shape]:
        """What runs after the last layer, before the LM head."""

    def lm_head_tensors(self, arch: "Architecture") -> dict[str, Shape]:
        """The LM head; empty when tied to the token table."""

    def router_tensors(self, arch: "Architecture", layer: int) -> dict[str, Shape]:
        """What routes tokens to the experts of layer `layer` (kept in the model dtype); empty for a dense layer."""

    def expert_tensors(self, arch: "Architecture", layer: int, expert: int) -> dict[str, Shape]:
        """Routed expert `expert` of layer `layer`; empty for a dense layer."""


class PreNormDecoder:
    """The tensor table of a llama-like pre-norm decoder under a `prefix` ("model." in most checkpoints):
    RMSNorm weights, q/k/v/o projections, a gated MLP; subclasses add or fuse tensors."""

    prefix = "model."

    @property
    def checkpoint_prefix(self) -> str:
        return self.prefix[:-len("model.")]

    def layer_prefix(self, arch: "Architecture", layer: int) -> str:
        return f"{self.prefix}layers.{layer}."

    def attention_tensors(self, arch: "Architecture", p: str) -> dict[str, Shape]:
        h, q_out, kv_out = arch.hidden_size, arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        t = {f"{p}self_attn.{name}.weight": (out, h)
             for name, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out))}
        t[f"{p}self_attn.o_proj.weight"] = (h, q_out)
        return t

    def attention_bias_tensors(self, arch: "Architecture", p: str, *, o_proj: bool) -> dict[str, Shape]:
        """Biases of q, k, v (and o_proj when `o_proj`)."""
        q_out, kv_out = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        t = {f"{p}self_attn.{name}.bias": (out,) for name, out in (("q_proj", q_out), ("k_proj", kv_out),
                                                                    ("v_proj", kv_out))}
        if o_proj:
            t[f"{p}self_attn.o_proj.bias"] = (arch.hidden_size,)
        return t

    def mlp_tensors(self, arch: "Architecture", p: str) -> dict[str, Shape]:
        h, i = arch.hidden_size, arch.intermediate_size
        return {f"{p}mlp.gate_proj.weight": (i, h), f"{p}mlp.up_proj.weight": (i, h),
                f"{p}mlp.down_proj.weight": (h, i)}

    def norm_names(self, arch: "Architecture") -> tuple[str, ...]:
        return ("input_layernorm", "post_attention_layernorm")

    def layer_tensors(self, arch: "Architecture", layer: int) -> dict[str, Shape]:
        p = self.layer_prefix(arch, layer)
        norms = {f"{p}{name}.weight": (arch.hidden_size,) for name in self.norm_names(arch)}
        return {**norms, **self.attention_tensors(arch, p), **self.mlp_tensors(arch, p)}

    def embedding_tensors(self, arch: "Architecture") -> dict[str, Shape]:
        return {f"{self.prefix}embed_tokens.weight": (arch.vocab_size, arch.hidden_size)}

    def final_norm_tensors(self, arch: "Architecture") -> dict[str, Shape]:
        return {f"{self.prefix}norm.weight": (arch.hidden_size,)}

    def lm_head_tensors(self, arch: "Architecture") -> dict[str, Shape]:
        head = f"{self.checkpoint_prefix}lm_head.weight"          # beside the model's own tensors
        return {} if arch.tie_word_embeddings else {head: (arch.vocab_size, arch.hidden_size)}

    def router_tensors(self, arch: "Architecture", layer: int) -> dict[str, Shape]:
        return {}                                                 # dense layers (placement/families/moe.py)

    def expert_tensors(self, arch: "Architecture", layer: int, expert: int) -> dict[str, Shape]:
        return {}
