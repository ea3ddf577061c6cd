"""Rotary position embedding with the scaling types of published configs: none, linear, dynamic, llama3.

Inverse frequencies follow transformers' `modeling_rope_utils` (`_compute_*_parameters`) formula for formula.
Dynamic NTK depends on the sequence length: as in transformers at batch size 1, a row longer than
`max_position_embeddings` uses the base stretched for its length in the current call (`seq_lens`: the row's
length after the whole call, so a chunked prefill equals one forward; default: its last position + 1).
"""
from __future__ import annotations

import math

import torch

from placement.architecture import Architecture


def _base_inv_freq(theta: float, dim: int, device=None) -> torch.Tensor:
    # [D/2] float32
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict, max_positions: int) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling.get("original_max_position_embeddings") or max_positions
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rope:
    """cos/sin tables for given positions; `apply` rotates q and k like transformers' apply_rotary_pos_emb."""

    def __init__(self, arch: Architecture, device=None):
        self.dim = arch.head_dim
        self.theta = arch.rope_theta
        self.scaling = arch.rope_scaling
        self.max_positions = arch.max_position_embeddings
        self.rope_type = self.scaling["rope_type"] if self.scaling else "default"
        inv_freq = _base_inv_freq(self.theta, self.dim, device)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling, self.max_positions)
        elif self.rope_type not in ("default", "dynamic"):
            raise ValueError(f"unsupported rope type {self.rope_type!r}")
        self.inv_freq = inv_freq                                # [D/2] float32

    def _dynamic_inv_freq(self, positions: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
        # positions: [B, T] -> inv_freq per row [B, 1, D/2]; the base grows once a row passes max_positions
        seq_len = positions.max(dim=1).values + 1 if seq_lens is None else seq_lens.to(positions.device)
        seq_len = torch.clamp(seq_len, min=self.max_positions)
        factor, dim = self.scaling["factor"], self.dim
        base = self.theta * ((factor * seq_len / self.max_positions) - (factor - 1)) ** (dim / (dim - 2))
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim
        return (1.0 / (base[:, None] ** exponent[None, :]))[:, None, :]

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype,
                seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] int64 -> cos, sin [B, 1, T, D] in `dtype` (computed in float32)."""
        if self.rope_type == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions, seq_lens)
        else:
            inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq          # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                  # [B, T, D]
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, H, T, D]; cos, sin: [B, 1, T, D]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
