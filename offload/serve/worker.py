"""The thread that runs jobs on the model with continuous batching: it owns the model (no other thread touches
it) and its KV cache's rows. Each step, jobs from the bounded queue take the free rows; a step feeds every row at
once, in one pass over the weights (what a streamed layer costs is paid once for all of them): a decoding row its
last token, a new row the next chunk of its prompt (prefill interleaved with the others' decoding, so their
streams keep flowing). Each row samples with its own request's settings and seed, and leaves when it is done;
a cancelled job (its client went away) frees its row at the next step. Each job's text goes, as it is decoded,
to its event queue."""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch

from offload.chat.detokenizer import IncrementalDetokenizer
from offload.generation.sampling import Sampler
from offload.generation.steps import read_tokens

from .protocol import APIError, Job

log = logging.getLogger(__name__)


class StopStrings:
    """Text pieces in, text safe to send out: what could still be the start of a stop string is held back;
    `done` once a stop string appeared (the text before it is sent, it and what follows are not)."""

    def __init__(self, stop: list[str]):
        self.stop, self.held, self.done = stop, "", False

    def push(self, piece: str) -> str:
        if not self.stop:
            return piece
        text = self.held + piece
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.done, self.held = True, ""
            return text[:min(found)]
        keep = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


@dataclass
class Row:
    """A job in a row of the KV cache."""

    job: Job
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stops: StopStrings
    length: int = 0                   # its tokens in the cache
    last: int | None = None           # the token sampled last, fed at the next step
    count: int = 0                    # tokens generated

    @property
    def is_prefilling(self) -> bool:
        return self.length < len(self.job.prompt_ids)


class Worker:
    """Runs `Job`s on `model`, up to model.max_batch_size at once (the plan's rows), at most `max_queue` waiting."""

    def __init__(self, model, tokenizer, *, max_queue: int):
        if model.arch.kv_rebuild_len is not None and model.max_seq_len > model.arch.kv_rebuild_len:
            raise ValueError(f"this model's cache is rebuilt past {model.arch.kv_rebuild_len} tokens (longrope), "
                             f"which a batch of requests cannot share: serve it with --max-seq-len "
                             f"{model.arch.kv_rebuild_len} or less")
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = frozenset(tokenizer.stop_token_ids) | frozenset(model.eos_token_ids)
        self.rows: list[Row | None] = [None] * model.max_batch_size
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.is_stopping = False
        self.metrics = {"steps": 0, "batched_rows": 0, "prompt_tokens": 0, "generated_tokens": 0,
                        "host_to_device_bytes": 0}   # written by the thread, read by GET /metrics
        self.thread = threading.Thread(target=self._run, name="offload-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; APIError 503 when the queue is full."""
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy ({self.jobs.maxsize} requests waiting); retry later",
                           type="server_error", code="queue_full") from None

    def stop(self) -> None:
        """Ends the thread after the step it runs; jobs still queued or running get an error event."""
        self.is_stopping = True
        try:
            self.jobs.put_nowait(None)      # wakes a thread waiting for work
        except queue.Full:
            pass
        self.thread.join(timeout=60)

    # ---- the thread -----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self.is_stopping:
            self._admit(wait=not any(self.rows))
            for b, row in enumerate(self.rows):
                if row is not None and row.job.cancelled.is_set():
                    self.rows[b] = None                      # its client went away: the row is free
            if not any(self.rows) or self.is_stopping:
                continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as error:                       # noqa: BLE001 (the model stays usable)
                log.exception("a batch step failed")
                self.model.engine.reset()
                for b, row in enumerate(self.rows):
                    if row is not None:
                        row.job.events.put(("error", f"{type(error).__name__}: {error}"))
                        self.rows[b] = None
        for row in self.rows:
            if row is not None:
                row.job.events.put(("error", "the server is shutting down"))
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.events.put(("error", "the server is shutting down"))

    def _admit(self, wait: bool) -> None:
        """Free rows take queued jobs (waiting for one when no row is busy)."""
        while None in self.rows and not self.is_stopping:
            try:
                job = self.jobs.get(timeout=0.5) if wait else self.jobs.get_nowait()
            except queue.Empty:
                if wait:
                    continue
                return
            wait = False
            if job is None or job.cancelled.is_set():
                continue
            self.metrics["prompt_tokens"] += len(job.prompt_ids)
            params = self.model.sampling_params(job.temperature, None, job.top_p, job.seed)
            self.rows[self.rows.index(None)] = Row(
                job=job, sampler=Sampler(params, self.model.device), stops=StopStrings(job.stop),
                detokenizer=IncrementalDetokenizer(self.tokenizer, context_ids=job.prompt_ids))

    def _step(self) -> None:
        """One pass over the weights for every busy row (rows past the last busy one are left out; a free row
        before it is fed a throwaway token at its slot 0), then each finished prompt or decoding row samples."""
        engine = self.model.engine
        self.model.claim_cache(self)                         # a Session that wrote the cache rebuilds
        rows = self.rows[:max(b for b, row in enumerate(self.rows) if row is not None) + 1]
        if any(row is not None and row.is_prefilling for row in rows):
            feeds, starts = [], []
            for row in rows:
                if row is None:                                  # a free row: a throwaway token at slot 0
                    feed, start = [0], 0
                elif row.is_prefilling:
                    feed, start = row.job.prompt_ids[row.length:row.length + engine.prefill_chunk_size], row.length
                else:
                    feed, start = [row.last], row.length
                feeds.append(feed)
                starts.append(start)
            logits = engine.prefill(feeds, starts)                           # [B, V]
            for row, fed in zip(rows, feeds):
                if row is not None:
                    row.length += len(fed)
        else:
            logits = engine.decode([row.last if row else 0 for row in rows], [row.length if row else 0 for row in rows])
            for row in rows:
                if row is not None:
                    row.length += 1
        busy = [row for row in rows if row is not None]
        ready = [b for b, row in enumerate(rows) if row is not None and not row.is_prefilling]
        if ready:       # each row's own sampler, then ONE device->host read of the step's tokens
            tokens = read_tokens(torch.cat([rows[b].sampler.sample(logits[b:b + 1]) for b in ready]))
            for b, token in zip(ready, tokens):
                self._take(b, rows[b], token)
        metrics = self.metrics
        metrics["steps"] += 1
        metrics["batched_rows"] += len(busy)
        metrics["host_to_device_bytes"] = engine.transfer_counters()[0]

    def _take(self, b: int, row: Row, token: int) -> None:
        """Row b's new token: its text to the job, or the job's end (a stop token or string, max_tokens)."""
        job = row.job
        row.count += 1
        self.metrics["generated_tokens"] += 1
        is_stop_token = token in self.stop_ids
        text = "" if is_stop_token else row.stops.push(row.detokenizer.push(token))
        is_last = is_stop_token or row.stops.done or row.count >= job.max_tokens
        if is_last and not row.stops.done:             # what was held back: an incomplete character, the start
            text += row.stops.push(row.detokenizer.flush())     # of a stop string that never came
            text += "" if row.stops.done else row.stops.flush()
        if text:
            job.events.put(("text", text))
        if is_last:
            return self._finish(b, "stop" if is_stop_token or row.stops.done else "length")
        row.last = token

    def _finish(self, b: int, reason: str) -> None:
        row, self.rows[b] = self.rows[b], None
        row.job.events.put(("done", reason, row.count))
