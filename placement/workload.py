"""Workload: how many sequences, how long their prompts, how many tokens to generate."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """`batch_size` sequences, each a `prompt_len`-token prompt followed by `gen_len` new tokens."""

    batch_size: int = 1
    prompt_len: int = 2048
    gen_len: int = 512

    def __post_init__(self):
        for key in ("batch_size", "prompt_len", "gen_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")

    @property
    def max_seq_len(self) -> int:
        """Tokens per sequence at the end of generation: what each KV cache row must hold."""
        return self.prompt_len + self.gen_len

    @property
    def num_cached_tokens(self) -> int:
        """Tokens one layer's KV cache holds: batch_size x max_seq_len."""
        return self.batch_size * self.max_seq_len

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "prompt_len": self.prompt_len, "gen_len": self.gen_len}

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(batch_size=d["batch_size"], prompt_len=d["prompt_len"], gen_len=d["gen_len"])
