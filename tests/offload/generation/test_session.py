"""Sessions: each turn equals one call over the whole conversation; errors leave the session usable."""
from __future__ import annotations

import pytest
import torch

import offload

TURNS = [[5, 17, 99, 42, 8], [33, 4, 120], [9, 14, 77, 31, 50, 66, 101], [12, 45]]


def _load(checkpoint_factory, variant, **kwargs):
    path, _ = checkpoint_factory(variant)
    kwargs = {"max_seq_len": 64, "progress": False, "dtype": "float32", **kwargs}
    return offload.load(path, **kwargs)


def _references(model, turns, max_new_tokens, **kwargs):
    """What one model.generate call over the conversation so far returns, turn by turn."""
    conversation, outs = [], []
    for turn in turns:
        conversation += turn
        out = model.generate([conversation], max_new_tokens=max_new_tokens, **kwargs)[0]
        outs.append(out)
        conversation += out
    return outs


@pytest.mark.parametrize("variant, chunk", [("llama", 512), ("mistral_window", 3), ("opt", 2),
                                            ("qwen2_window", 4), ("gemma2", 3), ("gemma3", 4), ("qwen3", 5),
                                            ("mixtral_window", 3), ("qwen2_moe", 4), ("qwen3_moe", 5)])
def test_turns_equal_single_calls_over_the_conversation(checkpoint_factory, variant, chunk):
    model = _load(checkpoint_factory, variant, prefill_chunk_size=chunk)
    want = _references(model, TURNS, 6)
    session = model.session()
    got = [session.generate(turn, max_new_tokens=6) for turn in TURNS]
    assert got == want
    assert session.num_tokens == sum(map(len, TURNS)) + sum(map(len, want))
    assert model.stats.num_prompt_tokens == len(TURNS[-1]) + 1   # only the new tokens were prefilled


def test_sampled_turns_with_seed_and_stop_tokens(checkpoint_factory):
    model = _load(checkpoint_factory, "llama")
    kwargs = dict(temperature=0.9, top_p=0.95, seed=11)
    free = _references(model, TURNS[:2], 8, **kwargs)
    stop = free[0][3]                                     # the first turn ends early on this token
    want = _references(model, TURNS, 8, stop_token_ids=[stop], **kwargs)
    assert want[0][-1] == stop and len(want[0]) <= 4
    session = model.session()
    assert [session.generate(t, max_new_tokens=8, stop_token_ids=[stop], **kwargs) for t in TURNS] == want


def test_stream_and_early_stop(checkpoint_factory):
    model = _load(checkpoint_factory, "llama")
    session = model.session()
    stream = session.stream(TURNS[0], max_new_tokens=10)
    taken = [next(stream) for _ in range(3)]
    stream.close()                                        # the caller stopped reading after 3 tokens
    assert session.tokens == TURNS[0] + taken
    want = model.generate([session.tokens + TURNS[1]], max_new_tokens=5)[0]
    session2 = model.session()                            # same conversation, rebuilt from scratch
    session2.generate(TURNS[0], max_new_tokens=3)
    assert session2.tokens == session.tokens
    assert list(session2.stream(TURNS[1], max_new_tokens=5)) == want
    assert session.generate(TURNS[1], max_new_tokens=5) == want   # cache was reused by session2: rebuilt


def test_too_long_turn_raises_before_touching_the_cache(checkpoint_factory):
    model = _load(checkpoint_factory, "llama", max_seq_len=24)
    want = _references(model, [TURNS[0], TURNS[1]], 6)
    session = model.session()
    assert session.generate(TURNS[0], max_new_tokens=6) == want[0]
    before = session.tokens
    with pytest.raises(ValueError, match="max_seq_len=24"):
        session.generate(list(range(3, 20)), max_new_tokens=6)
    with pytest.raises(ValueError, match="max_seq_len=24"):
        session.stream(TURNS[1], max_new_tokens=30)
    assert session.tokens == before and session.num_tokens == len(before)
    assert session.generate(TURNS[1], max_new_tokens=6) == want[1]


def test_reset_interleaving_and_bad_turns(checkpoint_factory):
    model = _load(checkpoint_factory, "opt")
    session = model.session()
    with pytest.raises(ValueError, match="at least one token"):
        session.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="flat list"):
        session.generate([[1, 2]], max_new_tokens=3)
    with pytest.raises(ValueError, match="invalid token ids"):
        session.generate([1, 500], max_new_tokens=3)
    assert session.num_tokens == 0
    want = _references(model, TURNS[:2], 5)
    session.generate(TURNS[0], max_new_tokens=5)
    model.generate([[7, 7, 7, 7, 7, 7, 7, 7]], max_new_tokens=9)   # overwrites the cache in between
    assert session.generate(TURNS[1], max_new_tokens=5) == want[1]
    session.reset()
    assert session.num_tokens == 0
    assert session.generate(TURNS[0], max_new_tokens=5) == want[0]
    # an empty turn continues the conversation (the last generated token is still pending)
    cont = session.generate([], max_new_tokens=4)
    assert cont == model.generate([TURNS[0] + want[0]], max_new_tokens=4)[0]
    # max_new_tokens=0 only prefills; the next turn then generates from the cached prompt
    fresh = model.session()
    assert fresh.generate(TURNS[0], max_new_tokens=0) == []
    assert fresh.generate(TURNS[1], max_new_tokens=5) == model.generate([TURNS[0] + TURNS[1]], max_new_tokens=5)[0]


def test_tensor_turn(checkpoint_factory):
    model = _load(checkpoint_factory, "llama")
    session = model.session()
    assert session.generate(torch.tensor(TURNS[0]), max_new_tokens=4) == \
        model.generate([TURNS[0]], max_new_tokens=4)[0]



@pytest.mark.parametrize("variant, chunk", [("llama", 512), ("mistral_window", 3), ("opt", 2)])
def test_truncate_equals_a_single_call_over_the_truncated_conversation(checkpoint_factory, variant, chunk):
    model = _load(checkpoint_factory, variant, prefill_chunk_size=chunk)
    held = TURNS[0] + _references(model, TURNS[:1], 6)[0] + TURNS[1]
    # inside the reply, at its end, inside the first prompt, everything, nothing
    keeps = [len(TURNS[0]) + 2, len(TURNS[0]) + 6, 3, len(held), 0]
    wants = {keep: model.generate([held[:keep] + TURNS[3]], max_new_tokens=5)[0] for keep in keeps}
    session = model.session()
    session.generate(held, max_new_tokens=0)
    for keep in keeps:
        session.generate(TURNS[2], max_new_tokens=4)      # something to drop
        session.truncate(keep)
        assert session.tokens == held[:keep] and session.num_tokens == keep
        assert session.generate(TURNS[3], max_new_tokens=5) == wants[keep]
        assert model.stats.num_prompt_tokens == len(TURNS[3])   # only what follows the kept tokens
        assert session.tokens == held[:keep] + TURNS[3] + wants[keep]
        session.truncate(keep)
        session.generate(held[keep:], max_new_tokens=0)   # back to `held` for the next case
        assert session.tokens == held


def test_truncate_when_another_call_owns_the_cache_and_regenerating(checkpoint_factory):
    model = _load(checkpoint_factory, "llama")
    session = model.session()
    first = session.generate(TURNS[0], max_new_tokens=6)
    session.generate(TURNS[1], max_new_tokens=6)
    model.generate([[7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]], max_new_tokens=9)   # overwrites the cache
    keep = len(TURNS[0]) + 4
    session.truncate(keep)
    want = model.generate([session.tokens + TURNS[2]], max_new_tokens=5)[0]
    assert session.generate(TURNS[2], max_new_tokens=5) == want
    assert model.stats.num_prompt_tokens == keep + len(TURNS[2])   # rebuilt from the conversation
    # regenerate the first reply: drop it, then an empty turn (the kept prompt is fully cached)
    session.truncate(len(TURNS[0]))
    assert session.generate([], max_new_tokens=6) == first
    assert model.stats.num_prompt_tokens == 1                      # the last prompt token, re-fed


def test_truncate_after_an_early_stop_and_bad_arguments(checkpoint_factory):
    model = _load(checkpoint_factory, "opt")
    taken = model.generate([TURNS[0]], max_new_tokens=4)[0]
    want = model.generate([TURNS[0] + taken + TURNS[1]], max_new_tokens=5)[0]
    session = model.session()
    stream = session.stream(TURNS[0], max_new_tokens=10)
    assert [next(stream) for _ in range(4)] == taken
    stream.close()
    before = session.tokens
    assert before == TURNS[0] + taken
    for bad, match in [(-1, "use 0 to 9"), (len(before) + 1, "conversation has 9"), (2.0, "int"),
                       (True, "int"), ("3", "int")]:
        with pytest.raises(ValueError, match=match):
            session.truncate(bad)
        assert session.tokens == before
    session.truncate(len(before))                         # a no-op
    assert session.generate(TURNS[1], max_new_tokens=5) == want
    assert model.stats.num_prompt_tokens == len(TURNS[1]) + 1   # the cache was still reused
    session.truncate(0)
    assert session.num_tokens == 0
    with pytest.raises(ValueError, match="at least one token"):
        session.generate([], max_new_tokens=3)


def test_longrope_turns_equal_single_calls_before_and_after_the_original_context(checkpoint_factory):
    """Phi-3 longrope (original context 16): short turns keep the cache; the turn that may cross 16 is
    prefilled from the first token (the cache may be recomputed there), later turns keep it again."""
    model = _load(checkpoint_factory, "phi3_longrope", prefill_chunk_size=4)
    assert model.arch.kv_rebuild_len == 16
    turns = [[5, 17, 99], [33, 4], [9, 14, 77, 31], [12, 45], [60, 61]]
    want = _references(model, turns, 3)
    session = model.session()
    prefilled = []
    for turn in turns:
        session.generate(turn, max_new_tokens=3)
        prefilled.append(model.stats.num_prompt_tokens)
    assert session.tokens == [t for turn, out in zip(turns, want) for t in turn + out]
    assert prefilled[1] == len(turns[1]) + 1                     # before the switch: only the new tokens
    assert prefilled[2] == sum(map(len, turns[:3])) + 3 * 2      # may cross 16: the whole conversation
    assert prefilled[-1] == len(turns[-1]) + 1                   # past it: only the new tokens again
