"""`Session`: one conversation (batch 1) that keeps its KV cache between turns.

A turn prefills only what the cache does not hold yet (the new prompt, plus the last token generated in the
previous turn, which was never fed back), so each turn produces exactly what one call over the whole
conversation so far would. If anything else used the model's cache in between (another session,
`model.generate`), the next turn re-prefills the whole conversation: slower, never wrong.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from offload.generation.model import DEFAULT_MAX_NEW_TOKENS, Model, as_rows


class Session:
    """Multi-turn generation over a persistent KV cache. Create it with `model.session()`."""

    def __init__(self, model: Model):
        self._model = model
        self._tokens: list[int] = []     # the conversation: prompts and generated tokens
        self._num_cached = 0             # leading tokens of the conversation whose KV is in the cache

    @property
    def num_tokens(self) -> int:
        """Tokens in the conversation so far (prompts and generated)."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        return list(self._tokens)

    def reset(self) -> None:
        """Forget the conversation (the cache slots are simply overwritten by the next turn)."""
        self._tokens, self._num_cached = [], 0

    def truncate(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` tokens of the conversation and drop the rest; the next turn prefills
        from there (the cache slots past `num_tokens` are simply overwritten). `truncate(0)` is `reset()`.
        Call it between turns, not while a stream of this session is still being read."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise ValueError(f"truncate takes a number of tokens (int), got {num_tokens!r}")
        if not 0 <= num_tokens <= len(self._tokens):
            raise ValueError(f"cannot truncate to {num_tokens} tokens: the conversation has "
                             f"{len(self._tokens)} (use 0 to {len(self._tokens)})")
        # The cache holds the KV of the conversation's first _num_cached tokens (when this session still
        # owns it; otherwise the next turn rebuilds anyway), so its first num_tokens of them stay valid.
        self._tokens = self._tokens[:num_tokens]
        self._num_cached = min(self._num_cached, num_tokens)

    def generate(self, token_ids: list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, stop_token_ids=None, draft=None,
                 draft_tokens: int | None = None, speculate: str = "adaptive") -> list[int]:
        """Append `token_ids` to the conversation and return the new ids (as model.generate for one row; a
        `draft` sees the whole conversation)."""
        return list(self.stream(token_ids, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, draft,
                                draft_tokens, speculate))

    def stream(self, token_ids: list[int], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
               seed: int | None = None, stop_token_ids=None, draft=None,
               draft_tokens: int | None = None, speculate: str = "adaptive") -> Iterator[int]:
        """`generate` as an iterator. Everything is validated here, before the cache is touched."""
        model = self._model
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.reshape(-1).tolist()
        token_ids = list(token_ids)
        if not all(isinstance(t, int) for t in token_ids):
            raise ValueError("a session turn takes one flat list of token ids")
        new = as_rows(token_ids, model.arch.vocab_size)[0] if token_ids else []
        if not new and not self._tokens:
            raise ValueError("the first turn of a session needs at least one token")
        draft, draft_tokens = model.check_draft(draft, draft_tokens, speculate)
        model.check_request(1, len(self._tokens) + len(new), max_new_tokens, what="this conversation")
        params = model.sampling_params(temperature, top_k, top_p, seed)
        stop_ids = model.stop_ids(stop_token_ids)
        if model.cache_owner is not self:
            self._num_cached = 0         # someone else wrote the cache: rebuild from the conversation
        conversation = self._tokens + new
        # A fully cached conversation (an empty turn after a prefill-only turn or a truncate) re-feeds its
        # last token, rewriting that slot with the same values, to get the logits that follow it.
        start = min(self._num_cached, len(conversation) - 1)   # slots before it stay valid whatever happens
        rebuild = model.arch.kv_rebuild_len
        if rebuild is not None and start <= rebuild < len(conversation) + max_new_tokens:
            start = 0     # the cache may be recomputed from its first token in this turn (Phi-3 longrope)
        pending = conversation[start:]
        self._tokens = conversation
        cache_lengths = [start]
        steps = model.run_steps([pending], starts=[start], max_new_tokens=max_new_tokens, params=params,
                                stop_ids=stop_ids, cache_lengths=cache_lengths, owner=self, draft=draft,
                                draft_tokens=draft_tokens, context=conversation[:start], speculate=speculate)
        return self._follow(steps, cache_lengths)

    def _follow(self, steps, cache_lengths: list[int]) -> Iterator[int]:
        try:
            for step in steps:
                self._tokens.append(step[0])
                yield step[0]
        finally:                          # also when the caller stops early: record what the cache holds
            self._num_cached = cache_lengths[0]
