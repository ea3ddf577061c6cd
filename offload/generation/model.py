"""`Model`: a loaded checkpoint ready to run: forward, generate, stream, sessions, stats."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from offload.generation.engine import Engine
from offload.generation.drafts import DEFAULT_DRAFT_TOKENS, Draft, ModelDraft, as_draft
from offload.generation.speculative import SPECULATE, draft_steps
from offload.generation.steps import generate_steps
from offload.generation.sampling import Sampler, SamplingParams
from offload.generation.stats import GenerationStats
from placement.architecture import Architecture
from placement.workspace import MAX_VERIFY_TOKENS

DEFAULT_MAX_NEW_TOKENS = 128


def as_rows(input_ids, vocab_size: int) -> list[list[int]]:
    """A LongTensor [B, T] or [T], a list of token ids, or a list of lists (ragged) -> list of rows."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2) or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids must be an integer tensor [B, T] or [T], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        input_ids = input_ids.tolist()
    if not isinstance(input_ids, (list, tuple)) or not input_ids:
        raise ValueError("input_ids must be a non-empty list of token ids, a list of such lists, or a tensor")
    rows = [list(input_ids)] if all(isinstance(t, int) for t in input_ids) else [list(r) for r in input_ids]
    for b, row in enumerate(rows):
        if not row:
            raise ValueError(f"row {b} of input_ids is empty; every prompt needs at least one token")
        bad = [t for t in row if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"row {b} of input_ids has invalid token ids {bad[:5]}; ids must be ints in "
                             f"[0, {vocab_size})")
    return rows


class Model:
    """A model on its device(s). Build it with `offload.load(...)`."""

    def __init__(self, *, arch: Architecture, engine: Engine, max_batch_size: int, max_seq_len: int,
                 eos_token_ids: tuple[int, ...] = (), sampling_defaults: dict | None = None, plan=None,
                 checkpoint=None, ledger=None):
        self.arch, self.engine, self.plan, self.checkpoint = arch, engine, plan, checkpoint
        self.ledger = ledger              # MemoryLedger of the "gpu" tier (offload.loading.memory), if any
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.eos_token_ids = tuple(eos_token_ids)
        self.sampling_defaults = dict(sampling_defaults or {"temperature": 0.0})
        self.stats = GenerationStats()
        self._cache_owner = None          # the Session whose conversation the KV cache holds, if any
        self._active_run = None           # token of the call whose steps are running (see _inference)
        self.is_closed = False
        self.draft_model: Model | None = None    # the draft model loaded with it (offload.load(draft=...)), owned
        self.default_draft: Draft | None = None   # the draft of calls given none (offload.load(draft=...))
        self._model_draft: ModelDraft | None = None   # the ModelDraft of the last other draft model given

    def attach_draft(self, draft, tree: bool = False) -> None:
        """Make `draft` the default draft of this model's calls: a Draft, or a Model loaded for this one (then
        owned: closed with it; proposing token trees with `tree`)."""
        if isinstance(draft, Model):
            self.draft_model = draft
            draft = ModelDraft(draft, vocab_size=self.arch.vocab_size, tree=tree)
        self.default_draft = draft

    def claim_cache(self, owner) -> None:
        """`owner` (a Session, a ModelDraft) writes the KV cache now: any earlier owner rebuilds from its tokens."""
        self._cache_owner = owner
        self._active_run = None

    @property
    def device(self) -> torch.device:
        return self.engine.device

    @property
    def dtype(self) -> torch.dtype:
        return self.engine.dtype

    # ---- what sessions and generate share ----------------------------------------------------------
    def sampling_params(self, temperature=None, top_k=None, top_p=None, seed=None) -> SamplingParams:
        """The sampling of a call: what is given, else generation_config.json's defaults (greedy without)."""
        d = self.sampling_defaults
        return SamplingParams(temperature=d.get("temperature", 0.0) if temperature is None else float(temperature),
                              top_k=d.get("top_k") if top_k is None else top_k,
                              top_p=d.get("top_p") if top_p is None else top_p, seed=seed)

    def stop_ids(self, stop_token_ids=None) -> frozenset[int]:
        """The checkpoint's eos ids plus `stop_token_ids` (an id or a list of ids)."""
        extra = [stop_token_ids] if isinstance(stop_token_ids, int) else list(stop_token_ids or ())
        return frozenset(self.eos_token_ids) | frozenset(int(t) for t in extra)

    @property
    def cache_owner(self):
        """The Session whose conversation the KV cache holds, or None (another call wrote it last)."""
        return self._cache_owner

    def check_request(self, num_rows: int, num_tokens: int, max_new_tokens: int, what: str = "request") -> None:
        """Raise ValueError (touching nothing) unless the cache can hold one batch of the request."""
        if self.is_closed:
            raise RuntimeError("the model is closed (model.close() freed its memory); load it again")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        if num_rows > self.max_batch_size:
            raise ValueError(f"batch of {num_rows} rows exceeds max_batch_size={self.max_batch_size}; "
                             "load the model with a larger max_batch_size")
        if num_tokens + max_new_tokens > self.max_seq_len:
            raise ValueError(f"{what} needs {num_tokens} tokens + max_new_tokens={max_new_tokens} = "
                             f"{num_tokens + max_new_tokens} positions, more than max_seq_len="
                             f"{self.max_seq_len}; shorten it or load with a larger max_seq_len")

    def check_draft(self, draft, draft_tokens: int | None, speculate: str = "adaptive") -> tuple[Draft | None, int]:
        """(the Draft of a call, the tokens it proposes a pass at most). Draft: None = the draft loaded with the
        model (offload.load(draft=...)) if any, False = none, a loaded Model (a ModelDraft of it, kept across
        calls so that its cache follows the conversation), else as_draft's. draft_tokens: None = the plan's
        budget (plan.predicted.verify_tokens: the tokens a pass verifies for about a step's cost) less the
        pass's own last token, at least 1. ValueError for a bad draft, a draft_tokens outside
        1..MAX_VERIFY_TOKENS - 1 (what a pass verifies: the last token and the proposal) or an unknown
        `speculate`."""
        if speculate not in SPECULATE:
            raise ValueError(f"speculate must be one of {', '.join(map(repr, SPECULATE))}, got {speculate!r}")
        if draft_tokens is None:
            draft_tokens = max(1, self.plan.predicted.verify_tokens - 1) if self.plan is not None \
                else DEFAULT_DRAFT_TOKENS
        elif isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) \
                or not 1 <= draft_tokens < MAX_VERIFY_TOKENS:
            raise ValueError(f"draft_tokens must be an integer from 1 to {MAX_VERIFY_TOKENS - 1} (or None: the "
                             f"plan's budget), got {draft_tokens!r}")
        return self._draft(draft), draft_tokens

    def _draft(self, draft) -> Draft | None:
        if draft is None:
            return self.default_draft
        if draft is False:
            return None
        if isinstance(draft, Model):
            if draft is self:
                raise ValueError("a model cannot be its own draft (their KV cache is one); load the checkpoint a "
                                 "second time, e.g. quantized, to draft with a copy of it")
            if draft.is_closed:
                raise ValueError("the draft model is closed (draft.close() freed its memory); load it again")
            # the same ModelDraft for the same draft model (its cache follows the conversation across calls)
            for known in (self.default_draft, self._model_draft):
                if isinstance(known, ModelDraft) and known.model is draft:
                    return known
            self._model_draft = ModelDraft(draft, vocab_size=self.arch.vocab_size)
            return self._model_draft
        return as_draft(draft)

    def micro_batches(self, rows: list[list[int]]) -> list[list[list[int]]]:
        """`rows` in successive batches of at most max_batch_size rows (the cache's, and the plan's)."""
        return [rows[i:i + self.max_batch_size] for i in range(0, len(rows), self.max_batch_size)]

    def run_steps(self, rows: list[list[int]], *, starts: list[int], max_new_tokens: int, params: SamplingParams,
                  stop_ids: frozenset[int], cache_lengths: list[int], owner=None, sampler: Sampler | None = None,
                  stats: GenerationStats | None = None, draft: Draft | None = None,
                  draft_tokens: int = DEFAULT_DRAFT_TOKENS, context: list[int] | None = None,
                  speculate: str = "adaptive") -> Iterator[list[int | None]]:
        """The step iterator of ONE batch (at most max_batch_size rows, validated by the caller): row b is
        written into the KV cache from slot starts[b]; each step yields every row's new token (None once
        stopped). `cache_lengths` is kept up to date (offload/generation/steps.py); `owner` is who the cache holds
        afterwards (a Session, or None); `stats` (default: a new model.stats) accumulates the timings.
        `draft` (as_draft): speculative decoding for a batch of one row (offload/generation/speculative.py), up to
        `draft_tokens` proposed per pass, verified when it pays or always (`speculate`); `context`: the tokens
        the cache holds before starts[0] (the draft sees them too). A batch of several rows, or a model whose
        cache may be rebuilt, decodes plainly (the stats say why)."""
        if stats is None:
            stats = self.stats = GenerationStats()
        if max_new_tokens == 0 and owner is None:
            return iter(())
        self._cache_owner = owner
        sampler = sampler or Sampler(params, self.device)
        if draft is not None and len(rows) > 1:
            stats.draft_unused = f"a batch of {len(rows)} rows (speculative decoding runs one row at a time)"
        elif draft is not None and self.arch.kv_rebuild_len is not None:
            stats.draft_unused = "this model's cache is rebuilt past its original context (Phi-3 longrope)"
        elif draft is not None:
            steps = draft_steps(self.engine, rows[0], start=starts[0], max_new_tokens=max_new_tokens, sampler=sampler,
                                stop_ids=stop_ids, stats=stats, cache_lengths=cache_lengths, draft=draft,
                                draft_tokens=draft_tokens, context=context, speculate=speculate)
            return self._inference(steps, stats)
        steps = generate_steps(self.engine, rows, starts=starts, max_new_tokens=max_new_tokens,
                               sampler=sampler, stop_ids=stop_ids, stats=stats, cache_lengths=cache_lengths)
        return self._inference(steps, stats)

    # ---- public API ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids) -> torch.Tensor:
        """float32 logits [B, T, V] for every position, on the CPU (rows of a ragged list: zeros past their
        end); more rows than max_batch_size run in successive micro-batches. Each prefill chunk's logits
        leave the device as they are computed, so the GPU never holds more than the plan's workspace."""
        rows = as_rows(input_ids, self.arch.vocab_size)
        num_tokens = max(map(len, rows))
        self.check_request(min(len(rows), self.max_batch_size), num_tokens, 0)
        self._cache_owner = None
        self._active_run = None
        out = []
        try:
            for part in self.micro_batches(rows):
                logits = self.engine.prefill(part, [0] * len(part), all_logits=True)    # [b, T_part, V]
                out.append(torch.nn.functional.pad(logits, (0, 0, 0, num_tokens - logits.shape[1])))
        except BaseException:             # KeyboardInterrupt too: the model stays usable
            self.engine.reset()
            raise
        return torch.cat(out)

    __call__ = forward

    def generate(self, input_ids, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 stop_token_ids=None, draft=None, draft_tokens: int | None = None,
                 speculate: str = "adaptive") -> list[list[int]]:
        """New token ids of each row: exactly max_new_tokens, or fewer ending with the stop token produced.

        input_ids: LongTensor [B, T], or a list of token-id lists of any lengths (each row gets what it would
        get alone); more rows than max_batch_size run in successive micro-batches of max_batch_size rows
        (never past the plan's memory; a seed seeds the call once). temperature None/top_k/top_p default to
        generation_config.json (greedy without it); stop tokens are the checkpoint's eos ids plus
        `stop_token_ids`. `model.stats` covers the whole call.
        draft: speculative decoding for one prompt: None = the draft model loaded with this one
        (offload.load(draft=...)) if any, False = none, "ngram" (prompt lookup), a loaded Model with the same
        tokenizer (small and resident), or an object with a `propose(tokens, max_tokens)` method
        (offload/generation/drafts.py); up to `draft_tokens` tokens verified a pass (None: the plan's budget,
        plan.predicted.verify_tokens, less one); `speculate`: "adaptive" verifies when this call's measured pass
        and step times say it pays (offload/generation/speculative.py), "always" whenever the draft proposes.
        Greedy: the same tokens as without a draft in float32 (16-bit passes of several tokens round differently from single steps, so
        near-ties may break the other way); sampling: the same distribution.
        """
        rows = as_rows(input_ids, self.arch.vocab_size)
        draft, draft_tokens = self.check_draft(draft, draft_tokens, speculate)
        self.check_request(min(len(rows), self.max_batch_size), max(map(len, rows)), max_new_tokens)
        params, stop_ids = self.sampling_params(temperature, top_k, top_p, seed), self.stop_ids(stop_token_ids)
        sampler, stats = Sampler(params, self.device), GenerationStats()
        self.stats = stats
        out: list[list[int]] = []
        for part in self.micro_batches(rows):
            new = [[] for _ in part]
            for step in self.run_steps(part, starts=[0] * len(part), max_new_tokens=max_new_tokens, params=params,
                                       stop_ids=stop_ids, cache_lengths=[0] * len(part), sampler=sampler,
                                       stats=stats, draft=draft, draft_tokens=draft_tokens, speculate=speculate):
                for b, token in enumerate(step):
                    if token is not None:
                        new[b].append(token)
            out.extend(new)
        return out

    def stream(self, input_ids, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, temperature: float | None = None,
               top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
               stop_token_ids=None, draft=None, draft_tokens: int | None = None,
               speculate: str = "adaptive") -> Iterator[int]:
        """Like `generate` for ONE prompt, yielding each new token id as soon as it is chosen."""
        rows = as_rows(input_ids, self.arch.vocab_size)
        if len(rows) != 1:
            raise ValueError(f"stream takes one prompt, got {len(rows)} rows; use generate for batches")
        draft, draft_tokens = self.check_draft(draft, draft_tokens, speculate)
        self.check_request(1, len(rows[0]), max_new_tokens)        # now, not at the first next()
        steps = self.run_steps(rows, starts=[0], max_new_tokens=max_new_tokens,
                               params=self.sampling_params(temperature, top_k, top_p, seed),
                               stop_ids=self.stop_ids(stop_token_ids), cache_lengths=[0], draft=draft,
                               draft_tokens=draft_tokens, speculate=speculate)
        return (step[0] for step in steps)

    def session(self):
        """A conversation (batch 1) that keeps its KV cache between turns."""
        from offload.generation.session import Session
        return Session(self)

    # ---- internals ----------------------------------------------------------------------------------
    def _inference(self, steps, stats: GenerationStats):
        """Run a generator under inference_mode across its resumptions; add the transfer stats after
        each step (the first step's bytes are the prefill's too); reset the engine when a step is interrupted
        (any exception, KeyboardInterrupt) or the caller closes the generator (GeneratorExit), so the model
        stays usable. The reset is skipped when
        another call has started since (a late close of an abandoned generator must not disturb it)."""
        token = object()
        self._active_run = token
        bytes_before, wait_before = self.engine.transfer_counters()
        bytes_base, wait_base = stats.host_to_device_bytes, stats.transfer_wait_seconds
        is_first = True                   # the first step is the prefill's (and the first token)
        while True:
            try:
                with torch.inference_mode():
                    try:
                        item = next(steps)
                    except StopIteration:
                        return
                    finally:
                        if self._active_run is token:
                            num_bytes, wait = self.engine.transfer_counters()
                            stats.host_to_device_bytes = bytes_base + num_bytes - bytes_before
                            stats.transfer_wait_seconds = wait_base + wait - wait_before
                            if is_first:
                                stats.prefill_host_to_device_bytes += num_bytes - bytes_before
                is_first = False
                yield item
            except BaseException:
                if self._active_run is token:
                    self.engine.reset()
                raise

    def close(self) -> None:
        """Free the model's memory now (resident weights, prefetch ring, KV caches, the host copies of
        streamed weights) instead of when it is garbage-collected; the ledger is credited. Idempotent;
        any call afterwards raises RuntimeError."""
        if self.is_closed:
            return
        self.is_closed = True
        self._active_run = None
        self.engine.close()
        if self.draft_model is not None:
            self.draft_model.close()
        if self.ledger is not None:
            for category in ("kv_cache", "workspace", "buffers"):     # (buffers: the expert stager's)
                self.ledger.free(category, self.ledger.current_bytes(category))

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def memory_report(self) -> str:
        """Per tier (the "gpu" tier: the compute device; the host): weights, KV cache, buffers, workspace,
        total and free, planned and (gpu tier) as allocated now, llama.cpp style."""
        from offload.loading.report import memory_report
        return memory_report(self)

    def __repr__(self) -> str:
        return (f"Model({self.arch.model_type}, {self.arch.num_layers} layers, {self.dtype}, {self.device}, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len})")

