"""generate / stream / stats: sampling against transformers, stop tokens, validation, determinism."""
from __future__ import annotations

import shutil

import pytest
import torch

import offload
from offload.generation.sampling import SamplingParams, filter_logits
from tests.offload.builders import hf_greedy

PROMPT = [5, 17, 99, 42, 8, 63, 21, 7, 88]
OTHER = [33, 4, 120, 61]


@pytest.fixture(scope="module")
def llama(checkpoint_factory):
    path, hf = checkpoint_factory("llama")
    return offload.load(path, dtype="float32", max_batch_size=2, max_seq_len=48, progress=False), hf, path


@pytest.mark.parametrize("params", [dict(temperature=0.7), dict(temperature=1.3, top_k=5),
                                    dict(temperature=0.9, top_p=0.8), dict(temperature=1.0, top_k=20, top_p=0.5)])
def test_filters_match_transformers_warpers(params):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(3, 100) * 3
    want = TemperatureLogitsWarper(params["temperature"])(None, logits.clone())
    if "top_k" in params:
        want = TopKLogitsWarper(params["top_k"])(None, want)
    if "top_p" in params:
        want = TopPLogitsWarper(params["top_p"])(None, want)
    torch.testing.assert_close(filter_logits(logits, SamplingParams(**params)), want, atol=0, rtol=0)


def test_seeded_sampling_equals_transformers(llama):
    """Same logits, same warpers, same torch RNG stream: the same sampled tokens as transformers."""
    model, hf, _ = llama
    kwargs = dict(temperature=0.8, top_k=30, top_p=0.9)
    got = model.generate([PROMPT], max_new_tokens=15, seed=1234, **kwargs)[0]
    torch.manual_seed(1234)
    assert got == hf_greedy(hf, PROMPT, 15, do_sample=True, **kwargs)


def test_sampling_is_deterministic_per_seed(llama):
    model, _, _ = llama
    a = model.generate([PROMPT, OTHER], max_new_tokens=12, temperature=1.0, seed=7)
    b = model.generate([PROMPT, OTHER], max_new_tokens=12, temperature=1.0, seed=7)
    c = model.generate([PROMPT, OTHER], max_new_tokens=12, temperature=1.0, seed=8)
    assert a == b and a != c
    assert model.generate([PROMPT], max_new_tokens=12, top_k=1, temperature=1.0, seed=3) == \
        model.generate([PROMPT], max_new_tokens=12)


def test_stop_token_ids_end_the_row_like_transformers(llama):
    model, hf, _ = llama
    free = model.generate([PROMPT, OTHER], max_new_tokens=16)
    stop = free[0][5]
    first = free[0].index(stop)
    got = model.generate([PROMPT, OTHER], max_new_tokens=16, stop_token_ids=[stop])
    assert got[0] == free[0][:first + 1]
    want_other = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
    assert got[1] == want_other
    assert got[0] == hf_greedy(hf, PROMPT, 16, eos_token_id=[2, stop])


def test_eos_from_generation_config(llama, tmp_path):
    import json
    model, _, path = llama
    free = model.generate([PROMPT], max_new_tokens=16)[0]
    copy = tmp_path / "m"
    shutil.copytree(path, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    gen["eos_token_id"] = free[3]
    (copy / "generation_config.json").write_text(json.dumps(gen))
    stopping = offload.load(copy, progress=False)
    assert stopping.generate([PROMPT], max_new_tokens=16)[0] == free[:free.index(free[3]) + 1]


def test_stream_yields_what_generate_returns(llama):
    model, _, _ = llama
    want = model.generate([PROMPT], max_new_tokens=10, temperature=0.9, seed=5)[0]
    stream = model.stream(PROMPT, max_new_tokens=10, temperature=0.9, seed=5)
    assert list(stream) == want
    assert list(model.stream(torch.tensor([PROMPT]), max_new_tokens=10, temperature=0.9, seed=5)) == want


def test_tensor_input_and_stats(llama):
    model, _, _ = llama
    out = model.generate(torch.tensor([PROMPT, PROMPT[::-1]]), max_new_tokens=6, stop_token_ids=[])
    assert out == model.generate([PROMPT, PROMPT[::-1]], max_new_tokens=6)
    s = model.stats
    assert s.num_prompt_tokens == 2 * len(PROMPT) and s.prefill_seconds > 0
    assert s.num_decode_tokens == 2 * 5 and s.decode_tokens_per_second > 0
    assert s.host_to_device_bytes == 0 and "decode" in s.summary()
    assert model.generate([PROMPT], max_new_tokens=0) == [[]]


@pytest.mark.parametrize("bad, message", [
    ([[1, 2], []], "empty"),
    ([[1, 2, 999]], "invalid token ids"),
    ([[1.5, 2]], "invalid token ids"),
    ([list(range(3, 45))], "max_seq_len=48"),
    ([], "non-empty"),
])
def test_bad_requests_raise_and_model_stays_usable(llama, bad, message):
    model, _, _ = llama
    want = model.generate([PROMPT], max_new_tokens=8)
    with pytest.raises(ValueError, match=message):
        model.generate(bad, max_new_tokens=8)
    assert model.generate([PROMPT], max_new_tokens=8) == want


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                                              (dict(top_p=1.5), "top_p"), (dict(max_new_tokens=-1), "max_new")])
def test_bad_sampling_arguments(llama, kwargs, message):
    model, _, _ = llama
    with pytest.raises(ValueError, match=message):
        model.stream([PROMPT], **{"max_new_tokens": 4, **kwargs})


def test_stream_rejects_batches(llama):
    with pytest.raises(ValueError, match="one prompt"):
        llama[0].stream([PROMPT, OTHER])


def test_load_arguments(checkpoint_factory):
    path, _ = checkpoint_factory("opt")
    with pytest.raises(ValueError, match="learned positions"):
        offload.load(path, max_seq_len=65, progress=False)
    with pytest.raises(ValueError, match="max_batch_size"):
        offload.load(path, max_batch_size=0, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        offload.load(path, dtype="int8", progress=False)
    model = offload.load(path, progress=False)
    assert model.max_seq_len == 64 and model.dtype == torch.float32
    # no budget, plan or override on the CPU: the plain path, everything on the device's tier
    assert model.plan.max_seq_len == 64 and model.plan.num_gpu_layers == model.arch.num_layers
    assert all(l.kv == "gpu" for l in model.plan.layers) and model.plan.prefetch_depth == 0
    assert set(model.engine.weights.placement.values()) == {"gpu"}


def test_more_rows_than_max_batch_size_run_in_micro_batches(llama, checkpoint_factory):
    """5 ragged prompts on a model loaded for 2 rows: successive micro-batches of at most 2 rows, each row
    what transformers gives it alone; forward() too; stats cover the whole call."""
    model, hf, _ = llama
    prompts = [PROMPT, OTHER, PROMPT[:3], OTHER + PROMPT, [7]]
    sizes, prefill = [], model.engine.prefill

    def recording_prefill(rows, starts, **kwargs):
        sizes.append(len(rows))
        return prefill(rows, starts, **kwargs)

    model.engine.prefill = recording_prefill
    try:
        got = model.generate(prompts, max_new_tokens=6)
        assert sizes == [2, 2, 1]
        assert got == [hf_greedy(hf, p, 6) for p in prompts]
        assert model.stats.num_prompt_tokens == sum(map(len, prompts))
        assert model.stats.num_decode_tokens == 5 * 5
        logits = model.forward(prompts)
        assert logits.shape == (5, len(OTHER + PROMPT), model.arch.vocab_size)
        torch.testing.assert_close(logits[4, :1], model.forward([[7]])[0], atol=1e-5, rtol=0)
        assert not logits[4, 1:].any()
    finally:
        model.engine.prefill = prefill
