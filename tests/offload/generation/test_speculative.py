"""Speculative decoding: with any draft, greedy decoding gives exactly the tokens of plain greedy decoding
(every family, offloaded placements, sessions) and transformers' own; sampling draws from the target's
distribution (a chi-square test against the distribution computed from the model's logits)."""
from __future__ import annotations

import random

import pytest
import torch

import offload
from offload.generation.drafts import ModelDraft, NgramDraft
from tests.offload.builders import hf_greedy
from tests.offload.offload_plans import layout_plan

# a prompt that repeats itself, so the n-gram draft finds something to propose
PROMPT = [5, 17, 99, 42, 8, 63, 5, 17, 99, 42, 21, 7]


class ScriptedDraft:
    """Proposes what a script says follows: the plain greedy continuation (a perfect draft), with every
    `wrong_every`-th proposed token replaced by another (0: never), and counts its proposals."""

    def __init__(self, prompt: list[int], continuation: list[int], wrong_every: int = 0, vocab: int = 128):
        self.script, self.offset, self.wrong_every, self.vocab = prompt + continuation, len(prompt), wrong_every, vocab
        self.proposed = 0

    def propose(self, tokens, max_tokens):
        n = len(tokens)
        assert list(tokens) == self.script[:n], "the draft is shown the sequence so far"
        out = self.script[n:n + max_tokens]
        if self.wrong_every:
            out = [(t + 1) % self.vocab if (n + i) % self.wrong_every == 0 else t for i, t in enumerate(out)]
        self.proposed += len(out)
        return out


class RandomDraft:
    """Proposes random tokens: nearly always wrong."""

    def __init__(self, seed: int = 0, vocab: int = 128):
        self.rng, self.vocab = random.Random(seed), vocab

    def propose(self, tokens, max_tokens):
        return [self.rng.randrange(self.vocab) for _ in range(self.rng.randint(1, max_tokens))]


class TreeScript:
    """Proposes token trees holding the plain greedy continuation on one branch, often not the first: decoy
    branches before it, wrong siblings beside it, a wrong token on it now and then, cut at random lengths. Greedy
    passes then keep side branches (whose KV sits in other slots: fed again next step)."""

    def __init__(self, prompt: list[int], continuation: list[int], seed: int = 0, vocab: int = 128):
        self.script, self.rng, self.vocab = prompt + continuation, random.Random(seed), vocab
        self.side_branches_proposed = 0

    def propose(self, tokens, max_tokens):
        raise AssertionError("a tree draft is asked for trees")

    def propose_tree(self, tokens, max_tokens):
        rng, n = self.rng, len(tokens)
        truth = self.script[n:n + rng.randint(1, max_tokens)]
        out, parents = [], []

        def add(token, parent):
            if len(out) < max_tokens:
                out.append(token)
                parents.append(parent)
            return len(out) - 1

        if truth and rng.random() < 0.5:                       # a decoy branch first
            node = add((truth[0] + 1) % self.vocab, -1)
            for _ in range(rng.randint(0, 2)):
                node = add(rng.randrange(self.vocab), node)
            self.side_branches_proposed += 1
        parent = -1
        for i, token in enumerate(truth):
            if rng.random() < 0.3:                             # a wrong sibling before it
                add((token + 7) % self.vocab, parent)
            if rng.random() < 0.1:                             # the branch goes wrong here
                token = (token + 3) % self.vocab
            if len(out) == max_tokens:
                break
            parent = add(token, parent)
        return out, parents


def _drafts(plain: list[int]):
    return {"ngram": "ngram", "ngram-tree": "ngram-tree", "perfect": ScriptedDraft(PROMPT, plain),
            "every 3rd wrong": ScriptedDraft(PROMPT, plain, 3), "random": RandomDraft(),
            "tree": TreeScript(PROMPT, plain)}


@pytest.mark.parametrize("variant", ["llama", "mistral_window", "qwen2_tied", "qwen3", "gemma2", "gemma3", "phi3",
                                     "opt", "mixtral_window", "qwen2_moe", "qwen3_moe"])
def test_greedy_with_any_draft_is_plain_greedy(checkpoint_factory, variant):
    path, hf = checkpoint_factory(variant)
    model = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    plain = model.generate([PROMPT], max_new_tokens=24)[0]
    assert plain == hf_greedy(hf, PROMPT, 24)[:len(plain)]
    for name, draft in _drafts(plain).items():
        got = model.generate([PROMPT], max_new_tokens=24, draft=draft, speculate="always")[0]
        assert got == plain, name
        stats = model.stats
        assert stats.num_verify_passes > 0 or name.startswith("ngram"), name
        assert stats.num_decode_tokens == len(plain) - 1 and stats.draft_unused is None
        if name == "perfect":     # every proposal kept: passes of draft_tokens + 1 tokens
            assert stats.num_accepted_tokens == stats.num_drafted_tokens == len(plain) - 1 - stats.num_verify_passes
    # verifying when the measured times say it pays (here, on the CPU, seldom): the same tokens
    assert model.generate([PROMPT], max_new_tokens=24, draft=_drafts(plain)["every 3rd wrong"])[0] == plain


@pytest.mark.parametrize("weights, kv, chunk", [("ccccc", "ccccc", 5), ("gcgcg", "acgac", 3), ("ggggg", "aaaaa", 16)])
def test_offloaded_placements_verify_in_one_pass_and_roll_back_every_tier(llama5, weights, kv, chunk):
    """Streamed weights, KV on the CPU attended there, KV on the CPU streamed to the GPU: the rejected tokens'
    KV is left past the cache length in every tier and overwritten; a pass copies each streamed layer once."""
    plan = layout_plan(llama5, weights=weights, kv=kv, batch_size=1, chunk=chunk, max_seq_len=64, dtype="float32")
    model = offload.load(llama5, plan=plan, progress=False)
    plain = model.generate([PROMPT], max_new_tokens=20)[0]
    plain_bytes, cycle = model.stats.host_to_device_bytes, model.engine.weights.streamed_bytes_per_cycle
    assert model.stats.bytes_per_decode_token == cycle > 0          # a plain step streams everything once
    for name, draft in _drafts(plain).items():
        assert model.generate([PROMPT], max_new_tokens=20, draft=draft, speculate="always")[0] == plain, name
        stats = model.stats
        # one cycle a pass or plain step: the decode tokens less the drafted ones kept
        assert stats.host_to_device_bytes - stats.prefill_host_to_device_bytes == \
            cycle * (stats.num_decode_tokens - stats.num_accepted_tokens), name
        if name == "perfect":     # fewer passes over the streamed layers than tokens: fewer bytes copied
            assert stats.num_verify_passes < len(plain) - 1
            assert stats.host_to_device_bytes < plain_bytes and stats.bytes_per_decode_token < cycle / 2


def test_sessions_with_a_draft_give_the_plain_turns(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    model = offload.load(path, dtype="float32", max_seq_len=96, progress=False)
    turns = [PROMPT, [33, 4, 5, 17], [99, 42]]
    plain_session, drafted = model.session(), model.session()
    want = [plain_session.generate(turn, max_new_tokens=10) for turn in turns]
    stop = want[1][2]                        # a stop token in the middle of a kept proposal
    plain_session.reset()
    want = [plain_session.generate(turn, max_new_tokens=10, stop_token_ids=[stop]) for turn in turns]
    conversation = []
    for turn, expected in zip(turns, want):
        conversation += turn
        draft = ScriptedDraft(conversation, expected + [0] * 16)
        assert drafted.generate(turn, max_new_tokens=10, stop_token_ids=[stop], draft=draft,
                                speculate="always") == expected
        conversation += expected
        assert drafted.tokens == conversation
    assert drafted.generate([], max_new_tokens=4, draft="ngram", speculate="always") == \
        plain_session.generate([], max_new_tokens=4)


def test_batches_decode_plainly_and_bad_drafts_are_clear_errors(checkpoint_factory):
    path, _ = checkpoint_factory("llama")
    model = offload.load(path, dtype="float32", max_seq_len=64, max_batch_size=2, progress=False)
    rows = [PROMPT, PROMPT[:7]]
    plain = model.generate(rows, max_new_tokens=6)
    assert model.generate(rows, max_new_tokens=6, draft="ngram") == plain
    assert "batch of 2 rows" in model.stats.draft_unused and model.stats.num_verify_passes == 0
    assert "draft unused" in model.stats.summary()
    with pytest.raises(ValueError, match="unknown draft 'ngrams'"):
        model.generate([PROMPT], draft="ngrams")
    with pytest.raises(ValueError, match=r"draft_tokens must be an integer from 1 to 15 \(or None: .*\), got 0"):
        model.stream([PROMPT], draft="ngram", draft_tokens=0)
    with pytest.raises(ValueError, match="speculate must be one of 'adaptive', 'always', got 'often'"):
        model.session().generate(PROMPT, draft="ngram", speculate="often")
    bad = RandomDraft(vocab=1000)
    with pytest.raises(ValueError, match="proposed token ids outside the vocabulary of 128"):
        model.generate([PROMPT], max_new_tokens=30, draft=bad, speculate="always")
    malformed = FixedTree()
    malformed.propose_tree = lambda tokens, max_tokens: ([5, 9, 2], [-1, 2, 0])     # node 1 under a later node
    with pytest.raises(ValueError, match=r"proposed a malformed tree: parents \[-1, 2, 0\] for 3 tokens"):
        model.session().generate(PROMPT, max_new_tokens=8, draft=malformed, speculate="always")
    assert model.generate(rows, max_new_tokens=6) == plain                       # nothing disturbed


def test_passes_are_verified_when_they_pay_and_tried_again_now_and_then():
    from offload.generation.speculative import WhenItPays
    pays = WhenItPays()
    assert not pays.now()                            # a plain step is measured first
    step = 1 / 128                                   # (binary fractions: exact sums)
    pays.measured(step, None)
    assert pays.now()                                # then a pass
    pays.measured(5 * step, 3)                       # 3 tokens for 5 steps' time: does not pay
    assert not pays.now()
    for _ in range(WhenItPays.RETRY * 5 - 1):        # tried again once the plain steps took RETRY passes' time
        pays.measured(step, None)
        assert not pays.now()
    pays.measured(step, None)
    assert pays.now()
    pays.measured(1.25 * step, 4)                    # a GPU streaming its weights: a pass costs about a step
    pays.measured(1.25 * step, 4)
    assert pays.now() and pays.tokens_per_pass > 3


def test_the_ngram_draft_proposes_what_followed_the_latest_match():
    draft = NgramDraft(max_ngram=3)
    assert draft.propose([1, 2, 3, 4, 5, 1, 2, 3], 4) == [4, 5, 1, 2]          # the 3-gram 1 2 3
    assert draft.propose([1, 2, 9, 7, 2, 9, 8, 5, 2, 9], 2) == [8, 5]          # the latest 2 9, not the first
    assert draft.propose([4, 6, 8, 6], 3) == [8, 6]                            # a 1-gram, running to the end
    assert draft.propose([1, 2, 3], 3) == [] and draft.propose([7], 3) == []
    with pytest.raises(ValueError, match="min_ngram <= max_ngram"):
        NgramDraft(max_ngram=1, min_ngram=2)
    # a tree: what followed the latest matches of the longest recurring n-gram, merged, the latest first
    tree = NgramDraft(max_branches=3)
    sequence = [1, 2, 3, 4, 1, 2, 5, 6, 1, 2, 3, 7, 1, 2]           # 1 2 at 0, 4 and 8 (7 1 2 recurs nowhere)
    assert tree.propose_tree(sequence, 6) == ([3, 7, 1, 2, 5, 6], [-1, 0, 1, 2, -1, 4])
    assert tree.propose_tree(sequence, 8) == ([3, 7, 1, 2, 5, 6, 1, 2], [-1, 0, 1, 2, -1, 4, 5, 6])
    # 7 1 at 4 and 0: 2 4 7 1, then 2 3 ... merged under the shared 2
    assert tree.propose_tree([7, 1, 2, 3, 7, 1, 2, 4, 7, 1], 5) == ([2, 4, 7, 1, 3], [-1, 0, 1, 2, 0])
    assert draft.propose_tree(sequence, 3) == ([3, 7, 1], [-1, 0, 1])   # one branch: the chain
    with pytest.raises(ValueError, match="max_branches >= 1"):
        NgramDraft(max_branches=0)


SMALL_VOCAB = 12


def chi_square_999(degrees: int) -> float:
    """The chi-square distribution's 99.9th percentile (Wilson-Hilferty: within 1.2% above it from 5 degrees on)."""
    z, c = 3.0902, 2 / (9 * degrees)
    return degrees * (1 - c + z * c ** 0.5) ** 3


class FixedTree:
    """Proposes the same tree whatever the sequence: 5 and 9 as siblings, 2 under 5, 4 and 6 under 9."""

    def propose(self, tokens, max_tokens):
        raise AssertionError("a tree draft is asked for trees")

    def propose_tree(self, tokens, max_tokens):
        return [5, 9, 2, 4, 6][:max_tokens], [-1, -1, 0, 1, 1][:max_tokens]


@pytest.mark.parametrize("sampling, tree", [(dict(temperature=1.0), False), (dict(temperature=0.7, top_k=6), False),
                                            (dict(temperature=1.0), True), (dict(temperature=1.0), "model")],
                         ids=["chain", "chain-top-k", "tree", "model-tree"])
def test_sampling_with_a_draft_draws_from_the_targets_distribution(tmp_path, sampling, tree):
    """Model of 12 tokens; the draft proposes a fixed pair (or a fixed tree, siblings tried in turn; or the tree
    of another model's likeliest continuations, a new one each pass), so its tokens are kept, rejected and
    followed by a token of the target's own. The second and third sampled tokens' frequencies over 3000 draws
    against their exact distributions, computed from the model's logits: chi-square below its 99.9th
    percentile."""
    from offload.generation.sampling import SamplingParams, filter_logits
    from tests.offload.builders import build_checkpoint
    build_checkpoint(tmp_path, "llama", vocab_size=SMALL_VOCAB, initializer_range=0.4, eos_token_id=None)   # no stop
    model = offload.load(tmp_path, dtype="float32", max_seq_len=16, max_batch_size=12, progress=False)
    prompt = [3, 7, 1, 4]
    params = SamplingParams(**sampling)

    def probs(prefixes):                                   # the target's next-token distribution after each
        logits = model.forward(prefixes)[:, -1]                                   # [N, V]
        return filter_logits(logits, params).softmax(-1)

    p1 = probs([prompt])[0]                                                       # [V]
    p2 = probs([prompt + [a] for a in range(SMALL_VOCAB)])                        # [V(a), V]
    p3 = probs([prompt + [a, b] for a in range(SMALL_VOCAB) for b in range(SMALL_VOCAB)]).view(
        SMALL_VOCAB, SMALL_VOCAB, SMALL_VOCAB)
    exact = {1: p1 @ p2, 2: torch.einsum("a,ab,abc->c", p1, p2, p3)}             # the 2nd and 3rd tokens
    if tree == "model":
        from offload.generation.drafts import ModelDraft
        build_checkpoint(tmp_path / "draft", "llama", vocab_size=SMALL_VOCAB, initializer_range=0.4, seed=5)
        draft = ModelDraft(offload.load(tmp_path / "draft", dtype="float32", max_seq_len=16, progress=False), tree=True)
    else:
        draft = FixedTree() if tree else ScriptedDraft([], [], vocab=SMALL_VOCAB)
    if not tree:
        draft.propose = lambda tokens, max_tokens: [5, 9][:max_tokens]
    counts = {i: torch.zeros(SMALL_VOCAB) for i in exact}
    draws = 3000
    for seed in range(draws):
        # (4 tokens: the pass after the first proposes 2 tokens (the tree: the siblings), the pass after them 1)
        out = model.generate([prompt], max_new_tokens=4, draft=draft, seed=seed, speculate="always", **sampling)[0]
        for i in exact:
            counts[i][out[i]] += 1
    assert model.stats.num_verify_passes >= 1
    if tree == "model":                            # (its trees, not chains sampled from it: what it learns from)
        assert draft.acceptance.tries.sum() > 0
    for i, p in exact.items():
        expected = p * draws
        seen = expected > 0
        assert counts[i][~seen].sum() == 0                    # never a token the filtering removes
        chi_square = float(((counts[i][seen] - expected[seen]) ** 2 / expected[seen]).sum())
        assert chi_square < chi_square_999(int(seen.sum()) - 1), (i, chi_square, counts[i].tolist(), expected.tolist())


def test_a_chain_drawn_from_the_drafts_distribution_keeps_the_targets():
    """Sampler.accept with the draft's q (a draft model sampling): token x drawn from q is kept with probability
    min(1, p(x) / q(x)), else the token comes from max(0, p - q): over 20000 draws the first token is
    distributed as p (chi-square below its 99.9th percentile), the tokens kept are sum(min(p, q)) of them (a
    point mass on q's most likely token keeps only p of that token), and with q = p every token is kept."""
    from offload.generation.sampling import Sampler, SamplingParams
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 0.3, 2.0, 0.1, -0.5, 0.0],
                           [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])                           # [N + 1 = 3, V = 6]
    sampler = Sampler(SamplingParams(temperature=0.8, seed=11), "cpu")
    p = sampler.probs(logits)                                                       # [3, 6]
    q = torch.tensor([[0.05, 0.4, 0.3, 0.1, 0.05, 0.1], [0.1, 0.1, 0.5, 0.1, 0.1, 0.1]])
    draws, counts, kept = 20000, torch.zeros(6), 0
    drafter = torch.Generator().manual_seed(5)
    for _ in range(draws):
        chain = [int(torch.multinomial(q[i], 1, generator=drafter)) for i in range(2)]
        path, tokens = sampler.accept(logits, chain, [-1, 0], q)
        assert path == list(range(len(path))) and tokens[:len(path)] == chain[:len(path)] and len(tokens) == len(path) + 1
        counts[tokens[0]] += 1
        kept += bool(path)
    expected = p[0] * draws
    chi_square = float(((counts - expected) ** 2 / expected).sum())
    assert chi_square < chi_square_999(5), (chi_square, counts.tolist(), expected.tolist())
    rate = float(torch.minimum(p[0], q[0]).sum())                                   # P(the first token kept)
    assert abs(kept / draws - rate) < 4 * (rate * (1 - rate) / draws) ** 0.5, (kept / draws, rate)
    assert sampler.accept(logits, [1, 2], [-1, 0], p[:2])[0] == [0, 1]              # q = p: all kept


def test_a_sampling_draft_model_keeps_what_its_distribution_shares(checkpoint_factory):
    """Sampling with the target loaded again as the draft: it draws from the target's own distribution, so every
    proposal is kept (as greedy; its greedy tokens as point masses would keep only their probability), and a
    seed gives the same tokens again."""
    path, _ = checkpoint_factory("llama")
    model = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    copy = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    options = dict(max_new_tokens=24, speculate="always", temperature=1.0, seed=3)
    first = model.generate([PROMPT], draft=ModelDraft(copy), **options)[0]
    stats = model.stats
    assert stats.num_verify_passes > 0 and stats.num_accepted_tokens == stats.num_drafted_tokens > 0
    assert model.generate([PROMPT], draft=ModelDraft(copy), **options)[0] == first
