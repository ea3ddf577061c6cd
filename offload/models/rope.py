"""Rotary position embedding with the scaling types of published configs: none, linear, dynamic, llama3,
longrope; on all of each head or on its first `rotary_dim` dimensions (Phi's partial_rotary_factor).

Inverse frequencies follow transformers' `modeling_rope_utils` (`_compute_*_parameters`) formula for formula.
Dynamic NTK and longrope depend on the sequence length: as in transformers at batch size 1, a row uses the
frequencies for its length in the current call (`seq_lens`: the row's length after the whole call, so a
chunked prefill equals one forward; default: its last position + 1). Dynamic stretches the base past
`max_position_embeddings`; longrope switches from its short to its long factors past
`original_max_position_embeddings`, and scales cos/sin by its attention factor at every length.
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


def _longrope(scaling: dict, theta: float, dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(short inv_freq, long inv_freq, attention factor) of longrope, as transformers computes them."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short, long = (1.0 / (torch.tensor(scaling[key], dtype=torch.float32) * theta ** shape)
                   for key in ("short_factor", "long_factor"))
    return short, long, float(attention_factor)


class Rope:
    """cos/sin tables for given positions; `apply` rotates q and k like transformers' apply_rotary_pos_emb."""

    def __init__(self, *, dim: int, theta: float, scaling: dict | None, max_positions: int, device=None):
        self.dim = dim                      # rotary dimensions (<= head_dim: the rest pass through)
        self.theta = theta
        self.scaling = scaling
        self.max_positions = max_positions
        self.rope_type = self.scaling["rope_type"] if self.scaling else "default"
        self.attention_factor = 1.0         # cos/sin multiplier (longrope)
        inv_freq = _base_inv_freq(self.theta, self.dim, device)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.scaling["factor"]
        elif self.rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, self.scaling, self.max_positions)
        elif self.rope_type == "longrope":
            short, long, self.attention_factor = _longrope(self.scaling, theta, dim, max_positions)
            inv_freq, self.long_inv_freq = short.to(device), long.to(device)
        elif self.rope_type not in ("default", "dynamic"):
            raise ValueError(f"unsupported rope type {self.rope_type!r}")
        self.inv_freq = inv_freq                                # [D/2] float32

    @classmethod
    def of(cls, arch: Architecture, device=None, *, theta: float | None = None,
           scaling: dict | None | str = "arch") -> "Rope":
        """The model's RoPE (`theta`/`scaling` override the config's, e.g. Gemma 3's local layers)."""
        return cls(dim=arch.rotary_dim, theta=arch.rope_theta if theta is None else theta,
                   scaling=arch.rope_scaling if scaling == "arch" else scaling,
                   max_positions=arch.max_position_embeddings, device=device)

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
        """positions [B, T] int64 -> cos, sin [B, 1, T, R] in `dtype` (computed in float32), R = rotary dims."""
        if self.rope_type == "dynamic":
            inv_freq = self._dynamic_inv_freq(positions, seq_lens)
        elif self.rope_type == "longrope":
            # per row: the long factors once the row (after this call) is longer than the original context
            seq_len = positions.max(dim=1).values + 1 if seq_lens is None else seq_lens.to(positions.device)
            is_long = (seq_len > self.scaling["original_max_position_embeddings"])[:, None, None]   # [B, 1, 1]
            inv_freq = torch.where(is_long, self.long_inv_freq.to(positions.device), self.inv_freq.to(positions.device))
        else:
            inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[..., None].float() * inv_freq          # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                  # [B, T, D]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [B, Hx, T, D] (q or kv heads); cos, sin: [B, 1, T, R] with R <= D: the first R dimensions rotate, the rest pass
        R = cos.shape[-1]
        if R < x.shape[-1]:
            return torch.cat((Rope.apply(x[..., :R], cos, sin), x[..., R:]), dim=-1)
        half = R // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin
