"""The generation loop with a draft (speculative decoding, batch 1): each step feeds the last token and the
draft's proposal, a chain or a token tree, in ONE pass over the weights (Engine.verify: a streamed layer
crosses PCIe once for all of them) and yields the tokens the target keeps (Sampler.accept: greedy, exactly
plain greedy's tokens; sampling, exactly its distribution). The KV of rejected tokens is rolled back by the
cache length alone: the slots past it are overwritten before anything attends to them, in every tier (GPU,
CPU, streamed). A kept side branch of a tree is rolled back too and fed again with the next pass.
"""
from __future__ import annotations

import time
from collections.abc import Iterator

from offload.devices import wait_for_device
from offload.generation.drafts import Draft
from offload.generation.engine import Engine
from offload.generation.sampling import Sampler
from offload.generation.stats import GenerationStats
from offload.generation.steps import read_tokens


class WhenItPays:
    """Whether a verification pass pays: the tokens a pass yields times a plain step's time against a pass's
    time (moving averages of what this generation measured). Where compute is cheap against the weights'
    copies (a GPU streaming them) a pass costs about a step and nearly always pays; where it is not (the CPU,
    whose passes of several tokens cost several steps, or a draft that is rarely right) plain steps win. A
    pass is tried again once the plain steps since the last took RETRY passes' time, as the draft's luck
    changes with the text (a reply that starts quoting its prompt)."""

    RETRY = 4
    WEIGHT = 0.5                                   # of the newest measurement in the moving averages

    def __init__(self):
        self.step_s: float | None = None           # a plain decode step
        self.pass_s: float | None = None           # a verification pass
        self.tokens_per_pass: float | None = None  # what a pass yields: the draft's tokens kept, and one more
        self.plain_steps = 0                       # plain steps since the last pass

    def now(self) -> bool:
        if self.step_s is None:
            return False                           # a plain step is measured first
        if self.pass_s is None or self.plain_steps * self.step_s >= self.RETRY * self.pass_s:
            return True                            # (tried again: at most 1 / RETRY of the time on passes that lose)
        return self.tokens_per_pass * self.step_s >= self.pass_s

    def measured(self, seconds: float, tokens: int | None) -> None:
        """A plain step (`tokens` None) or a verification pass that yielded `tokens` took `seconds`."""
        def average(old, new):
            return new if old is None else old + self.WEIGHT * (new - old)
        if tokens is None:
            self.step_s = average(self.step_s, seconds)
            self.plain_steps += 1
        else:
            self.pass_s, self.tokens_per_pass = average(self.pass_s, seconds), average(self.tokens_per_pass, tokens)
            self.plain_steps = 0


class Always:
    """A verification pass whenever the draft proposes (speculate="always")."""

    def now(self) -> bool:
        return True

    def measured(self, seconds: float, tokens: int | None) -> None:
        pass


SPECULATE = {"adaptive": WhenItPays, "always": Always}


def draft_tree(draft: Draft, tokens: list[int], max_tokens: int, vocab_size: int) -> tuple[list[int], list[int]]:
    """(tokens, parents) the draft proposes after `tokens`, at most `max_tokens` nodes: its `propose_tree` when
    it has one (a token tree in order: node i under parents[i] < i, -1 under the last token), else its chain
    (`propose`: node i under i - 1). ValueError for ids outside the vocabulary or a malformed tree."""
    if hasattr(draft, "propose_tree"):
        proposed, parents = draft.propose_tree(tokens, max_tokens)
        proposed, parents = [int(t) for t in proposed][:max_tokens], [int(i) for i in parents][:max_tokens]
        if len(parents) != len(proposed) or any(not -1 <= parent < i for i, parent in enumerate(parents)):
            raise ValueError(f"the draft {draft!r} proposed a malformed tree: parents {parents} for "
                             f"{len(proposed)} tokens (node i needs a parent from -1 to i - 1)")
    else:
        proposed = [int(t) for t in draft.propose(tokens, max_tokens)][:max_tokens]
        parents = list(range(-1, len(proposed) - 1))
    return checked_ids(draft, proposed, vocab_size), parents


def checked_ids(draft: Draft, proposed: list[int], vocab_size: int) -> list[int]:
    """`proposed` (host ints) when every id is in the vocabulary; else ValueError naming the draft."""
    if any(not 0 <= t < vocab_size for t in proposed):
        raise ValueError(f"the draft {draft!r} proposed token ids outside the vocabulary of {vocab_size}: "
                         f"{proposed}")
    return proposed


def draft_steps(engine: Engine, row: list[int], *, start: int, max_new_tokens: int, sampler: Sampler,
                stop_ids: frozenset[int], stats: GenerationStats, cache_lengths: list[int], draft: Draft,
                draft_tokens: int, context: list[int] | None = None, speculate: str = "adaptive"
                ) -> Iterator[list[int | None]]:
    """Like generate_steps for ONE row (fed from cache slot `start`), yielding [token] per new token.
    `context`: the tokens before `row` that the cache holds (a session's conversation), which the draft
    sees too. `speculate`: "adaptive" (a pass when it pays: WhenItPays) or "always" (SPECULATE).

    Each step feeds what the cache lacks of the sequence (the last token; after a tree's side branch was
    kept, that branch too: its KV sits in other slots, so it is fed again, rather than moved) and the
    draft's proposal (a chain or a tree) in one pass."""
    context = list(context or []) + list(row)     # context[i] is what cache slot i holds (or will)
    assert len(context) == start + len(row), (len(context), start, len(row))
    t0 = time.perf_counter()
    logits = engine.prefill([row], [start])                                    # [1, V]
    wait_for_device(engine.device)
    stats.prefill_seconds += time.perf_counter() - t0
    stats.num_prompt_tokens += len(row)
    valid = len(context)                                 # slots whose KV is the context's
    pays = SPECULATE[speculate]()
    new = read_tokens(sampler.sample(logits))                                  # the first token
    produced = 0
    while True:
        for token in new:
            produced += 1
            stats.num_decode_tokens += produced > 1
            context.append(token)
            # what the cache holds of the sequence so far (kept tokens past a stop are not part of it)
            cache_lengths[:] = [min(valid, len(context))]
            yield [token]
            if token in stop_ids or produced == max_new_tokens:
                return
        t0 = time.perf_counter()
        pending = context[valid:]                        # fed this step, from slot `valid` (the last token, ...)
        P = len(pending)
        assert P >= 1, (valid, len(context))
        room = min(draft_tokens, max_new_tokens - produced - 1, engine.max_seq_len - len(context),
                   engine.max_verify_tokens - P)
        proposed, parents, draft_probs = [], [], None
        if room > 0 and pays.now():
            if sampler.params.is_greedy or not hasattr(draft, "sample_rows") or getattr(draft, "tree", False):
                proposed, parents = draft_tree(draft, context, room, engine.arch.vocab_size)
            else:                        # a draft model's chain sampled as the target samples: q for min(1, p / q)
                (chain,), (draft_probs,) = draft.sample_rows([context], [room], [sampler])
                proposed = checked_ids(draft, [int(t) for t in chain][:room], engine.arch.vocab_size)
                parents = list(range(-1, len(proposed) - 1))
            stats.draft_seconds += time.perf_counter() - t0
        if proposed:
            # the pending tokens as a chain, the tree under the last of them
            fed_parents = list(range(-1, P - 1)) + [P - 1 if parent < 0 else P + parent for parent in parents]
            logits = engine.verify(pending + proposed, valid, fed_parents)                 # [P + N, V]
            path, new = sampler.accept(logits[P - 1:], proposed, parents, draft_probs)
            stats.num_verify_passes += 1
            stats.num_drafted_tokens += len(proposed)
            stats.num_accepted_tokens += len(path)
            # kept nodes whose slots are already theirs: node i sits at slot valid + P + i, and the k-th token
            # kept belongs at valid + P + k - 1
            in_place = next((k for k, node in enumerate(path) if node != k), len(path))
            valid += P + in_place                        # the rest rolled back (and fed again if kept)
        else:
            if P == 1:
                logits = engine.decode(pending, [valid])                                    # [1, V]
            else:                        # a kept side branch fed again, in a pass (cpu layers run in place)
                logits = engine.verify(pending, valid)[-1:]                                 # [1, V]
            new = read_tokens(sampler.sample(logits))
            valid += P
        seconds = time.perf_counter() - t0
        pays.measured(seconds, len(new) if proposed else None)
        stats.decode_seconds += seconds
