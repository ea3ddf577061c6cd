"""The FastAPI application: `GET /health`, `GET /metrics`, `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`,
with OpenAI's error JSON, the optional API key (Bearer, every route but /health), bounded bodies, and streamed
responses as server-sent events ending in `data: [DONE]`."""
from __future__ import annotations

import asyncio
import hmac
import json
import queue
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .protocol import APIError, Job, chunk, parse_job, response, usage
from .worker import Worker

MAX_BODY_BYTES = 1 << 20
DISCONNECT_CHECK_SECONDS = 0.5     # how often a route waiting for its job's next event looks at its client


def build_app(worker: Worker, *, model_name: str, template, max_seq_len: int, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="offload", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return error_response(APIError(error.status_code, str(error.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, error):
        return error_response(APIError(400, f"invalid request: {error.errors()[:1]}"))

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if api_key is not None and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error_response(APIError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                               type="authentication_error", code="invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return error_response(APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        """Counters since start: passes over the weights (steps), rows they carried, prompt and generated tokens,
        bytes copied host->device (not an OpenAI route: for benchmarks and monitoring)."""
        return dict(worker.metrics)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "offload", "max_model_len": max_seq_len}]}

    async def body_of(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except ValueError as error:
            raise APIError(400, f"the request body is not valid JSON ({error})") from None

    async def run(request: Request, kind: str):
        job = parse_job(await body_of(request), kind=kind, model_name=model_name, tokenizer=worker.tokenizer,
                        template=template, max_seq_len=max_seq_len)
        woken, loop = asyncio.Event(), asyncio.get_running_loop()

        def wake():                                       # (called from the worker's thread)
            try:
                loop.call_soon_threadsafe(woken.set)
            except RuntimeError:                          # the loop is closed: the server has stopped
                pass
        job.wake = wake
        worker.submit(job)
        if job.stream:
            return StreamingResponse(stream_events(request, job, woken), media_type="text/event-stream")
        pieces = []
        try:
            while True:
                event = await next_event(request, job, woken)
                if event is None:                          # the client went away
                    return JSONResponse({}, status_code=499)
                if event[0] == "text":
                    pieces.append(event[1])
                elif event[0] == "error":
                    raise APIError(500, event[1], type="server_error")
                else:
                    return response(job, model_name, "".join(pieces), event[1], event[2])
        finally:
            job.cancelled.set()                             # a no-op once done; frees the row otherwise

    async def next_event(request: Request, job: Job, woken: asyncio.Event):
        """The job's next event as soon as the worker emits it (it sets `woken`), or None once its client has
        disconnected (looked at every DISCONNECT_CHECK_SECONDS while waiting)."""
        while True:
            try:
                return job.events.get_nowait()
            except queue.Empty:
                pass
            if await request.is_disconnected():
                return None
            woken.clear()
            if not job.events.empty():                    # emitted before the clear: its wake-up may be gone
                continue
            try:
                await asyncio.wait_for(woken.wait(), DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                pass

    async def stream_events(request: Request, job: Job, woken: asyncio.Event):
        def sse(data: dict) -> str:
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
        try:
            if job.kind == "chat.completion":
                yield sse(chunk(job, model_name, None, first=True))
            while True:
                event = await next_event(request, job, woken)
                if event is None:
                    return
                if event[0] == "text":
                    yield sse(chunk(job, model_name, event[1]))
                elif event[0] == "error":
                    yield sse(APIError(500, event[1], type="server_error").body())
                    return
                else:
                    yield sse(chunk(job, model_name, None if job.kind == "chat.completion" else "", event[1]))
                    if job.include_usage:
                        yield sse({**chunk(job, model_name, None), "choices": [], "usage": usage(job, event[2])})
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled.set()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await run(request, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await run(request, "text_completion")

    return app
