"""The math of each supported family, as plain functions over weight dicts (no placement, no caches).

Every family object offers the same steps, so the engine can run the attention itself in between:
`embed(w, input_ids, positions) -> h`, `prepare(positions, dtype, seq_lens=None) -> ctx`,
`attention_inputs(lw, h, ctx) -> q, k, v`, `attention_output(lw, h, attn) -> h`,
`head(w_norm, w_head, h) -> float32 logits`, and `attention_scale` (None: 1/sqrt(head_dim)).
"""
from __future__ import annotations

from offload.models.decoder import DecoderModel
from offload.models.opt import OPTModel
from placement.architecture import Architecture

FAMILIES = {"llama": DecoderModel, "mistral": DecoderModel, "qwen2": DecoderModel, "opt": OPTModel}


def build_model(arch: Architecture, device=None):
    """The family object for `arch` (Architecture has already rejected unsupported model types)."""
    return FAMILIES[arch.model_type](arch, device)


__all__ = ["DecoderModel", "OPTModel", "build_model", "FAMILIES"]
