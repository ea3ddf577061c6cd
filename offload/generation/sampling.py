"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p (in transformers' order)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; seed makes sampling reproducible."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers' logits warpers. [B, V] -> [B, V]."""
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]          # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - params.top_p)
        remove[..., -1:] = False                                                  # keep at least one token
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


class Sampler:
    """Picks one token per row from float32 logits [B, V]; owns the seeded generator of one call."""

    def __init__(self, params: SamplingParams, device):
        self.params = params
        self.generator = None
        if not params.is_greedy:
            self.generator = torch.Generator(device=device)
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: [B, V] float32 -> [B] int64
        assert logits.dim() == 2 and logits.dtype == torch.float32, (logits.shape, logits.dtype)
        if self.params.is_greedy:
            return logits.argmax(dim=-1)
        probs = filter_logits(logits, self.params).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def accept(self, logits: torch.Tensor, proposal: list[int]) -> list[int]:
        """What a verification pass yields: `logits` [k + 1, V] float32 are those after the last token fed and
        after each of the k proposed tokens; the result is the proposed tokens kept, then one of the target's own.
        Greedy: the proposed tokens while each is the argmax, then the argmax where they stop (or after the
        last): exactly the tokens of plain greedy decoding. Sampling, the draft a point mass q on each proposed
        token x (Leviathan et al. / Chen et al.): x is kept with probability min(1, p(x) / q(x)) = p(x), else the
        position's token is drawn from (p - q)+ renormalised (p without x), so every token is drawn from p as
        plain sampling draws it (not the same draws for a seed)."""
        k = len(proposal)
        assert logits.dim() == 2 and logits.shape[0] == k + 1 and logits.dtype == torch.float32, (logits.shape, k)
        if self.params.is_greedy:
            best = logits.argmax(dim=-1).tolist()
            n = 0
            while n < k and proposal[n] == best[n]:
                n += 1
            return proposal[:n] + [best[n]]
        probs = filter_logits(logits, self.params).softmax(dim=-1)                      # [k + 1, V]
        drafted = torch.tensor(proposal, dtype=torch.long, device=probs.device)
        kept = (torch.rand(k, generator=self.generator, device=probs.device)
                < probs[torch.arange(k, device=probs.device), drafted]).tolist()
        n = 0
        while n < k and kept[n]:
            n += 1
        last = probs[n]
        if n < k:                                     # rejected: p without the proposed token
            last = last.clone()
            last[proposal[n]] = 0.0
        return proposal[:n] + [int(torch.multinomial(last, 1, generator=self.generator))]
