"""`offload serve` as users run it: a subprocess on a free loopback port with the real SmolLM2, driven by the
`openai` client (what chat UIs, editors and agents use) and by raw HTTP; its answers checked against
`model.generate` on the same model in this process."""
from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from offload.serve.protocol import APIError, Job
from offload.serve.worker import StopStrings, Worker
from tests.examples.builders import REPO, demo_model_dir
from tests.offload.loading.test_gguf import smollm2_path

from ..cli.run import one_error_line, run_offload

KEY = "test-key"
NAME = "smol"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_SEQ_LEN = 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(*args) -> tuple[subprocess.Popen, int]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "offload", "serve", *map(str, args), "--port", str(port)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited: {process.stderr.read()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, port
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise AssertionError("the server did not start listening")


@pytest.fixture(scope="module")
def server():
    process, port = start_server(smollm2_path(), "--gpu-memory", "400MB", "--max-seq-len", MAX_SEQ_LEN,
                                 "--api-key", KEY, "--served-model-name", NAME)
    yield port
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def client(server):
    import openai
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def reference():
    """model.generate on the same file, in this process: what each request must get alone."""
    import offload
    from offload.chat import open_chat
    chat = open_chat(smollm2_path())
    model = offload.load(chat.path, max_seq_len=MAX_SEQ_LEN, progress=False)

    def complete(messages=None, prompt=None, max_tokens=64, **sampling):
        ids = chat.tokenizer.encode(chat.template.render(messages)) if messages else \
            chat.tokenizer.encode(prompt, add_special_tokens=True)
        new = model.generate([ids], max_new_tokens=max_tokens, stop_token_ids=chat.tokenizer.stop_token_ids,
                             draft=False, **sampling)[0]
        stopped = bool(new) and new[-1] in chat.tokenizer.stop_token_ids
        return chat.tokenizer.decode(new), ("stop" if stopped else "length"), len(new), len(ids)
    yield complete
    model.close()


def test_the_real_model_answers_as_generate_does(client, reference):
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=64)
    text, reason, completion_tokens, prompt_tokens = reference(messages=QUESTION, temperature=0)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].message.content == text and answer.choices[0].finish_reason == reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    completion = client.completions.create(model=NAME, prompt="The capital of France is", max_tokens=6,
                                           temperature=0)
    text, reason, _, _ = reference(prompt="The capital of France is", max_tokens=6, temperature=0)
    assert completion.choices[0].text == text and completion.choices[0].finish_reason == reason == "length"
    assert [m.id for m in client.models.list().data] == [NAME]


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=0.9, seed=7)], ids=["greedy", "seeded"])
def test_streaming_equals_not_streaming(client, sampling):
    whole = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, **sampling)
    pieces, usage, reasons = [], None, []
    for part in client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=40, stream=True,
                                               stream_options={"include_usage": True}, **sampling):
        if part.choices:
            pieces.append(part.choices[0].delta.content or "")
            reasons.append(part.choices[0].finish_reason)
        usage = part.usage or usage
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and usage == whole.usage
    text = "".join(p.choices[0].text for p in client.completions.create(
        model=NAME, prompt="Once upon a time", max_tokens=12, stream=True, **sampling))
    assert text == client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=12,
                                             **sampling).choices[0].text


def test_concurrent_requests_get_what_they_get_alone(client):
    questions = ["What is the capital of France?", "What is 2 + 2?", "Name a color.", "Who wrote Hamlet?"]
    ask = lambda q: client.chat.completions.create(                      # noqa: E731
        model=NAME, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=24).choices[0].message.content
    alone = [ask(q) for q in questions]
    together = [None] * len(questions)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(questions[i])))
               for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert together == alone


def test_stop_strings_end_the_text_before_them(client):
    answer = client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, stop=["Paris", "Rome"])
    assert answer.choices[0].message.content == "The capital of France is " and answer.choices[0].finish_reason == "stop"


def raw(port, method, path, body=None, key=KEY, headers=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={**({"Authorization": f"Bearer {key}"} if key else {}),
                                                         "Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, json.loads(response.read() or b"{}")


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": NAME}, 400, "'messages' must be a non-empty list"),
    ({"messages": QUESTION}, 400, "'model' is required"),
    ({"model": "gpt-4o", "messages": QUESTION}, 404, "the model 'gpt-4o' does not exist"),
    ({"model": NAME, "messages": QUESTION, "n": 2}, 400, "'n' must be an integer from 1 to 1"),
    ({"model": NAME, "messages": QUESTION, "max_tokens": 0}, 400, "'max_tokens' must be an integer from 1"),
    ({"model": NAME, "messages": QUESTION, "max_tokens": MAX_SEQ_LEN}, 400, "maximum context length is 1024"),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * 1500}]}, 400, "maximum context length"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "must have a role"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text only"),
    ({"model": NAME, "messages": QUESTION, "stop": ["a"] * 5}, 400, "'stop' must be"),
    ({"model": NAME, "messages": QUESTION, "temperature": "hot"}, 400, "'temperature' must be a number"),
])
def test_bad_requests_get_openai_errors_and_disturb_nothing(server, client, body, status, message):
    got, error = raw(server, "POST", "/v1/chat/completions", body)
    assert got == status and message in error["error"]["message"], error
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert "Paris" in client.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                                     max_tokens=16).choices[0].message.content


def test_the_api_key_guards_every_route_but_health(server):
    assert raw(server, "GET", "/health", key=None) == (200, {"status": "ok"})
    for key in (None, "wrong"):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            status, error = raw(server, method, path, {"model": NAME, "messages": QUESTION}, key=key)
            assert status == 401 and error["error"]["code"] == "invalid_api_key"
    status, error = raw(server, "POST", "/v1/completions", b"x" * (2 << 20))
    assert status == 413


def test_a_client_that_disconnects_frees_the_model(server, client):
    """A stream abandoned after its first token stops there: the next request is answered at once (were the
    abandoned one generated to its 900 tokens first, the client's timeout would expire)."""
    connection = http.client.HTTPConnection("127.0.0.1", server, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": NAME, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 900, "temperature": 0, "stream": True}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    import openai
    quick = openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key=KEY, max_retries=0, timeout=60)
    assert "Paris" in quick.chat.completions.create(model=NAME, messages=QUESTION, temperature=0,
                                                    max_tokens=16).choices[0].message.content


def test_sigterm_and_ctrl_c_stop_the_server_cleanly(tmp_path):
    for sig in (signal.SIGTERM, signal.SIGINT):
        process, port = start_server(smollm2_path(), "--max-seq-len", 256)
        assert raw(port, "GET", "/health", key=None)[0] == 200
        process.send_signal(sig)
        assert process.wait(timeout=60) == 0
        assert "Traceback" not in process.stderr.read()


def test_serve_mistakes_are_one_line(server):
    assert "cannot listen on 127.0.0.1:" in one_error_line(
        run_offload("serve", smollm2_path(), "--max-seq-len", 256, "--port", server), "offload serve")
    assert "--port must be 1-65535" in one_error_line(run_offload("serve", smollm2_path(), "--port", 0),
                                                      "offload serve")


def test_stop_strings_hold_back_what_may_start_one():
    stops = StopStrings(["</end>", "STOP"])
    assert [stops.push(p) for p in ("Hello <", "/e", "x> and S", "TO", "P more")] == \
        ["Hello ", "", "</ex> and ", "", ""]
    assert stops.done
    plain = StopStrings([])
    assert plain.push("a</") == "a</" and not plain.done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama and its tokenizer, loaded here for the worker's own tests (4 rows)."""
    import offload
    from offload.chat import ChatTokenizer
    folder = demo_model_dir(tmp_path_factory.mktemp("serve") / "tiny")
    model = offload.load(folder, max_batch_size=4, max_seq_len=128, progress=False)
    yield model, ChatTokenizer.from_dir(folder)
    model.close()


class Gate:
    """Holds the engine's next prefill until `open()`: the worker is busy for as long as a test needs; counts
    the engine's passes over the weights."""

    def __init__(self, engine):
        self.engine, self.passes, self.event = engine, 0, threading.Event()
        self.prefill, self.decode = engine.prefill, engine.decode
        engine.prefill, engine.decode = self._prefill, self._decode

    def _prefill(self, *args, **kwargs):
        self.event.wait(timeout=60)
        self.passes += 1
        return self.prefill(*args, **kwargs)

    def _decode(self, *args, **kwargs):
        self.passes += 1
        return self.decode(*args, **kwargs)

    def open(self):
        self.event.set()

    def close(self):
        self.engine.prefill, self.engine.decode = self.prefill, self.decode


def job(prompt_ids, max_tokens, **options):
    return Job(kind="text_completion", prompt_ids=prompt_ids, max_tokens=max_tokens, stream=False,
               **{"temperature": 0.0, "top_p": None, "seed": None, "stop": [], **options})


def result(job, timeout=60):
    pieces = []
    while True:
        event = job.events.get(timeout=timeout)
        if event[0] != "text":
            return "".join(pieces), event
        pieces.append(event[1])


def test_requests_join_the_running_batch_and_get_what_they_get_alone(tiny):
    """Job 1 is prefilled alone; jobs 2 and 3 (one sampled with a seed) arrive while it runs and join the batch at
    the next step, their prompts prefilled in the pass that decodes job 1: fewer passes than one at a time, and
    each job's tokens are what model.generate gives it alone."""
    model, tokenizer = tiny
    prompts = [tokenizer.encode(text, add_special_tokens=True) for text in ("Hello there", "The sea is", "Café?")]
    samplings = [{}, {}, {"temperature": 0.8, "seed": 3}]
    alone = [model.generate([p], max_new_tokens=12, draft=False, **s)[0]
             for p, s in zip(prompts, samplings)]
    worker = Worker(model, tokenizer, max_queue=8)
    worker.stop_ids = frozenset(model.eos_token_ids)     # as generate stops (the tokenizer adds none here)
    gate = Gate(model.engine)
    try:
        jobs = [job(p, 12, **s) for p, s in zip(prompts, samplings)]
        worker.submit(jobs[0])
        while worker.jobs.qsize():
            time.sleep(0.01)                              # job 1 is in its prefill, held at the gate
        worker.submit(jobs[1])
        worker.submit(jobs[2])
        gate.open()
        texts = [result(j) for j in jobs]
    finally:
        gate.close()
        worker.stop()
    assert [text for text, _ in texts] == [tokenizer.decode(ids) for ids in alone]
    assert all(event == ("done", "length", 12) for _, event in texts)
    assert gate.passes == 13 < 3 * 12                    # 1 + (jobs 2, 3 prefilled beside job 1) + 11 decodes


def test_text_held_for_a_stop_string_is_sent_when_the_reply_ends_without_it(tiny):
    """A stop string's start held back ("Hel" of "Hello") is sent when a stop token or max_tokens ends the reply."""
    model, tokenizer = tiny
    prompt = tokenizer.encode("Hello there", add_special_tokens=True)
    alone = model.generate([prompt], max_new_tokens=6, draft=False)[0]
    text = tokenizer.decode(alone)
    worker = Worker(model, tokenizer, max_queue=2)
    worker.stop_ids = frozenset(model.eos_token_ids)
    try:
        whole = job(prompt, 6, stop=[text[-2:] + "\u2603never"])          # its start is the reply's end
        worker.submit(whole)
        assert result(whole) == (text, ("done", "length", 6))
        before = tokenizer.decode(alone[:-1])
        ended = job(prompt, 6, stop=[before[-2:] + "\u2603never"])
        worker.stop_ids = frozenset({alone[-1]})                              # the 6th token now stops it
        worker.submit(ended)
        assert result(ended) == (before, ("done", "stop", 6))
    finally:
        worker.stop()


def test_a_full_queue_is_503_and_the_worker_goes_on(tiny):
    model, tokenizer = tiny
    prompt = tokenizer.encode("Hello there", add_special_tokens=True)
    worker = Worker(model, tokenizer, max_queue=1)
    worker.rows = worker.rows[:1]                         # one row: the second job waits in the queue
    gate = Gate(model.engine)
    try:
        running, waiting, refused = job(prompt, 4), job(prompt, 4), job(prompt, 4)
        worker.submit(running)
        while worker.jobs.qsize():
            time.sleep(0.01)
        worker.submit(waiting)
        with pytest.raises(APIError) as error:
            worker.submit(refused)
        assert error.value.status == 503 and error.value.code == "queue_full"
        gate.open()
        assert result(running)[0] == result(waiting)[0]
    finally:
        gate.close()
        worker.stop()
    assert not worker.thread.is_alive()


def test_a_route_is_woken_by_its_jobs_events_not_by_polling(tiny, monkeypatch):
    """With the route's look at its client every hour, replies (whole and streamed) still come: each event the
    worker emits wakes the route at once."""
    from fastapi.testclient import TestClient

    import offload.serve.app as app_module
    model, tokenizer = tiny
    monkeypatch.setattr(app_module, "DISCONNECT_CHECK_SECONDS", 3600.0)
    worker = Worker(model, tokenizer, max_queue=4)
    replies = []

    def ask():
        with TestClient(app_module.build_app(worker, model_name="tiny", template=None, max_seq_len=128)) as http:
            body = {"model": "tiny", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}
            replies.append(http.post("/v1/completions", json=body).json()["choices"][0]["text"])
            with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as stream:
                chunks = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: {")]
            replies.append("".join(c["choices"][0]["text"] for c in chunks))
    try:
        thread = threading.Thread(target=ask, daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a route waited for its next look instead of being woken"
    finally:
        worker.stop()
    assert len(replies) == 2 and replies[0] == replies[1] != ""
