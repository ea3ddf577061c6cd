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
        return self.draw(self.probs(logits))

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from: float32 logits [B, V] -> probabilities [B, V] (not greedy)."""
        assert not self.params.is_greedy
        return filter_logits(logits, self.params).softmax(dim=-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row from probabilities [B, V] -> [B] int64, with this sampler's generator."""
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0]

    def accept(self, logits: torch.Tensor, tokens: list[int], parents: list[int],
               draft_probs: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
        """What a verification pass of a token tree yields: node i proposes tokens[i] after its parent
        parents[i] (< i; -1: the root, the last token fed before the tree); `logits` [N + 1, V] float32 are
        those after the root (row 0) and after each node (row i + 1). Returns (the nodes kept, a path from the
        root; the tokens yielded: theirs, then one of the target's own). A chain is the tree whose node i
        hangs under i - 1.
        Greedy: from the root, the child proposing the argmax while there is one, then the argmax where none
        does: exactly the tokens of plain greedy decoding. Sampling, each node's draft a point mass (Leviathan
        et al. / Chen et al.; SpecInfer's multi-candidate form for siblings): at a node with distribution p,
        its children's tokens x are tried in turn, each kept with probability p(x) / (what p has left), and
        removed from p when not; if none is kept the token is drawn from what is left of p. So every token
        is drawn from p as plain sampling draws it (not the same draws for a seed).
        `draft_probs` [N, V]: a chain whose token i was drawn from draft_probs[i] (a draft model sampling with
        these settings): token i is kept with probability min(1, p(x) / q(x)), and at the first one rejected the
        token is drawn from max(0, p - q), normalised (Leviathan et al.): again exactly p, and where the draft's
        q is close to p nearly every token is kept (a point mass keeps only p(x) of them)."""
        N = len(tokens)
        assert len(parents) == N and all(-1 <= parent < i for i, parent in enumerate(parents)), parents
        assert logits.dim() == 2 and logits.shape[0] == N + 1 and logits.dtype == torch.float32, (logits.shape, N)
        if draft_probs is not None and not self.params.is_greedy:
            assert parents == list(range(-1, N - 1)) and draft_probs.shape == (N, logits.shape[1]), \
                (parents, draft_probs.shape, logits.shape)
            return self._accept_sampled_chain(self.probs(logits), tokens, draft_probs)
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(parents):
            children.setdefault(parent, []).append(i)
        path, node = [], -1
        if self.params.is_greedy:
            best = logits.argmax(dim=-1).tolist()
            while True:
                chosen = next((c for c in children.get(node, ()) if tokens[c] == best[node + 1]), None)
                if chosen is None:
                    return path, [tokens[i] for i in path] + [best[node + 1]]
                path.append(node := chosen)
        probs = self.probs(logits)                                                      # [N + 1, V]
        while True:
            left = probs[node + 1].clone()                 # [V]: p, less the children's tokens rejected
            chosen = None
            for c in children.get(node, ()):
                kept_p = float(left[tokens[c]] / left.sum())
                # (>= 1: the last token p has left, kept whatever the draw; drawn all the same, so that a seed's
                # stream of draws does not hang on rounding)
                if float(torch.rand((), generator=self.generator, device=probs.device)) < kept_p or kept_p >= 1:
                    chosen = c
                    break
                left[tokens[c]] = 0.0                      # rejected: p without the proposed token
            if chosen is None:
                last = int(torch.multinomial(left, 1, generator=self.generator))
                return path, [tokens[i] for i in path] + [last]
            path.append(node := chosen)

    def _accept_sampled_chain(self, probs: torch.Tensor, tokens: list[int], draft_probs: torch.Tensor
                              ) -> tuple[list[int], list[int]]:
        """accept() for a chain drawn from `draft_probs` [N, V]; probs [N + 1, V] the target's."""
        N = len(tokens)
        # the chain's p(x), q(x) and one uniform draw for each of its tokens, read to the host in ONE copy (one
        # sync on a GPU, not three a token); every token gets its draw, kept or not, so a seed's stream of draws
        # does not hang on the rounding of p and q
        index = torch.tensor(tokens, device=probs.device)[:, None]                        # [N, 1]
        uniform = torch.rand(N, generator=self.generator, device=probs.device)            # [N]
        p, q, u = torch.stack([probs[:N].gather(1, index)[:, 0], draft_probs.gather(1, index)[:, 0],
                               uniform]).tolist()                                         # [3, N] -> host
        for i, token in enumerate(tokens):
            assert q[i] > 0, (i, token)                   # (the draft drew it)
            if u[i] < p[i] / q[i]:
                continue
            residual = (probs[i] - draft_probs[i]).clamp_(min=0)             # [V]: where p exceeds q
            if not float(residual.sum()) > 0:             # (p <= q everywhere: p == q up to rounding)
                residual = probs[i]
            return list(range(i)), [*tokens[:i], int(self.draw(residual[None])[0])]
        return list(range(len(tokens))), [*tokens, int(self.draw(probs[len(tokens)][None])[0])]
