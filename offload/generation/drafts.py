"""Drafts for speculative decoding: what proposes the tokens a verification pass checks.

A draft proposes a chain of likely next tokens from the sequence so far; the target model verifies the whole
chain in one pass over its weights (offload/generation/steps.py) and keeps the longest part it agrees with,
plus a token of its own. The output is the target's whatever the draft proposes (greedy: exactly its tokens;
sampling: exactly its distribution), so a draft only changes the speed.

`NgramDraft` ("ngram") is prompt lookup (Saxena 2023; transformers' `prompt_lookup_num_tokens`, vLLM's ngram
speculator): the tokens that followed the latest earlier occurrence of the sequence's last n tokens. It needs
no second model, and pays off where replies repeat their context (code edits, summaries, quoting, chat turns
that restate the question).

`ModelDraft` is a small model with the target's tokenizer (Llama-3.2-1B for Llama-3.1-70B, Qwen3-0.6B for
Qwen3-32B, or a 4-bit copy of the target itself), held resident: its greedy continuation (sampling: its tokens
drawn with the target's settings, and the distributions they came from, for the min(1, p / q) rule), one cheap
decode step per proposed token, over a KV cache of its own that follows the sequence (what the target rejected is
rolled back by the cache length, as in the target). With `tree=True` it proposes a token tree instead (SpecExec,
Svirschevski et al. 2024): the nodes most likely to be right (the draft's probabilities, then what its earlier
trees turned out to be worth: `Acceptance`), found best first in passes with a tree mask, each revealing the
children of the nodes it fed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import heapq
import math

import numpy as np
import torch

from offload.generation.steps import read_tokens
from placement.workspace import DEFAULT_VERIFY_TOKENS

DEFAULT_DRAFT_TOKENS = DEFAULT_VERIFY_TOKENS - 1      # tokens proposed a pass where the plan has no budget


class Draft(Protocol):
    """Proposes up to `max_tokens` tokens to follow `tokens` (the prompt and what was generated so far); an
    empty list when it has nothing to propose (the step is then a plain decode step)."""

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]: ...


class TreeDraft(Draft, Protocol):
    """A draft that may also propose a token tree of at most `max_tokens` nodes, in order: (tokens, parents),
    node i under node parents[i] < i, or under the last of `tokens` (-1); a pass verifies all its branches."""

    def propose_tree(self, tokens: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]: ...


class NgramDraft:
    """Prompt lookup: find the latest earlier occurrence of the last n tokens (n from `max_ngram` down to
    `min_ngram`) and propose what followed it. With `max_branches` > 1, a tree (`propose_tree`): what followed
    each of the latest `max_branches` occurrences, merged where they agree (a trie, the latest first: its
    continuation is the tree's first path)."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_branches: int = 1):
        if not (isinstance(max_ngram, int) and isinstance(min_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise ValueError(f"the n-gram draft needs 1 <= min_ngram <= max_ngram, got {min_ngram} and {max_ngram}")
        if not isinstance(max_branches, int) or max_branches < 1:
            raise ValueError(f"the n-gram draft needs max_branches >= 1, got {max_branches!r}")
        self.max_ngram, self.min_ngram, self.max_branches = max_ngram, min_ngram, max_branches

    def _continuations(self, tokens: Sequence[int], max_tokens: int, count: int) -> list[list[int]]:
        """What followed the latest `count` occurrences of the longest n-gram that recurs, latest first."""
        ids = np.asarray(tokens, dtype=np.int64)
        end = len(ids)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            # match[s]: ids[s:s + n] equals the last n ids, for the starts s < end - n (the tail itself excluded)
            match = ids[:end - n] == ids[end - n]
            for j in range(1, n):
                match &= ids[j:end - n + j] == ids[end - n + j]
            hits = np.flatnonzero(match)
            if hits.size:
                return [ids[s + n:s + n + max_tokens].tolist() for s in hits[::-1][:count]]
        return []

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        found = self._continuations(tokens, max_tokens, 1)
        return found[0] if found else []

    def propose_tree(self, tokens: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """(tokens, parents) of at most `max_tokens` nodes: the continuations merged into a trie (one
        continuation: `propose`'s chain)."""
        out, parents = [], []
        child: dict[tuple[int, int], int] = {}             # (parent node, token) -> node
        for continuation in self._continuations(tokens, max_tokens, self.max_branches):
            node = -1
            for token in continuation:
                if (node, token) not in child:
                    if len(out) == max_tokens:
                        break
                    child[node, token] = len(out)
                    out.append(token)
                    parents.append(node)
                node = child[node, token]
        return out, parents

    def __repr__(self) -> str:
        return f"NgramDraft(max_ngram={self.max_ngram}, min_ngram={self.min_ngram}, max_branches={self.max_branches})"


class Acceptance:
    """How often a draft model's tree nodes turn out right, by the draft's probability p of the node's token (in
    BINS bins) and whether it was its parent's likeliest child: (hits + PRIOR p) / (tries + PRIOR) estimates the
    chance that the sequence goes on with a node once it reached its parent (a fresh draft: p itself). A draft's
    probabilities are seldom calibrated against its target's choices: a 4-bit copy of the target picks the
    target's greedy token far more often than its probability says, and its second choices far less; a tree built
    on what was seen then deepens where the draft is reliable and branches where it is not (Sequoia, Chen et al.
    2024, estimates acceptance per sibling rank the same way)."""

    BINS = 10
    PRIOR = 4.0                                     # observations the draft's own probability counts as

    def __init__(self):
        self.hits = np.zeros((2, self.BINS))        # [first child or not, bin of p]
        self.tries = np.zeros((2, self.BINS))

    def _cell(self, rank: int, p: float) -> tuple[int, int]:
        return min(rank, 1), min(int(p * self.BINS), self.BINS - 1)

    def estimate(self, rank: int, p: float) -> float:
        """The chance that a child of rank `rank` (0: the likeliest) with draft probability p is taken."""
        cell = self._cell(rank, p)
        return (self.hits[cell] + self.PRIOR * p) / (self.tries[cell] + self.PRIOR)

    def record(self, rank: int, p: float, hit: bool) -> None:
        cell = self._cell(rank, p)
        self.tries[cell] += 1
        self.hits[cell] += hit


class ModelDraft:
    """A loaded model (offload.load, everything resident is what makes it cheap) proposing its greedy
    continuation (`sample_rows`: drawn as the target samples). Its proposals are tokens of the target's vocabulary
    (`vocab_size`: the draft's own ids past it are never proposed). The KV cache of `model` is the draft's: between
    proposals its row b holds the sequence last shown for row b (and the proposal but its last token); the next
    proposal feeds only what changed since (the target's kept tokens and its own). Another call on `model` in
    between makes it feed everything again. `propose_rows` proposes for several sequences at once (a server's rows:
    row b of the draft's cache follows row b), in passes over all of them; `propose` is its one-row case."""

    def __init__(self, model, vocab_size: int | None = None, tree: bool = False):
        self.model = model
        self.target_vocab_size = vocab_size or model.arch.vocab_size
        self.vocab_size = min(model.arch.vocab_size, self.target_vocab_size)
        self.tree = bool(tree)                # propose_tree: a tree (else the chain), sampling included
        self.acceptance = Acceptance()        # what the trees proposed turned out to be worth (propose_tree)
        self._last_tree: tuple | None = None  # (tokens, node tokens, parents, ranks, p) of the last tree proposed
        self._cached: list[list[int]] = []    # per row: the tokens whose KV is in model's cache, from slot 0

    def propose(self, tokens: Sequence[int], max_tokens: int) -> list[int]:
        return self.propose_rows([tokens], [max_tokens])[0]

    @torch.inference_mode()
    def propose_tree(self, tokens: Sequence[int], max_tokens: int) -> tuple[list[int], list[int]]:
        """(tokens, parents) of at most `max_tokens` nodes after `tokens` (TreeDraft's order: parents first). Without
        `tree`: propose's chain. With it: the nodes most likely to be right, as SpecExec builds them: the largest
        products along their paths of each node's chance (Acceptance: the draft's probability of its token at
        first, then what the trees proposed before turned out to be worth; ties to the node found first), which
        always form a tree; a node's children are drawn from its `max_tokens` likeliest tokens under the draft.
        The children of the last token come from the pass that catches the cache up; each
        further pass feeds the best nodes not yet fed, with their ancestors (from slot len(tokens), a tree mask),
        and reveals their children, until every best node but the least is fed (or as many passes as nodes). In
        the order of a depth-first walk, the likelier child first: node 0 is the draft's first choice, node 1 its
        choice after node 0 when that is among the best, and so on, so the path a target keeps often lies in the
        first slots. A path fed before whose slots hold it still is not fed again (a pass of a chain-like tree
        feeds its new node alone)."""
        if not self.tree:
            chain = self.propose(tokens, max_tokens)
            return chain, list(range(-1, len(chain) - 1))
        self._learn(tokens)
        model, engine = self.model, self.model.engine
        end = len(tokens)
        K = min(max_tokens, model.max_seq_len - end, engine.max_verify_tokens, self.vocab_size)
        if K < 1:
            return [], []
        root: list[torch.Tensor] = []          # the logits after the last token [1, V], from the catch-up pass

        def keep_root(logits: torch.Tensor, used: list[bool]) -> list[int]:
            if used[0]:
                root.append(logits[:1])
            return [0]                         # (its "proposal": the cache then holds `tokens` alone)
        self._rows([tokens], [1], keep_root)
        # every node found: its token, its parent (-1: the last token), its rank among its siblings, the draft's
        # probability of its token, and the log of its path's chance
        found_token, found_parent, found_rank, found_p, found_logp = [], [], [], [], []

        def reveal(parents: list[int], logits: torch.Tensor) -> None:
            """The K likeliest children of each of `parents`, after them the logits [len(parents), V]."""
            probs = torch.softmax(logits[:, :self.vocab_size].float(), dim=-1)           # [n, v]
            values, ids = probs.topk(K, dim=-1)                                          # [n, K] each
            for parent, row_values, row_ids in zip(parents, *torch.stack([values.double(), ids.double()]).tolist()):
                base = 0.0 if parent < 0 else found_logp[parent]
                for rank, (p, token) in enumerate(zip(row_values, row_ids)):
                    found_token.append(int(token))
                    found_parent.append(parent)
                    found_rank.append(rank)
                    found_p.append(p)
                    # (<= the parent's: a parent always ranks first)
                    found_logp.append(base + math.log(max(self.acceptance.estimate(rank, p), 1e-30)))

        def best() -> list[int]:
            """The K likeliest nodes found, the likeliest first."""
            return heapq.nsmallest(K, range(len(found_logp)), key=lambda i: (-found_logp[i], i))

        def path(i: int) -> list[int]:
            """Node i and its ancestors."""
            out = []
            while i >= 0:
                out.append(i)
                i = found_parent[i]
            return out

        fed: set[int] = set()                  # nodes whose children are found
        trunk: list[int] = []                  # a path from the last token whose KV is in slots end, end + 1, ...
        try:
            reveal([-1], root[0])
            for _ in range(K):
                ranked = best()
                # (the K-th node's children rank below it: they could not join)
                todo = [i for i in ranked[:K - 1] if i not in fed]
                if not todo:
                    break
                nodes = {a for i in todo for a in path(i)}          # to feed: them and their ancestors
                # as much of the trunk as every other node descends from is in the cache: fed after it
                k = len(trunk)
                while k and not all(trunk[k - 1] in path(i) for i in nodes - set(trunk[:k])):
                    k -= 1
                rest = sorted(nodes - set(trunk[:k]))                   # in the order found: parents first
                at = {node: j for j, node in enumerate(rest)}           # slot end + k + j holds rest[j]
                logits = engine.verify([found_token[i] for i in rest], end + k,
                                       [at.get(found_parent[i], -1) for i in rest])    # [len(rest), V]
                reveal(todo, logits[[at[i] for i in todo]])
                fed.update(todo)
                trunk = trunk[:k]
                for i in rest:                                          # the path rest starts with
                    if found_parent[i] != (trunk[-1] if trunk else -1):
                        break
                    trunk.append(i)
        except BaseException:
            engine.reset()
            raise
        out, parents, order = _depth_first(best(), found_token, found_parent, found_logp)
        self._last_tree = (list(tokens), out, parents, [found_rank[i] for i in order], [found_p[i] for i in order])
        return out, parents

    def _learn(self, tokens: Sequence[int]) -> None:
        """Record in `acceptance` what became of the last tree proposed, when `tokens` go on from where it was:
        from its root, each node whose parent the sequence reached either is the sequence's next token (a hit:
        the walk goes on from it) or is not."""
        if self._last_tree is None:
            return
        before, nodes, parents, ranks, probs = self._last_tree
        self._last_tree = None
        end = len(before)
        if len(tokens) <= end or _common_prefix(before, tokens[:end]) < end:
            return                                         # (not the same sequence gone on: nothing to learn)
        at, j = -1, end
        while j < len(tokens):
            nxt = None
            for i, parent in enumerate(parents):
                if parent == at:
                    hit = nodes[i] == tokens[j]
                    self.acceptance.record(ranks[i], probs[i], hit)
                    nxt = i if hit and nxt is None else nxt
            if nxt is None:
                return
            at, j = nxt, j + 1

    def propose_rows(self, sequences: Sequence[Sequence[int]], max_tokens: Sequence[int]) -> list[list[int]]:
        """Up to max_tokens[b] tokens to follow sequences[b], for each row b (at most the draft model's
        max_batch_size rows; each sequence at least one token): the draft's greedy continuations. Rows that want
        none are fed too (their last token again, in its slot) while the others run."""
        return self._rows(sequences, max_tokens, lambda logits, used: self._pick(logits))

    def sample_rows(self, sequences: Sequence[Sequence[int]], max_tokens: Sequence[int], samplers: Sequence
                    ) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Like propose_rows, row b's tokens drawn with samplers[b] (offload.generation.sampling.Sampler: the
        target's settings and generator; a greedy one takes the most likely) from the draft's distributions,
        which come back too: (proposals, probs), probs[b] [len(proposals[b]), V] float32 over the target's
        vocabulary (None for a greedy row), what Sampler.accept's min(1, p / q) rule needs."""
        drawn: list[list[torch.Tensor]] = [[] for _ in sequences]
        greedy = [sampler.params.is_greedy for sampler in samplers]
        pad = self.target_vocab_size - self.vocab_size

        def pick(logits: torch.Tensor, used: list[bool]) -> list[int]:
            logits = logits[:, :self.vocab_size]                                       # [B, v]
            out = logits.argmax(-1)                                                    # [B]
            for b, sampler in enumerate(samplers):
                if used[b] and not greedy[b]:
                    q = torch.nn.functional.pad(sampler.probs(logits[b:b + 1]), (0, pad))  # [1, V]
                    drawn[b].append(q[0])
                    out[b] = sampler.draw(q)[0]
            return read_tokens(out)
        proposals = self._rows(sequences, max_tokens, pick)
        return proposals, [None if g or not p else torch.stack(q) for g, p, q in zip(greedy, proposals, drawn)]

    @torch.inference_mode()
    def _rows(self, sequences, max_tokens, pick) -> list[list[int]]:
        """propose_rows with `pick(logits [B, V], used) -> B tokens`, `used[b]` whether row b's token is taken."""
        model, engine = self.model, self.model.engine
        B, S = len(sequences), model.max_seq_len
        if B > model.max_batch_size:
            raise ValueError(f"the draft model holds {model.max_batch_size} rows of KV cache, not {B}: load it "
                             f"with max_batch_size={B}")
        ends = [len(seq) for seq in sequences]
        assert len(max_tokens) == B and min(ends) >= 1, (len(max_tokens), ends)
        if B > 1 and max(ends) > S:
            raise ValueError(f"a sequence of {max(ends)} tokens is longer than the draft model's cache ({S})")
        # the draft feeds a sequence and its proposal but the last token: slots 0 .. end + wanted - 2
        wanted = [max(0, min(m, S - end + 1)) for m, end in zip(max_tokens, ends)]
        if max(wanted) < 1:
            return [[] for _ in sequences]
        cached = self._cached if model.cache_owner is self else []
        cached = [*cached[:B], *[[]] * (B - len(cached))]
        # slots each row keeps; the last token is fed again for its logits
        fed = [min(_common_prefix(c, seq), end - 1) for c, seq, end in zip(cached, sequences, ends)]
        model.claim_cache(self)
        self._cached = []                                    # (until the steps below are done)
        out: list[list[int]] = [[] for _ in sequences]
        try:
            # catching up, in passes of T tokens a row: a row fed all it lacked feeds its last token again
            # (same slot: its KV unchanged), and no row's T slots may run past the cache
            last = [(seq[end - 1], end - 1) for seq, end in zip(sequences, ends)]      # (token, slot) fed last
            while any(f < end for f, end in zip(fed, ends)):
                starts = [f if f < end else slot for f, end, (_, slot) in zip(fed, ends, last)]
                T = min(engine.prefill_chunk_size, max(end - f for f, end in zip(fed, ends)), S - max(starts))
                rows = [list(seq[f:f + T]) if f < end else [token]
                        for seq, f, end, (token, _) in zip(sequences, fed, ends, last)]
                logits = engine.prefill(rows, starts)                                  # [B, V]
                used = [f < end and f + len(row) == end and n > 0
                        for f, end, row, n in zip(fed, ends, rows, wanted)]
                picks = pick(logits, used)
                for b in range(B):
                    if fed[b] < ends[b]:
                        fed[b] += len(rows[b])
                    if used[b]:
                        out[b].append(picks[b])
            for i in range(1, max(wanted)):
                going = [wanted[b] > i for b in range(B)]
                last = [(out[b][-1], ends[b] + i - 1) if going[b] else last[b] for b in range(B)]
                logits = engine.decode([token for token, _ in last], [slot for _, slot in last])   # [B, V]
                picks = pick(logits, going)
                for b in range(B):
                    if going[b]:
                        out[b].append(picks[b])
        except BaseException:
            engine.reset()
            raise
        self._cached = [[*seq, *proposal[:-1]] for seq, proposal in zip(sequences, out)]
        return out

    def _pick(self, logits: torch.Tensor) -> list[int]:
        """Each row's most likely token of the target's vocabulary; logits [B, V]."""
        return read_tokens(logits[:, :self.vocab_size].argmax(-1))

    def __repr__(self) -> str:
        return f"ModelDraft({self.model!r}{', tree=True' if self.tree else ''})"


def _depth_first(nodes: list[int], token: list[int], parent: list[int], logp: list[float]
                 ) -> tuple[list[int], list[int], list[int]]:
    """(tokens, parents, the found nodes in that order) of the tree of `nodes` (indices of found nodes, each one's
    parent among them or -1) in the order of a depth-first walk that visits the likelier child first."""
    children: dict[int, list[int]] = {}
    for i in sorted(nodes, key=lambda i: (-logp[i], i)):
        children.setdefault(parent[i], []).append(i)
    tokens, parents, order, stack = [], [], [], [(i, -1) for i in reversed(children.get(-1, []))]
    while stack:
        node, at = stack.pop()
        parents.append(at)
        tokens.append(token[node])
        order.append(node)
        stack.extend((child, len(tokens) - 1) for child in reversed(children.get(node, [])))
    return tokens, parents, order


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differ[0]) if differ.size else n


# the drafts named by a string: prompt lookup proposing a chain, or a tree of what followed its latest 4 matches
NAMED_DRAFTS = {"ngram": NgramDraft, "ngram-tree": lambda: NgramDraft(max_branches=4)}


def as_draft(draft) -> Draft | None:
    """None (plain decoding), a name of NAMED_DRAFTS, or an object with a `propose(tokens, max_tokens)` method
    (and maybe `propose_tree`) -> a Draft; ValueError naming what would work otherwise."""
    if draft is None or (hasattr(draft, "propose") and callable(draft.propose)):
        return draft
    if isinstance(draft, str) and draft in NAMED_DRAFTS:
        return NAMED_DRAFTS[draft]()
    raise ValueError(f"unknown draft {draft!r}; use None, \"ngram\" (prompt lookup), \"ngram-tree\" (its tree of "
                     "several matches), or an object with a propose(tokens, max_tokens) method")
