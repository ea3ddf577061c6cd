"""OPT: learned positions (offset by 2), LayerNorm, MHA with biases, ReLU MLP; optional project_in/out
when `word_embed_proj_dim` differs from hidden_size; post-norm variants (`do_layer_norm_before` false).

Options: word_embed_proj_dim (0 when equal to hidden_size), do_layer_norm_before, has_final_layer_norm,
enable_bias, layer_norm_elementwise_affine.
"""
from __future__ import annotations

from placement.config_fields import ConfigError, common_fields, require
from placement.families.base import Shape

POSITION_OFFSET = 2     # OPT's learned positions start at row 2 (a fairseq legacy)


class OptFamily:
    model_types = ("opt",)
    math = "offload.models.opt:OPTModel"
    checkpoint_prefix = ""

    def parse(self, config: dict) -> dict:
        common = common_fields(config)
        hidden, num_heads = common["hidden_size"], common["num_heads"]
        if hidden % num_heads:
            raise ConfigError(f"hidden_size {hidden} is not a multiple of num_attention_heads")
        proj = config.get("word_embed_proj_dim") or hidden
        before = bool(config.get("do_layer_norm_before", True))
        options = dict(word_embed_proj_dim=0 if proj == hidden else int(proj), do_layer_norm_before=before,
                       has_final_layer_norm=before and not config.get("_remove_final_layer_norm", False),
                       enable_bias=bool(config.get("enable_bias", True)),
                       layer_norm_elementwise_affine=bool(config.get("layer_norm_elementwise_affine", True)))
        return dict(**common, intermediate_size=require(config, "ffn_dim"), num_kv_heads=num_heads,
                    head_dim=hidden // num_heads, tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),
                    hidden_act=config.get("activation_function", "relu"),
                    max_cache_len=common["max_position_embeddings"], options=options)

    def layer_prefix(self, arch, layer: int) -> str:
        return f"model.decoder.layers.{layer}."

    def layer_tensors(self, arch, layer: int) -> dict[str, Shape]:
        p, h, i, o = self.layer_prefix(arch, layer), arch.hidden_size, arch.intermediate_size, arch.options
        t: dict[str, Shape] = {}
        for name, (rows, cols) in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (h, h)),
                                   ("self_attn.v_proj", (h, h)), ("self_attn.out_proj", (h, h)),
                                   ("fc1", (i, h)), ("fc2", (h, i))):
            t[f"{p}{name}.weight"] = (rows, cols)
            if o["enable_bias"]:
                t[f"{p}{name}.bias"] = (rows,)
        if o["layer_norm_elementwise_affine"]:
            for norm in ("self_attn_layer_norm", "final_layer_norm"):
                t[f"{p}{norm}.weight"] = (h,)
                t[f"{p}{norm}.bias"] = (h,)
        return t

    def embedding_tensors(self, arch) -> dict[str, Shape]:
        """Token table, learned positions and project_in (all used before layer 0)."""
        proj = arch.options["word_embed_proj_dim"]
        t: dict[str, Shape] = {
            "model.decoder.embed_tokens.weight": (arch.vocab_size, proj or arch.hidden_size),
            "model.decoder.embed_positions.weight": (arch.max_position_embeddings + POSITION_OFFSET, arch.hidden_size)}
        if proj:
            t["model.decoder.project_in.weight"] = (arch.hidden_size, proj)
        return t

    def final_norm_tensors(self, arch) -> dict[str, Shape]:
        """Final LayerNorm and project_out (all used after the last layer, before the LM head)."""
        o, h = arch.options, arch.hidden_size
        t: dict[str, Shape] = {}
        if o["has_final_layer_norm"] and o["layer_norm_elementwise_affine"]:
            t["model.decoder.final_layer_norm.weight"] = (h,)
            t["model.decoder.final_layer_norm.bias"] = (h,)
        if o["word_embed_proj_dim"]:
            t["model.decoder.project_out.weight"] = (o["word_embed_proj_dim"], h)
        return t

    def lm_head_tensors(self, arch) -> dict[str, Shape]:
        if arch.tie_word_embeddings:
            return {}
        return {"lm_head.weight": (arch.vocab_size, arch.options["word_embed_proj_dim"] or arch.hidden_size)}

    def router_tensors(self, arch, layer: int) -> dict[str, Shape]:
        return {}                                                 # no experts

    def expert_tensors(self, arch, layer: int, expert: int) -> dict[str, Shape]:
        return {}


OPT = OptFamily()
