"""The family-math contract: what the engine calls on a family's math object, in this order per chunk."""
from __future__ import annotations

from typing import Any, Protocol

import torch


class FamilyMath(Protocol):
    """A family's math over weight dicts; knows nothing about placement or caches.

    Weight dicts: a layer's keyed relative to its prefix ("self_attn.q_proj.weight"), the others by
    their usual checkpoint names (offload/weights/source.py)."""

    attention_scale: float | None     # what scores are multiplied by (None: SDPA's 1/sqrt(head_dim))

    def embed(self, w: dict, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [B, T] int64 -> hidden states [B, T, H] (on the table's device)."""

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype, seq_lens: torch.Tensor | None = None) -> Any:
        """Per-chunk context shared by all layers (RoPE tables); seq_lens [B]: each row's length once the
        current call is done (length-dependent RoPE reads it)."""

    def attention_inputs(self, lw: dict, h: torch.Tensor, ctx: Any, layer: int) -> tuple[torch.Tensor, ...]:
        """Layer `layer`'s norm and projections: h [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D],
        position-encoded."""

    def attention_output(self, lw: dict, h: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """attn [B, Hq, T, D] -> the layer's output hidden states [B, T, H] (residuals included)."""

    def head(self, w_norm: dict, w_head: dict, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: h [B, T, H] -> float32 logits [B, T, V]."""
