"""Drafts for speculative decoding: what proposes the tokens a verification pass checks.

A draft proposes a chain of likely next tokens from the sequence so far; the target model verifies the whole
chain in one pass over its weights (offload/generation/steps.py) and keeps the longest part it agrees with,
plus a token of its own. The output is the target's whatever the draft proposes (greedy: exactly its tokens;
sampling: exactly its distribution), so a draft only changes the speed.

`NgramDraft` ("ngram") is prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's ngram
speculator): the tokens that followed the latest earlier occurrence of the sequence's last n tokens. It needs
no second model, and pays off where replies repeat their context (code edits, summaries, quoting, chat turns
that restate the question).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

DEFAULT_DRAFT_TOKENS = 8        # tokens proposed per verification pass


class Draft(Protocol):
    """Proposes up to `max_tokens` tokens to follow `tokens` (the prompt and what was generated so far); an
    empty list when it has nothing to propose (the step is then a plain decode step)."""

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]: ...


class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n from `max_ngram` down to
    `min_ngram`) and propose what followed it."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(max_ngram, int) and isinstance(min_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"the n-gram draft needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        ids = np.asarray(tokens, dtype=np.int64)
        end = len(ids)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            # match[s]: ids[s:s + n] equals the last n ids, for the starts s < end - n (the tail itself excluded)
            match = ids[:end - n] == ids[end - n]
            for j in range(1, n):
                match &= ids[j:end - n + j] == ids[end - n + j]
            hits = np.flatnonzero(match)
            if hits.size:
                start = int(hits[-1]) + n                       # what followed the latest occurrence
                return ids[start:start + max_tokens].tolist()
        return []

    def __repr__(self) -> str:
        return f"NgramDraft(max_ngram={self.max_ngram}, min_ngram={self.min_ngram})"


def as_draft(draft) -> Draft | None:
    """None (plain decoding), "ngram", or an object with a `propose(tokens, max_tokens)` method -> a Draft;
    ValueError naming what would work otherwise."""
    if draft is None or (hasattr(draft, "propose") and callable(draft.propose)):
        return draft
    if draft == "ngram":
        return NgramDraft()
    raise ValueError(f"unknown draft {draft!r}; use None, \"ngram\" (prompt lookup), or an object with a "
                     "propose(tokens, max_tokens) method")
