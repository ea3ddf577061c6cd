"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B) and Qwen3-MoE (Qwen3-30B-A3B,
Qwen3-235B-A22B). The llama-like attention of their dense siblings; in the MoE layers the MLP is a router
(`gate`, [E, H]) choosing `num_experts_per_tok` of `num_experts` gated MLPs per token.

- Mixtral: `block_sparse_moe.` with experts `w1` (gate), `w3` (up), `w2` (down) of `intermediate_size`;
  every layer is MoE; the chosen experts' softmax weights are renormalised; a sliding window on every layer
  when `sliding_window` is set.
- Qwen2-MoE: `mlp.` with experts `gate_proj`/`up_proj`/`down_proj` of `moe_intermediate_size`, plus a shared
  expert (`shared_expert`, `shared_expert_intermediate_size`) scaled by sigmoid(`shared_expert_gate`); q/k/v
  biases (`qkv_bias`, on by default); layers in `mlp_only_layers` or off the `decoder_sparse_step` are dense
  (a gated MLP of `intermediate_size`); windows from `layer_types` (or transformers' rule when absent).
- Qwen3-MoE: Qwen3's attention (q/k norms, `head_dim`, `attention_bias`) with Qwen2-MoE's sparse layers
  without the shared expert; a sliding window on every layer when `use_sliding_window`.

Options: expert_intermediate_size, norm_topk_prob (renormalise the chosen weights), shared_expert_size (0:
none), attention_bias, o_proj_bias. The router and the shared-expert gate are `router_tensors`: they stay in
the model dtype when the experts are quantized (routing decisions must not move), as llama.cpp keeps them.
"""
from __future__ import annotations

from placement.config_fields import ConfigError, common_fields, require, window_layers
from placement.families.base import PreNormDecoder, Shape
from placement.families.llama import decoder_fields


def moe_fields(config: dict, common: dict, *, expert_size: int) -> dict:
    """The Architecture fields of the experts: counts and which layers are sparse (transformers' rule:
    not in `mlp_only_layers` and (layer + 1) a multiple of `decoder_sparse_step`)."""
    key = "num_experts" if config.get("num_experts") is not None else "num_local_experts"   # (Mixtral's name)
    num_experts = require(config, key)
    top_k = require(config, "num_experts_per_tok")
    if top_k > num_experts:
        raise ConfigError(f"num_experts_per_tok {top_k} exceeds num_experts {num_experts}")
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or ())
    layers = tuple(i for i in range(common["num_layers"]) if i not in dense and (i + 1) % step == 0)
    return dict(num_experts=num_experts, num_experts_per_tok=top_k, moe_layers=layers,
                expert_intermediate_size=expert_size)


class MoeDecoder(PreNormDecoder):
    """The tensor table of a llama-like decoder whose MoE layers hold a router and experts under
    `block` ("mlp." or Mixtral's "block_sparse_moe."), each expert's gate, up and down matrices named
    `expert_names`."""

    block = "mlp."
    expert_names = ("gate_proj", "up_proj", "down_proj")

    def router_tensors(self, arch, layer: int) -> dict[str, Shape]:
        if layer not in arch.moe_layers:
            return {}
        p = f"{self.layer_prefix(arch, layer)}{self.block}"
        router = {f"{p}gate.weight": (arch.num_experts, arch.hidden_size)}
        if arch.options["shared_expert_size"]:
            router[f"{p}shared_expert_gate.weight"] = (1, arch.hidden_size)
        return router

    def expert_tensors(self, arch, layer: int, expert: int) -> dict[str, Shape]:
        if layer not in arch.moe_layers:
            return {}
        p = f"{self.layer_prefix(arch, layer)}{self.block}experts.{expert}."
        return gated(p, self.expert_names, arch.hidden_size, arch.options["expert_intermediate_size"])

    def layer_tensors(self, arch, layer: int) -> dict[str, Shape]:
        p = self.layer_prefix(arch, layer)
        t = {f"{p}{name}.weight": (arch.hidden_size,) for name in self.norm_names(arch)}
        t.update(self.attention_tensors(arch, p))
        if layer not in arch.moe_layers:
            return {**t, **self.mlp_tensors(arch, p)}
        t.update(self.router_tensors(arch, layer))
        for expert in range(arch.num_experts):
            t.update(self.expert_tensors(arch, layer, expert))
        shared = arch.options["shared_expert_size"]
        if shared:
            t.update(gated(f"{p}{self.block}shared_expert.", self.expert_names, arch.hidden_size, shared))
        return t

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        t = super().attention_tensors(arch, p)
        if arch.options["attention_bias"]:
            t.update(self.attention_bias_tensors(arch, p, o_proj=arch.options["o_proj_bias"]))
        return t


def gated(p: str, names: tuple[str, str, str], hidden: int, inner: int) -> dict[str, Shape]:
    """A gated MLP's matrices under prefix `p`: gate and up [inner, hidden], down [hidden, inner]."""
    gate, up, down = names
    return {f"{p}{gate}.weight": (inner, hidden), f"{p}{up}.weight": (inner, hidden),
            f"{p}{down}.weight": (hidden, inner)}


class MixtralFamily(MoeDecoder):
    model_types = ("mixtral",)
    math = "offload.models.moe:MixtralModel"
    block = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")

    def parse(self, config: dict) -> dict:
        common = common_fields(config)
        fields = decoder_fields(config, common)
        moe = moe_fields(config, common, expert_size=fields["intermediate_size"])
        window = config.get("sliding_window")
        options = dict(expert_intermediate_size=moe.pop("expert_intermediate_size"), norm_topk_prob=True,
                       shared_expert_size=0, attention_bias=False, o_proj_bias=False)
        return dict(**common, **fields, **moe, sliding_window=int(window) if window else None,
                    sliding_window_layers=tuple(range(common["num_layers"])) if window else (), options=options)


class QwenMoeFamily(MoeDecoder):
    """Qwen2-MoE (`is_qwen3` False) and Qwen3-MoE."""

    def __init__(self, *, model_types: tuple[str, ...], math: str, is_qwen3: bool):
        self.model_types, self.math, self.is_qwen3 = model_types, math, is_qwen3

    def parse(self, config: dict) -> dict:
        common = common_fields(config)
        num_layers = common["num_layers"]
        moe = moe_fields(config, common, expert_size=require(config, "moe_intermediate_size"))
        window = int(config["sliding_window"]) if config.get("use_sliding_window") and config.get("sliding_window") \
            else None
        if self.is_qwen3:
            layers = tuple(range(num_layers)) if window else ()
            bias = bool(config.get("attention_bias", False))
            shared = 0
        else:
            layers = window_layers(config, num_layers) if config.get("layer_types") is not None else \
                tuple(i for i in range(min(int(config.get("max_window_layers", num_layers)), num_layers))
                      if window and (i + 1) % 2)
            bias = bool(config.get("qkv_bias", True))
            shared = require(config, "shared_expert_intermediate_size")
        options = dict(expert_intermediate_size=moe.pop("expert_intermediate_size"),
                       norm_topk_prob=bool(config.get("norm_topk_prob", False)), shared_expert_size=shared,
                       attention_bias=bias, o_proj_bias=bias and self.is_qwen3)
        return dict(**common, **decoder_fields(config, common), **moe, sliding_window=window if layers else None,
                    sliding_window_layers=layers if window else (), options=options)

    def attention_tensors(self, arch, p: str) -> dict[str, Shape]:
        t = super().attention_tensors(arch, p)
        if self.is_qwen3:
            t[f"{p}self_attn.q_norm.weight"] = (arch.head_dim,)
            t[f"{p}self_attn.k_norm.weight"] = (arch.head_dim,)
        return t


MIXTRAL = MixtralFamily()
QWEN2_MOE = QwenMoeFamily(model_types=("qwen2_moe",), math="offload.models.moe:Qwen2MoeModel", is_qwen3=False)
QWEN3_MOE = QwenMoeFamily(model_types=("qwen3_moe",), math="offload.models.moe:Qwen3MoeModel", is_qwen3=True)
