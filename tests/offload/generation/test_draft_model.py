"""Speculative decoding with a draft MODEL: a small resident model proposing its greedy continuation
(offload.generation.drafts.ModelDraft), given per call or loaded with the target (offload.load(draft=...,
draft_quantize=...)), whose memory comes off the target's GPU budget. Greedy output is plain greedy decoding's
whatever the draft; the draft's own KV cache follows the sequence, feeding only what changed."""
from __future__ import annotations

import pytest

import offload
from offload.generation.drafts import ModelDraft
from placement import PlanError
from tests.offload.builders import build_checkpoint, hf_greedy
from tests.offload.generation.test_speculative import PROMPT


@pytest.fixture(scope="module")
def other_llama(tmp_path_factory):
    """A second random llama of the same shapes: a draft that is nearly always wrong."""
    path = tmp_path_factory.mktemp("other_llama")
    build_checkpoint(path, "llama", seed=7)
    return path


@pytest.mark.parametrize("variant", ["llama", "qwen3", "gemma2", "mixtral_window"])
def test_greedy_with_a_draft_model_is_plain_greedy(checkpoint_factory, variant):
    """Drafts: the target itself loaded again (always right), its int8 copy (mostly right; also proposing trees),
    another random model of the family (mostly wrong): every one gives the target's greedy tokens, transformers'
    own."""
    path, hf = checkpoint_factory(variant)
    model = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    plain = model.generate([PROMPT], max_new_tokens=24)[0]
    assert plain == hf_greedy(hf, PROMPT, 24)[:len(plain)]
    int8 = offload.load(path, dtype="float32", max_seq_len=64, quantize="int8", progress=False)
    drafts = {"copy": offload.load(path, dtype="float32", max_seq_len=64, progress=False), "int8": int8,
              "int8 tree": ModelDraft(int8, vocab_size=model.arch.vocab_size, tree=True)}
    for name, draft in drafts.items():
        assert model.generate([PROMPT], max_new_tokens=24, draft=draft, speculate="always")[0] == plain, name
        stats = model.stats
        assert stats.num_verify_passes > 0 and stats.draft_seconds > 0 and stats.num_decode_tokens == len(plain) - 1
        if name == "copy":        # the same weights: every proposal kept
            assert stats.num_accepted_tokens == stats.num_drafted_tokens == len(plain) - 1 - stats.num_verify_passes


def test_a_wrong_draft_model_changes_nothing_but_the_speed(llama5, other_llama):
    model = offload.load(llama5, dtype="float32", max_seq_len=64, progress=False)
    draft = offload.load(other_llama, dtype="float32", max_seq_len=64, progress=False)
    plain = model.generate([PROMPT], max_new_tokens=20)[0]
    assert model.generate([PROMPT], max_new_tokens=20, draft=draft, speculate="always")[0] == plain
    assert model.stats.num_accepted_tokens < model.stats.num_drafted_tokens


def test_the_draft_cache_follows_the_sequence_feeding_only_what_changed(llama5, monkeypatch):
    draft_model = offload.load(llama5, dtype="float32", max_seq_len=64, progress=False)
    draft = ModelDraft(draft_model)
    fed = []
    prefill = draft_model.engine.prefill
    monkeypatch.setattr(draft_model.engine, "prefill", lambda rows, starts, **kw: fed.append(
        (len(rows[0]), starts[0])) or prefill(rows, starts, **kw))
    greedy = draft_model.generate([PROMPT], max_new_tokens=12)[0]
    assert draft.propose(PROMPT, 5) == greedy[:5]
    assert fed[-1] == (len(PROMPT), 0)                       # the first proposal feeds everything
    # the target kept 2 of them and chose another token: the draft keeps its KV of the 2, feeds the new one
    sequence = PROMPT + greedy[:2] + [(greedy[2] + 1) % 128]
    want = draft_model.generate([sequence], max_new_tokens=4)[0]
    draft.propose(PROMPT, 5)                                 # (generate used the cache: fed all again)
    assert draft.propose(sequence, 4) == want
    assert fed[-1] == (1, len(PROMPT) + 2)                   # (its KV of the rejected 2 is overwritten)
    # the whole proposal kept and one more token: only the proposal's last token and that one are fed
    longer = sequence + want + [7]
    assert draft.propose(longer, 3) == draft_model.generate([longer], max_new_tokens=3)[0]
    draft.propose(sequence, 4)
    draft.propose(longer, 3)
    assert fed[-1] == (2, len(longer) - 2)
    # near the end of the draft's cache: fewer tokens, then none
    assert len(draft.propose(list(range(60)), 10)) == 5 and draft.propose(list(range(65)), 3) == []


def test_a_draft_model_proposes_for_several_rows_each_cache_row_following_its_sequence(llama5, monkeypatch):
    """propose_rows (a server's rows): row b's proposal is the greedy continuation of sequences[b], computed in
    passes over all rows; the next call feeds each row only what changed in its sequence, and a row that wants
    no tokens is fed its last token again, in its slot."""
    draft_model = offload.load(llama5, dtype="float32", max_seq_len=64, max_batch_size=3, progress=False)
    reference = offload.load(llama5, dtype="float32", max_seq_len=64, progress=False)
    draft = ModelDraft(draft_model)
    fed = []
    prefill = draft_model.engine.prefill
    monkeypatch.setattr(draft_model.engine, "prefill", lambda rows, starts, **kw: fed.append(
        ([len(r) for r in rows], list(starts))) or prefill(rows, starts, **kw))
    sequences = [PROMPT, PROMPT[:3] + [9, 8], [5] * 20]
    want = [reference.generate([s], max_new_tokens=4)[0] for s in sequences]
    assert draft.propose_rows(sequences, [4, 4, 4]) == want
    assert fed == [([len(s) for s in sequences], [0, 0, 0])]
    longer = [sequences[0] + want[0][:2] + [(want[0][2] + 1) % 128], sequences[1] + want[1] + [7], sequences[2]]
    fed.clear()
    assert draft.propose_rows(longer, [3, 2, 0]) == [reference.generate([longer[0]], max_new_tokens=3)[0],
                                                      reference.generate([longer[1]], max_new_tokens=2)[0], []]
    assert fed == [([1, 2, 1], [len(sequences[0]) + 2, len(sequences[1]) + 3, len(sequences[2]) - 1])]
    # a row at the end of the cache beside a long new one: no pass writes past the cache
    near_end = [PROMPT + [1] * (62 - len(PROMPT)), [3] * 40]
    assert draft.propose_rows(near_end, [2, 2]) == [reference.generate([near_end[0]], max_new_tokens=2)[0],
                                                    reference.generate([near_end[1]], max_new_tokens=2)[0]]
    with pytest.raises(ValueError, match="holds 3 rows of KV cache, not 4: load it with max_batch_size=4"):
        draft.propose_rows(sequences + [PROMPT], [1] * 4)
    reference.close()
    draft_model.close()


def test_a_draft_model_proposes_only_the_targets_vocabulary(tmp_path):
    build_checkpoint(tmp_path, "llama", vocab_size=256, seed=3)
    draft_model = offload.load(tmp_path, dtype="float32", max_seq_len=64, progress=False)
    prompts = [[(7 * i + j) % 128 for j in range(6)] for i in range(12)]
    unrestricted = [t for p in prompts for t in ModelDraft(draft_model).propose(p, 4)]
    assert max(unrestricted) >= 128                           # the draft's own vocabulary is larger
    restricted = [t for p in prompts for t in ModelDraft(draft_model, vocab_size=128).propose(p, 4)]
    assert max(restricted) < 128


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_sessions_keep_a_draft_model_in_step(llama5, tree):
    model = offload.load(llama5, dtype="float32", max_seq_len=96, progress=False)
    draft_model = offload.load(llama5, dtype="float32", max_seq_len=96, quantize="int8", progress=False)
    draft = ModelDraft(draft_model, tree=True) if tree else draft_model
    turns = [PROMPT, [33, 4, 5, 17], [99, 42]]
    plain = model.session()
    want = [plain.generate(turn, max_new_tokens=10) for turn in turns]
    drafted = model.session()
    for i, (turn, expected) in enumerate(zip(turns, want)):
        if i == 1:
            draft_model.generate([[1, 2, 3]], max_new_tokens=2)   # someone else used the draft's cache in between
        assert drafted.generate(turn, max_new_tokens=10, draft=draft, speculate="always") == expected
        assert model.stats.num_verify_passes > 0


def test_load_with_a_draft_reserves_its_memory_in_the_gpu_budget(llama5):
    """offload.load(draft=path, draft_quantize=...): the draft is resident; the target is planned in what it
    leaves of gpu_memory (so it streams), uses it by default, and closes it."""
    alone = offload.load(llama5, dtype="float32", max_seq_len=64, progress=False)
    plain = alone.generate([PROMPT], max_new_tokens=16)[0]
    probe = offload.load(llama5, dtype="float32", max_seq_len=64, quantize="int8", gpu_layers=5, progress=False)
    draft_bytes = probe.plan.memory.gpu.total
    probe.close()
    full = offload.load(llama5, dtype="float32", max_seq_len=64, gpu_layers=5, progress=False).plan.memory.gpu.total
    budget = draft_bytes + full - 200_000                    # the target alone would fit; with the draft, not all
    model = offload.load(llama5, dtype="float32", max_seq_len=64, gpu_memory=budget, draft=llama5,
                         draft_quantize="int8", progress=False)
    draft = model.draft_model
    assert draft.plan.num_gpu_layers == 5 and draft.plan.quantization is not None
    assert model.plan.budget.gpu_bytes == budget - draft_bytes
    assert model.plan.num_gpu_layers < 5                     # streams what the draft's memory displaced
    assert "draft model" in model.memory_report()
    assert model.generate([PROMPT], max_new_tokens=16, speculate="always")[0] == plain
    assert model.stats.num_verify_passes > 0                 # the loaded draft by default
    assert model.generate([PROMPT], max_new_tokens=16, draft=False)[0] == plain
    assert model.stats.num_verify_passes == 0
    model.close()
    assert draft.is_closed
    ngram = offload.load(llama5, dtype="float32", max_seq_len=64, draft="ngram", progress=False)
    assert ngram.generate([PROMPT], max_new_tokens=16, speculate="always")[0] == plain
    assert ngram.draft_model is None and ngram.stats.num_drafted_tokens > 0
    tree = offload.load(llama5, dtype="float32", max_seq_len=64, draft=llama5, draft_tree=True, progress=False)
    assert tree.default_draft.tree and tree.default_draft.model is tree.draft_model
    assert tree.generate([PROMPT], max_new_tokens=16, speculate="always")[0] == plain
    assert tree.stats.num_verify_passes > 0
    tree.close()
    # a target for several rows (a server's) gets a draft with KV for as many, and its plan counts them
    rows = offload.load(llama5, dtype="float32", max_seq_len=64, max_batch_size=3, draft=llama5, progress=False)
    assert rows.draft_model.max_batch_size == rows.draft_model.plan.max_batch_size == 3
    assert rows.generate([PROMPT] * 3, max_new_tokens=4) == [plain[:4]] * 3
    rows.close()


def test_bad_drafts_are_clear_errors_and_disturb_nothing(llama5, tmp_path):
    kwargs = dict(dtype="float32", max_seq_len=64, progress=False)
    with pytest.raises(ValueError, match="draft_quantize is the quantization of a draft model; give draft="):
        offload.load(llama5, draft_quantize="int4", **kwargs)
    with pytest.raises(ValueError, match="draft_tree makes a draft model propose trees; give draft='path' too"):
        offload.load(llama5, draft="ngram", draft_tree=True, **kwargs)
    with pytest.raises(ValueError, match="draft must be \"ngram\" or the path .* got int"):
        offload.load(llama5, draft=3, **kwargs)
    with pytest.raises(ValueError, match=f"draft {tmp_path / 'missing'}: .*no such folder or file"):
        offload.load(llama5, draft=tmp_path / "missing", **kwargs)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        offload.load(llama5, draft=llama5, draft_quantize="int3", **kwargs)
    draft_bytes = offload.load(llama5, gpu_layers=5, **kwargs).plan.memory.gpu.total
    with pytest.raises(PlanError, match=f"draft {llama5}: manual plan"):          # the draft alone does not fit
        offload.load(llama5, gpu_memory=draft_bytes // 2, draft=llama5, **kwargs)
    with pytest.raises(PlanError, match=f"the draft {llama5} took .* of the GPU budget first"):
        offload.load(llama5, gpu_memory=draft_bytes + 1000, draft=llama5, **kwargs)
    model = offload.load(llama5, **kwargs)
    plain = model.generate([PROMPT], max_new_tokens=8)
    with pytest.raises(ValueError, match="a model cannot be its own draft"):
        model.generate([PROMPT], draft=model)
    closed = offload.load(llama5, **kwargs)
    closed.close()
    with pytest.raises(ValueError, match="the draft model is closed"):
        model.session().generate(PROMPT, draft=closed)
    assert model.generate([PROMPT], max_new_tokens=8) == plain


def test_a_draft_proposes_the_plans_budget_by_default(llama5):
    """draft_tokens=None: the plan's speculative decoding budget (plan.predicted.verify_tokens) less the pass's
    own last token; an explicit draft_tokens wins."""
    import dataclasses
    base = offload.load(llama5, dtype="float32", max_seq_len=64, progress=False)
    plain = base.generate([PROMPT], max_new_tokens=12)[0]
    asked = []

    class Recording:
        def propose(self, tokens, max_tokens):
            asked.append(max_tokens)
            return (PROMPT + plain)[len(tokens):len(tokens) + max_tokens]

    for budget, explicit, want in ((5, None, 4), (2, None, 1), (5, 3, 3)):
        plan = dataclasses.replace(base.plan, predicted=dataclasses.replace(base.plan.predicted, verify_tokens=budget))
        model = offload.load(llama5, plan=plan, progress=False)
        asked.clear()
        assert model.generate([PROMPT], max_new_tokens=12, draft=Recording(), draft_tokens=explicit,
                              speculate="always")[0] == plain
        assert max(asked) == want


@pytest.fixture(scope="module")
def peaky_llama(tmp_path_factory):
    """A random llama whose next-token distributions are peaked (large initial weights), as a trained model's
    are: the likeliest continuations then branch and deepen (a tiny random model's are nearly flat)."""
    path = tmp_path_factory.mktemp("peaky_llama")
    return path, build_checkpoint(path, "llama", num_hidden_layers=3, initializer_range=1.0)


def test_a_draft_models_tree_is_its_likeliest_continuations(peaky_llama):
    """propose_tree with tree=True: the max_tokens nodes of highest cumulative probability under the draft,
    against transformers' own probabilities: every node's path probability, and no child left out of the tree
    (of the last token or of a node) likelier than the least likely node in it; depth-first, the likelier
    sibling first. Without tree: the greedy chain."""
    import torch
    path, hf = peaky_llama
    draft = ModelDraft(offload.load(path, dtype="float32", max_seq_len=64, progress=False), tree=True)
    prompts = [PROMPT, PROMPT[:5], [3, 1, 4, 1, 5, 9, 2, 6]]
    deep = 0
    for prompt in prompts:
        for K in (1, 6, 15):
            tokens, parents = draft.propose_tree(prompt, K)
            assert len(tokens) == K and all(-1 <= parent < i for i, parent in enumerate(parents)), parents
            paths = []                                     # each node's tokens from the last prompt token
            for token, parent in zip(tokens, parents):
                paths.append((paths[parent] if parent >= 0 else []) + [token])
            deep = max(deep, max(map(len, paths)))
            with torch.no_grad():                          # transformers' next-token log-probabilities
                after = {(): torch.log_softmax(hf(torch.tensor([prompt])).logits[0, -1], -1)}
                for p in paths:
                    after[tuple(p)] = torch.log_softmax(hf(torch.tensor([prompt + p])).logits[0, -1], -1)
            cum = [sum(float(after[tuple(p[:j])][p[j]]) for j in range(len(p))) for p in paths]
            least = min(cum)
            for prefix, lp in after.items():               # the likeliest child of each left out of the tree
                base = sum(float(after[prefix[:j]][prefix[j]]) for j in range(len(prefix)))
                inside = {p[-1] for p in paths if tuple(p[:-1]) == prefix}
                outside = [float(v) for t, v in enumerate(lp) if t not in inside]
                assert base + max(outside) <= least + 1e-4, (prompt, K, prefix, base + max(outside), least)
            for i, parent in enumerate(parents):           # siblings: the likelier first
                later = [j for j in range(i + 1, K) if parents[j] == parent]
                assert all(cum[i] >= cum[j] - 1e-5 for j in later), (cum, parents)
    assert deep >= 3                                       # (these trees both branch and deepen)
    # near the end of the draft's cache (64 slots): as many nodes as slots are left, then none
    assert len(draft.propose_tree(list(range(62)), 6)[0]) == 2 and draft.propose_tree(list(range(64)), 6) == ([], [])
    chain = ModelDraft(draft.model)
    assert chain.propose_tree(PROMPT, 6) == (chain.propose(PROMPT, 6), [-1, 0, 1, 2, 3, 4])
    draft.model.close()


def test_a_tree_draft_learns_what_its_trees_are_worth(llama5, monkeypatch):
    """A fresh tree draft ranks nodes by its own probabilities; then by what became of its trees (Acceptance:
    the sequence shown next says which nodes were right). The target itself loaded again is always right, but a
    tiny random model is unsure of everything: its first tree is its likeliest tokens side by side (a pass keeps
    one), and once it has seen its first choices kept, its trees are chains, every token of them kept."""
    from offload.generation.drafts import Acceptance
    fresh = Acceptance()
    assert fresh.estimate(0, 0.3) == pytest.approx(0.3) and fresh.estimate(1, 0.05) == pytest.approx(0.05)
    for _ in range(20):
        fresh.record(0, 0.3, True)
    assert fresh.estimate(0, 0.3) > 0.8 and fresh.estimate(1, 0.3) == pytest.approx(0.3)

    model = offload.load(llama5, dtype="float32", max_seq_len=96, progress=False)
    draft = ModelDraft(offload.load(llama5, dtype="float32", max_seq_len=96, progress=False), tree=True)
    tokens, parents = draft.propose_tree(PROMPT, 6)
    assert parents == [-1] * 6                           # six first tokens, none deeper
    # the sequence went on with the first node and a token that is none of its children: the six tried, one kept
    draft.propose_tree(PROMPT + [tokens[0], 127 if tokens[0] != 127 else 126], 6)
    assert draft.acceptance.tries.sum() == 6 and draft.acceptance.hits.sum() == 1
    plain = model.generate([PROMPT], max_new_tokens=40)[0]
    for _ in range(3):
        assert model.generate([PROMPT], max_new_tokens=40, draft=draft, speculate="always")[0] == plain
    stats = model.stats
    assert stats.num_accepted_tokens == stats.num_drafted_tokens == len(plain) - 1 - stats.num_verify_passes
    # its passes: the first reveals the children of the 5 likeliest first tokens; later ones feed the nodes whose
    # children are wanted after the path they share, its KV in the slots before left as it is
    fed = []
    verify = draft.model.engine.verify
    monkeypatch.setattr(draft.model.engine, "verify", lambda tokens, start, parents=None: fed.append(
        (len(tokens), start)) or verify(tokens, start, parents))
    assert draft.propose_tree(PROMPT, 6) == (plain[:6], [-1, 0, 1, 2, 3, 4])
    assert fed[0] == (5, len(PROMPT)) and any(start > len(PROMPT) for _, start in fed[1:]), fed
    draft.model.close()
    model.close()
