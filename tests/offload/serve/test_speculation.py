"""The server's worker with a draft (speculative decoding per request, every row's proposal verified in one pass)
and near the end of the cache; in-process on a tiny float32 model, each job's tokens checked against
`model.generate` alone."""
from __future__ import annotations

import http.client
import json
import signal
import threading

import pytest

import offload
from offload.generation.drafts import ModelDraft
from offload.serve.worker import Worker
from tests.examples.builders import demo_model_dir
from tests.offload.loading.test_gguf import smollm2_path

from .test_server import MAX_SEQ_LEN, QUESTION, job, result, start_server
from .test_server import reference  # noqa: F401 (a fixture)

PROMPTS = ("Hello there", "The sea is", "Café?", "One two three")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("speculation") / "tiny")


@pytest.fixture(scope="module")
def tiny(folder):
    from offload.chat import ChatTokenizer
    model = offload.load(folder, max_batch_size=4, max_seq_len=128, progress=False)
    yield model, ChatTokenizer.from_dir(folder)
    model.close()


class Oracle:
    """A draft that knows each prompt's greedy continuation (what model.generate gives it alone) and proposes
    it, but every third proposal is wrong from its second token on: some passes keep all, some part. A prompt
    without one (a sampled row) is proposed its last token again."""

    def __init__(self, continuations: dict[tuple, list[int] | None]):
        self.continuations, self.calls, self.rows = continuations, 0, []

    def propose(self, tokens, max_tokens):
        self.calls += 1
        for prompt, continuation in self.continuations.items():
            if tuple(tokens[:len(prompt)]) == prompt:
                done = len(tokens) - len(prompt)
                if continuation is None:
                    return [tokens[-1]] * max_tokens
                assert list(tokens[len(prompt):]) == continuation[:done], "a row saw another row's tokens"
                chain = continuation[done:done + max_tokens]
                if self.calls % 3 == 0 and len(chain) > 1:
                    chain = [chain[0]] + [(t + 1) % 128 for t in chain[1:]]
                self.rows.append(len(chain))
                return chain
        return []


def run_jobs(worker, jobs):
    for j in jobs:
        worker.submit(j)
    return [result(j) for j in jobs]


def encode(tokenizer, texts):
    return [tokenizer.encode(text, add_special_tokens=True) for text in texts]


def test_every_rows_proposal_is_verified_in_one_pass_and_greedy_rows_get_their_plain_tokens(tiny):
    """Four jobs at once (one sampled with a seed, shorter): each pass verifies every row's proposal; the greedy
    rows' tokens are what model.generate gives them alone, the sampled row gets its max_tokens; fewer passes
    than plain decoding takes, and the metrics count what was drafted and kept."""
    model, tokenizer = tiny
    prompts = encode(tokenizer, PROMPTS)
    alone = [model.generate([p], max_new_tokens=20, draft=False)[0] for p in prompts[:3]]
    oracle = Oracle({**{tuple(p): a for p, a in zip(prompts[:3], alone)}, tuple(prompts[3]): None})
    model.attach_draft(oracle)
    try:
        worker = Worker(model, tokenizer, max_queue=8, speculate="always")
        worker.stop_ids = frozenset(model.eos_token_ids)
        try:
            jobs = [job(p, 20) for p in prompts[:3]] + [job(prompts[3], 8, temperature=0.9, seed=5)]
            texts = run_jobs(worker, jobs)
        finally:
            worker.stop()
    finally:
        model.attach_draft(None)
    assert [text for text, _ in texts[:3]] == [tokenizer.decode(a) for a in alone[:3]]
    assert [event for _, event in texts] == [("done", "length", 20)] * 3 + [("done", "length", 8)]
    metrics = worker.metrics
    assert metrics["generated_tokens"] == 68
    assert 0 < metrics["accepted_tokens"] < metrics["drafted_tokens"]
    # the plan's budget of positions a pass (at least two a row) is shared by the rows
    assert max(oracle.rows) <= max(1, worker.draft_tokens) and metrics["verify_passes"] > 0
    assert metrics["steps"] < 20                          # plain decoding: a prefill and 19 decode steps at least


def test_a_draft_model_proposes_for_every_row_in_its_own_passes(tiny, folder):
    """The target loaded again as the draft (it proposes the target's own tokens: greedy, or drawn from the
    target's own distribution for a sampled row), holding 4 rows: `sample_rows` runs every row in its passes;
    each greedy job's tokens are what it gets alone, and every proposal is kept (a sampled row's too: the rule
    min(1, p / q) with q = p)."""
    model, tokenizer = tiny
    draft_model = offload.load(folder, max_batch_size=4, max_seq_len=128, progress=False)
    prompts = encode(tokenizer, PROMPTS[:3])
    alone = [model.generate([p], max_new_tokens=16, draft=False)[0] for p in prompts]
    draft = ModelDraft(draft_model)
    calls = []
    sample_rows = draft.sample_rows
    draft.sample_rows = lambda sequences, counts, samplers: calls.append(len(sequences)) or sample_rows(
        sequences, counts, samplers)
    model.attach_draft(draft)
    try:
        worker = Worker(model, tokenizer, max_queue=8, speculate="always")
        worker.stop_ids = frozenset(model.eos_token_ids)
        try:
            texts = run_jobs(worker, [job(p, 16) for p in prompts] + [job(prompts[0], 16, temperature=1.0, seed=2)])
        finally:
            worker.stop()
    finally:
        model.attach_draft(None)
        draft_model.close()
    assert [text for text, _ in texts[:3]] == [tokenizer.decode(a) for a in alone]
    assert all(event == ("done", "length", 16) for _, event in texts)
    assert max(calls) == 4                                # the four rows at once
    assert worker.metrics["accepted_tokens"] == worker.metrics["drafted_tokens"] > 0


def test_a_draft_model_with_fewer_rows_than_the_server_is_refused(tiny, folder):
    model, tokenizer = tiny
    draft_model = offload.load(folder, max_seq_len=128, progress=False)
    model.attach_draft(draft_model)
    try:
        with pytest.raises(ValueError, match="the draft model holds 1 rows .* max_batch_size=4"):
            Worker(model, tokenizer, max_queue=2)
    finally:
        model.attach_draft(None)
        draft_model.close()


def test_a_prompt_joins_while_a_row_is_at_the_end_of_the_cache(tiny):
    """Job 1 runs to the last slot of the 128-token cache; job 2's 100-token prompt arrives when job 1 has 3
    slots left: the pass that decodes job 1 feeds job 2's prompt only as far as every row's slots fit (a
    longer chunk would write job 1's padding past the cache), and both get what they get alone."""
    model, tokenizer = tiny
    first = encode(tokenizer, ["Hello there"])[0]
    second = (encode(tokenizer, ["The sea is blue and the sky is"])[0] * 20)[:100]
    alone = [model.generate([first], max_new_tokens=128 - len(first), draft=False)[0],
             model.generate([second], max_new_tokens=8, draft=False)[0]]
    worker = Worker(model, tokenizer, max_queue=8)
    worker.stop_ids = frozenset(model.eos_token_ids)
    engine, near_the_end = model.engine, threading.Event()
    decode = engine.decode

    def held_decode(tokens, lengths):
        if lengths[0] == 124 and not near_the_end.is_set():
            near_the_end.set()
            while worker.jobs.qsize() == 0:              # job 2 is queued before job 1 feeds slot 125
                threading.Event().wait(0.01)
        return decode(tokens, lengths)
    engine.decode = held_decode
    try:
        jobs = [job(first, 128 - len(first)), job(second, 8)]
        worker.submit(jobs[0])
        assert near_the_end.wait(timeout=120)
        worker.submit(jobs[1])
        texts = [result(j) for j in jobs]
    finally:
        engine.decode = decode
        worker.stop()
    assert [text for text, _ in texts] == [tokenizer.decode(a) for a in alone]
    assert [event for _, event in texts] == [("done", "length", 128 - len(first)), ("done", "length", 8)]


def test_the_server_with_a_draft_answers_as_generate_does(reference):
    """`offload serve --draft ngram --speculate always` with the real SmolLM2: two concurrent greedy requests
    (one whose answer repeats its prompt, where prompt lookup is right) get generate's tokens alone, and the
    passes verified drafts."""
    import openai
    process, port = start_server(smollm2_path(), "--gpu-memory", "400MB", "--max-seq-len", MAX_SEQ_LEN,
                                 "--max-batch-size", 2, "--draft", "ngram", "--speculate", "always",
                                 "--served-model-name", "smol")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
        repeat = [{"role": "user", "content": "Repeat exactly: the quick brown fox jumps over the lazy dog, "
                                              "the quick brown fox jumps over the lazy dog."}]
        answers = [None, None]
        threads = [threading.Thread(target=lambda i=i, m=m: answers.__setitem__(i, client.chat.completions.create(
            model="smol", messages=m, temperature=0, max_tokens=40))) for i, m in enumerate([QUESTION, repeat])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=600)
        for answer, messages in zip(answers, [QUESTION, repeat]):
            text, reason, completion_tokens, _ = reference(messages=messages, max_tokens=40, temperature=0)
            assert answer.choices[0].message.content == text and answer.usage.completion_tokens == completion_tokens
        assert "Paris" in answers[0].choices[0].message.content
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("GET", "/metrics")
        metrics = json.loads(connection.getresponse().read())
        assert 0 < metrics["accepted_tokens"] <= metrics["drafted_tokens"] and metrics["verify_passes"] > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
