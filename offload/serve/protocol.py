"""The OpenAI API's request and response shapes: a request body -> a checked `Job` (APIError, with the HTTP status
and OpenAI's error JSON, for anything a client got wrong), a finished job -> the response object or its chunks."""
from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4          # as OpenAI
MAX_STOP_LENGTH = 256


class APIError(Exception):
    """A request the server refuses: `status` and OpenAI's `{"error": {...}}` body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's generation: what to run, and where its events go (filled by the worker, read by the route)."""

    kind: str                         # "chat.completion" or "text_completion"
    prompt_ids: list[int]
    max_tokens: int
    temperature: float | None        # None (and top_p None): the model's generation_config.json defaults
    top_p: float | None
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    events: queue.Queue = field(default_factory=queue.Queue)   # ("text", str) | ("done", reason, n) | ("error", msg)
    cancelled: threading.Event = field(default_factory=threading.Event)
    wake: Callable[[], None] | None = None    # called (from the worker's thread) after each event: the route's waker

    def emit(self, *event) -> None:
        """Queue an event for the route and wake it (the worker's side)."""
        self.events.put(event)
        if self.wake is not None:
            self.wake()


def _number(body: dict, name: str, default, *, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"'{name}' must be {kind} from {low} to {high}, got {value!r}", param=name)
    return value


def _text(content, where: str) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(400, f"{where} must be a string or a list of text parts (this model reads text only)",
                   param="messages")


def parse_job(body, *, kind: str, model_name: str, tokenizer, template, max_seq_len: int) -> Job:
    """A request body (parsed JSON) -> a Job; APIError for anything wrong with it."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    if body.get("model") != model_name:
        if not isinstance(body.get("model"), str):
            raise APIError(400, "'model' is required: the name GET /v1/models lists", param="model")
        raise APIError(404, f"the model {body['model']!r} does not exist; this server serves {model_name!r}",
                       code="model_not_found", param="model")
    if _number(body, "n", 1, low=1, high=1, integer=True) != 1:
        raise APIError(400, "'n' must be 1", param="n")
    if kind == "chat.completion":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        turns = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("system", "developer", "user",
                                                                            "assistant"):
                raise APIError(400, f"messages[{i}] must have a role of system, user or assistant",
                               param="messages")
            role = "system" if message["role"] == "developer" else message["role"]
            turns.append({"role": role, "content": _text(message.get("content"), f"messages[{i}].content")})
        from offload.chat import ChatTemplateError
        try:
            text = template.render(turns, add_generation_prompt=True)
        except ChatTemplateError as error:
            raise APIError(400, f"the model's chat template refused these messages: {error}",
                           param="messages") from None
        prompt_ids = tokenizer.encode(text)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=True)
    room = max_seq_len - len(prompt_ids)
    if room < 1:
        raise APIError(400, f"this model's maximum context length is {max_seq_len} tokens; the prompt has "
                       f"{len(prompt_ids)}", code="context_length_exceeded", param="messages")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, room, low=1, high=max_seq_len, integer=True)
    if max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {max_seq_len} tokens; the prompt has "
                       f"{len(prompt_ids)} and {name} asks for {max_tokens} more", code="context_length_exceeded",
                       param=name)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH for s in stop):
        raise APIError(400, f"'stop' must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options")
    return Job(kind=kind, prompt_ids=prompt_ids, max_tokens=max_tokens,
               temperature=_number(body, "temperature", None, low=0, high=2),
               top_p=_number(body, "top_p", None, low=0, high=1),
               seed=_number(body, "seed", None, low=-2**63, high=2**63 - 1, integer=True),
               stop=stop, stream=stream, include_usage=bool(options.get("include_usage")))


def usage(job: Job, completion_tokens: int) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion_tokens}


def response(job: Job, model_name: str, text: str, finish_reason: str, completion_tokens: int) -> dict:
    """The whole (non-streamed) response object."""
    if job.kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
    return {"id": _id(job), "object": job.kind, "created": job.created, "model": model_name, "choices": [choice],
            "usage": usage(job, completion_tokens)}


def chunk(job: Job, model_name: str, text: str | None, finish_reason: str | None = None, *,
          first: bool = False) -> dict:
    """One streamed chunk: a piece of text, or the last one with the finish reason."""
    if job.kind == "chat.completion":
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        kind = "text_completion"
    return {"id": _id(job), "object": kind, "created": job.created, "model": model_name, "choices": [choice]}


def _id(job: Job) -> str:
    return ("chatcmpl-" if job.kind == "chat.completion" else "cmpl-") + job.id
