"""The thread that runs jobs on the model with continuous batching: it owns the model (no other thread touches
it) and its KV cache's rows. Each step, jobs from the bounded queue take the free rows; a step feeds every row at
once, in one pass over the weights (what a streamed layer costs is paid once for all of them): a decoding row its
last token, a new row the next chunk of its prompt (prefill interleaved with the others' decoding, so their
streams keep flowing). Each row samples with its own request's settings and seed, and leaves when it is done;
a cancelled job (its client went away) frees its row at the next step. Each job's text goes, as it is decoded,
to its event queue. With a draft, a decode step may instead be a verification pass: every row's last token and
its draft's chain in one pass (Engine.verify_rows), each row keeping what its own sampler accepts."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from offload.chat.detokenizer import IncrementalDetokenizer
from offload.generation.sampling import Sampler, SamplingParams
from offload.generation.speculative import SPECULATE, checked_ids
from offload.generation.steps import read_tokens

from .protocol import APIError, Job

log = logging.getLogger(__name__)
GREEDY = Sampler(SamplingParams(), "cpu")        # a free row's, for a draft model proposing for every row


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
    generated: list[int] = field(default_factory=list)   # its tokens so far; the last is fed at the next step

    @property
    def is_prefilling(self) -> bool:
        return self.length < len(self.job.prompt_ids)


class Worker:
    """Runs `Job`s on `model`, up to model.max_batch_size at once (the plan's rows), at most `max_queue` waiting.
    With the model's draft (offload.load(draft=...)), decode steps verify each row's proposal in one pass for all
    rows (speculative decoding per request: greedy rows get exactly their plain tokens, sampled rows their
    distribution), when it pays (`speculate` "adaptive": this server's measured pass and step times) or always."""

    def __init__(self, model, tokenizer, *, max_queue: int, speculate: str = "adaptive"):
        if model.arch.kv_rebuild_len is not None and model.max_seq_len > model.arch.kv_rebuild_len:
            raise ValueError(f"this model's cache is rebuilt past {model.arch.kv_rebuild_len} tokens (longrope), "
                             f"which a batch of requests cannot share: serve it with --max-seq-len "
                             f"{model.arch.kv_rebuild_len} or less")
        self.draft, self.draft_tokens = model.check_draft(None, None, speculate)
        draft_model = getattr(self.draft, "model", None)
        if draft_model is not None and draft_model.max_batch_size < model.max_batch_size:
            raise ValueError(f"the draft model holds {draft_model.max_batch_size} rows of KV cache for the server's "
                             f"{model.max_batch_size}: load it with max_batch_size={model.max_batch_size}")
        self.pays = SPECULATE[speculate]()
        self.model, self.tokenizer = model, tokenizer
        self.stop_ids = frozenset(tokenizer.stop_token_ids) | frozenset(model.eos_token_ids)
        self.rows: list[Row | None] = [None] * model.max_batch_size
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.is_stopping = False
        self.metrics = {"steps": 0, "batched_rows": 0, "prompt_tokens": 0, "generated_tokens": 0,
                        "host_to_device_bytes": 0, "verify_passes": 0, "drafted_tokens": 0,
                        "accepted_tokens": 0}   # written by the thread, read by GET /metrics
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
                        row.job.emit("error", f"{type(error).__name__}: {error}")
                        self.rows[b] = None
        for row in self.rows:
            if row is not None:
                row.job.emit("error", "the server is shutting down")
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.emit("error", "the server is shutting down")

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
        before it is fed a throwaway token at its slot 0): a prefill chunk where a row is prefilling, else a
        decode step or, with a draft, a verification pass; then the rows that decoded take their new tokens."""
        engine = self.model.engine
        self.model.claim_cache(self)                         # a Session that wrote the cache rebuilds
        rows = self.rows[:max(b for b, row in enumerate(self.rows) if row is not None) + 1]
        busy = [row for row in rows if row is not None]
        # each row is fed (or padded to) the same number of slots from its length: all must fit in the cache
        room = min(self.model.max_seq_len - row.length for row in busy)
        t0 = time.perf_counter()
        if any(row.is_prefilling for row in busy):
            chunk = min(engine.prefill_chunk_size, room)
            feeds, starts = [], []
            for row in rows:
                if row is None:                                  # a free row: a throwaway token at slot 0
                    feed, start = [0], 0
                elif row.is_prefilling:
                    feed, start = row.job.prompt_ids[row.length:row.length + chunk], row.length
                else:
                    feed, start = [row.generated[-1]], row.length
                feeds.append(feed)
                starts.append(start)
            logits = engine.prefill(feeds, starts)                           # [B, V]
            for row, fed in zip(rows, feeds):
                if row is not None:
                    row.length += len(fed)
            self._sample(rows, logits)
        else:
            proposals = self._proposals(rows, room) if self.draft is not None and self.pays.now() else []
            if any(chain for chain, _ in proposals):
                yielded = self._verify(rows, proposals)
                self.pays.measured(time.perf_counter() - t0, yielded / len(busy))
            else:
                logits = engine.decode([row.generated[-1] if row else 0 for row in rows],
                                       [row.length if row else 0 for row in rows])               # [B, V]
                for row in busy:
                    row.length += 1
                self._sample(rows, logits)
                self.pays.measured(time.perf_counter() - t0, None)
        metrics = self.metrics
        metrics["steps"] += 1
        metrics["batched_rows"] += len(busy)
        metrics["host_to_device_bytes"] = engine.transfer_counters()[0]

    def _sample(self, rows: list[Row | None], logits: torch.Tensor) -> None:
        """The rows done prefilling take a token from their logits [B, V]: each row's own sampler, then ONE
        device->host read of the step's tokens."""
        ready = [b for b, row in enumerate(rows) if row is not None and not row.is_prefilling]
        if ready:
            tokens = read_tokens(torch.cat([rows[b].sampler.sample(logits[b:b + 1]) for b in ready]))
            for b, token in zip(ready, tokens):
                self._take(b, rows[b], token)

    def _proposals(self, rows: list[Row | None], room: int) -> list[tuple[list[int], torch.Tensor | None]]:
        """The draft's chain for each decoding row (none for free rows), and the distributions a draft model drew
        a sampled row's chain from (None otherwise). A pass verifies the plan's budget of positions in all (what
        costs about a step), but at least two a row (its last token and one proposed, as a lone generation
        proposes at least one) and at most what the workspace holds logits for; the proposed ones are shared
        among the rows, each bounded by its max_tokens and the cache."""
        engine = self.model.engine
        decoding = [b for b, row in enumerate(rows) if row is not None]
        spare = min(engine.max_logit_rows - len(rows), max(self.draft_tokens + 1 - len(rows), len(decoding)))
        share = [0] * len(rows)
        for k, b in enumerate(decoding):
            row = rows[b]
            share[b] = max(0, min(spare // len(decoding) + (k < spare % len(decoding)), room - 1,
                                  engine.prefill_chunk_size - 1, row.job.max_tokens - len(row.generated) - 1))
        if not any(share):
            return []
        sequences = [[*row.job.prompt_ids, *row.generated] if row else [0] for row in rows]
        probs = [None] * len(rows)
        if hasattr(self.draft, "sample_rows"):     # a draft model: all rows in its passes, each sampling as it does
            proposed, probs = self.draft.sample_rows(sequences, share, [row.sampler if row else GREEDY for row in rows])
        else:
            proposed = [self.draft.propose(seq, n) if n else [] for seq, n in zip(sequences, share)]
        vocab_size = engine.arch.vocab_size
        return [(checked_ids(self.draft, [int(t) for t in chain][:n], vocab_size), None if q is None else q[:n])
                for chain, n, q in zip(proposed, share, probs)]

    def _verify(self, rows: list[Row | None], proposals: list[tuple[list[int], torch.Tensor | None]]) -> int:
        """One pass feeding each row its last token and its proposal; each row keeps what its sampler accepts
        (the rejected tokens' KV rolled back by the row's length) and takes the tokens. Returns how many."""
        feeds = [[row.generated[-1], *chain] if row else [0] for row, (chain, _) in zip(rows, proposals)]
        logits = self.model.engine.verify_rows(feeds, [row.length if row else 0 for row in rows])   # [T_b, V] each
        yielded = 0
        for b, row in enumerate(rows):
            if row is None:
                continue
            chain, draft_probs = proposals[b]
            path, tokens = row.sampler.accept(logits[b], chain, list(range(-1, len(chain) - 1)), draft_probs)
            row.length += 1 + len(path)                    # the last token and the kept proposal, in place
            self.metrics["verify_passes"] += bool(chain)
            self.metrics["drafted_tokens"] += len(chain)
            self.metrics["accepted_tokens"] += len(path)
            for token in tokens:
                yielded += 1
                self._take(b, row, token)
                if self.rows[b] is not row:                # it finished
                    break
        return yielded

    def _take(self, b: int, row: Row, token: int) -> None:
        """Row b's new token: its text to the job, or the job's end (a stop token or string, max_tokens)."""
        job = row.job
        row.generated.append(token)
        self.metrics["generated_tokens"] += 1
        is_stop_token = token in self.stop_ids
        text = "" if is_stop_token else row.stops.push(row.detokenizer.push(token))
        is_last = is_stop_token or row.stops.done or len(row.generated) >= job.max_tokens
        if is_last and not row.stops.done:             # what was held back: an incomplete character, the start
            text += row.stops.push(row.detokenizer.flush())     # of a stop string that never came
            text += "" if row.stops.done else row.stops.flush()
        if text:
            job.emit("text", text)
        if is_last:
            self._finish(b, "stop" if is_stop_token or row.stops.done else "length")

    def _finish(self, b: int, reason: str) -> None:
        row, self.rows[b] = self.rows[b], None
        row.job.emit("done", reason, len(row.generated))
