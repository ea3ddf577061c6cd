"""The layer loop: embedding, every decoder layer (weights from a weight source, attention by that layer's
backend), final norm and LM head, over chunks of tokens; logits only where they are needed.

Ragged batches are exact per row: a chunk is right-padded, padded slots sit after every valid token of their
row (so causal masking hides them from valid queries) and are overwritten by the row's next tokens before
anything attends to them.
"""
from __future__ import annotations

import functools

import torch

from offload.devices import canonical_device, same_device, to_device
from offload.attention.host import HostAttention, HostStaging
from offload.attention.contract import AttentionBackend, Chunk
from offload.models.base import FamilyMath
from offload.models.cpu_decoder import CpuDecoderSteps
from offload.weights.expert_stager import ExpertStager
from offload.weights.source import HOST_STAGING, LM_HEAD, ROUTED_EXPERTS, WeightSource, experts_item
from placement.architecture import Architecture
from placement.cost import experts_on_the_side
from placement.workspace import MAX_VERIFY_TOKENS

DEFAULT_PREFILL_CHUNK = 512


def tree_ancestors(parents: list[int]) -> torch.Tensor:
    """Bool [T, T] of a token tree given in order (parents[t] < t, -1 for a root): row t marks t and its ancestors."""
    T = len(parents)
    out = torch.zeros(T, T, dtype=torch.bool)
    for t, parent in enumerate(parents):
        assert -1 <= parent < t, (t, parent)
        if parent >= 0:
            out[t] = out[parent]
        out[t, t] = True
    return out


def _ragged_chunk(rows: list[list[int]], starts: list[int], c0: int, T: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, positions [B, T], start [B]) of the chunk of ragged `rows` from their token c0, T tokens per
    row: row b's tokens written from slot starts[b] + c0, right-padded (id 0, its last position) after its end; a
    row already done writes its padding past its end."""
    B = len(rows)
    ids = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    start = torch.zeros(B, dtype=torch.long)
    for b, row in enumerate(rows):
        valid = max(0, min(T, len(row) - c0))
        row_start = starts[b] + min(c0, len(row))
        ids[b, :valid] = torch.tensor(row[c0:c0 + valid], dtype=torch.long)
        positions[b] = torch.clamp(row_start + torch.arange(T), max=starts[b] + len(row) - 1)
        start[b] = row_start
    return ids, positions, start


class Engine:
    """Runs a family's math over a weight source and per-layer attention backends (see offload/attention/contract.py).

    No implicit device sync anywhere in a step: host inputs reach the device through pinned memory with
    non-blocking copies, once per chunk; the only waits are the event syncs of the CPU-attended layers
    (offload/attention/host.py), the hidden states going to the CPU for layers computed there (decode
    steps of `cpu_layers`), and the caller's read of the sampled tokens."""

    def __init__(self, *, arch: Architecture, model: FamilyMath, weights: WeightSource,
                 backends: list[AttentionBackend], device, dtype: torch.dtype, max_seq_len: int,
                 max_batch_size: int, prefill_chunk_size: int = DEFAULT_PREFILL_CHUNK,
                 staging: HostStaging | None = None, cpu_layers=(), host_model: FamilyMath | None = None,
                 cpu_experts=(), streamed_experts=(), expert_stager: ExpertStager | None = None):
        if len(backends) != arch.num_layers:
            raise ValueError(f"{len(backends)} attention backends for {arch.num_layers} layers")
        # the layers whose decode steps run on the CPU where their weights lie (plan: compute "cpu"); they
        # attend on the CPU and their weights are streamed (prefill) and read in place (decode)
        self.cpu_layers = frozenset(cpu_layers)
        for i in self.cpu_layers:
            if not isinstance(backends[i], HostAttention):
                raise ValueError(f"layer {i} is computed on the cpu: it needs host attention")
            try:
                weights.host_tensors(i)                   # its host copy exists (and its views are made once)
            except KeyError:
                raise ValueError(f"layer {i} is computed on the cpu: its weights must be streamed") from None
        # the MoE layers whose routed experts are an item of their own in CPU RAM: decode steps compute them
        # there, read in place (plan experts "cpu"), or copy the routed ones to the device (`streamed_experts`,
        # through `expert_stager`), their ring turns skipped; prefill chunks stream them whole
        self.cpu_experts, self.streamed_experts = frozenset(cpu_experts), frozenset(streamed_experts)
        self.experts_apart = self.cpu_experts | self.streamed_experts
        if self.cpu_experts & self.streamed_experts:
            raise ValueError(f"layers {sorted(self.cpu_experts & self.streamed_experts)}: experts both cpu and streamed")
        for i in self.experts_apart:
            try:
                weights.host_tensors(experts_item(i))
            except KeyError:
                raise ValueError(f"layer {i}'s experts are kept in CPU RAM: they must be streamed") from None
        if self.streamed_experts - set(expert_stager.spans if expert_stager else ()):
            raise ValueError(f"layers {sorted(self.streamed_experts)} stream their routed experts: they need an "
                             "expert stager for them")
        self.expert_stager = expert_stager
        # each streamed layer's fetch of its routed experts, made once (ROUTED_EXPERTS)
        self._fetch = {i: functools.partial(expert_stager.fetch, i) for i in self.streamed_experts}
        self.host_model = host_model or model         # the family math on the CPU (its RoPE tables there)
        # decode steps of layers on the CPU as one fused call each, where the family's math allows
        self.cpu_steps = CpuDecoderSteps(self.host_model, dtype) if CpuDecoderSteps.supports(self.host_model, dtype) \
            else None
        self._announced: frozenset = frozenset()      # items whose next turn is announced skipped (_announce_ahead)
        if prefill_chunk_size < 1:
            raise ValueError(f"prefill_chunk_size must be >= 1, got {prefill_chunk_size}")
        self.arch, self.model, self.weights, self.backends = arch, model, weights, backends
        self.device, self.dtype = canonical_device(device), dtype
        self.max_seq_len, self.prefill_chunk_size = max_seq_len, prefill_chunk_size
        self.staging = staging            # the CPU-attended layers' shared staging (counts its copies)
        # the plan's workspace holds the logits of max_batch_size positions at a time, and of a verification
        # pass's MAX_VERIFY_TOKENS (placement/workspace.py)
        self.max_batch_size = max_batch_size
        self.max_logit_rows = max(max_batch_size, MAX_VERIFY_TOKENS)
        if weights.is_streamed("final_norm") and weights.is_streamed("lm_head") and weights.prefetch_depth < 2:
            # logits() holds both at once: with one ring buffer the second acquire could never be served
            raise ValueError("final_norm and lm_head are both streamed, which needs a prefetch depth >= 2 "
                             f"(got {weights.prefetch_depth}); keep final_norm on the gpu or use a deeper ring")

    # ---- one chunk through the decoder stack ----------------------------------------------------------
    def run_layers(self, input_ids: torch.Tensor, positions: torch.Tensor, start: torch.Tensor,
                   seq_lens: torch.Tensor | None = None, decode: bool = False,
                   ancestors: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [B, T] int64 (CPU), start [B] (CPU) -> hidden states [B, T, H] on device.

        Row b's tokens go to cache slots start[b] .. start[b]+T-1; `positions` are what RoPE / learned
        positions see (equal to the slot for valid tokens; padded tokens may carry any valid position).
        `decode`: a decode step or a verification pass (a few tokens a row), in which the cpu layers run on the
        CPU where their weights lie (their ring turns skipped) and every layer's experts kept apart are taken on
        the side; else a prefill chunk, which streams them.
        `ancestors`: a token tree's [T, T] (one row; offload/attention/contract.py), its positions given.
        """
        B, T = input_ids.shape
        on_host = self.cpu_layers if decode else frozenset()
        side = self._experts_on_the_side(B * T, decode)
        self._announce_ahead(self._skipped_items(on_host, side))
        assert positions.shape == (B, T) and start.shape == (B,), (input_ids.shape, positions.shape, start.shape)
        assert input_ids.device.type == positions.device.type == start.device.type == "cpu"
        if int(start.max()) + T > self.max_seq_len:
            raise ValueError(f"chunk of {T} tokens at position {int(start.max())} exceeds max_seq_len "
                             f"{self.max_seq_len}")
        chunk = Chunk(start=start, num_tokens=T, device=self.device, ancestors=ancestors)   # shared by every layer
        w = self.weights.acquire("embedding")
        table_device = next(iter(w.values())).device      # the lookup runs where the table lives
        h = self.model.embed(w, to_device(input_ids, table_device), to_device(positions, table_device))
        self.weights.release("embedding")
        h = to_device(h, self.device) if h.device.type == "cpu" else h   # h: [B, T, H]
        host_positions, host_seq_lens = positions, seq_lens             # for the cpu layers' RoPE
        positions = to_device(positions, self.device)
        ctx = self.model.prepare(positions, self.dtype, None if seq_lens is None else to_device(seq_lens, self.device))
        host_ctx = None
        for i, backend in enumerate(self.backends):
            if i in on_host:                   # computed where its weights lie: only h crosses
                self.weights.skip(i)
                if host_ctx is None:
                    host_ctx = self.host_model.prepare(host_positions, self.dtype, host_seq_lens)
                h = h.cpu()
                lw = self._with_experts(i, self.weights.host_tensors(i), side)
                fused = self.cpu_steps and self.cpu_steps.step(i, lw, h, host_ctx, backend, chunk)
                if fused is not None:
                    h = fused
                    continue
                q, k, v = self.host_model.attention_inputs(lw, h, host_ctx, i)
                h = self.host_model.attention_output(lw, h, backend.attend(q, k, v, chunk, lw))
                continue
            h = h if same_device(h.device, self.device) else to_device(h, self.device)
            lw = self._with_experts(i, self.weights.acquire(i), side)
            fused = None
            if decode and self.cpu_steps is not None and self.device.type == "cpu":    # the CPU fallback
                fused = self.cpu_steps.step(i, lw, h, ctx, backend, chunk)
            if fused is not None:
                h = fused
            else:
                q, k, v = self.model.attention_inputs(lw, h, ctx, i)   # q: [B, Hq, T, D]; k, v: [B, Hkv, T, D]
                attn = backend.attend(q, k, v, chunk, lw)              # [B, Hq, T, D]
                h = self.model.attention_output(lw, h, attn)
            self.weights.release(i)
            if i in self.experts_apart and i not in side:
                self.weights.release(experts_item(i))
        return h if same_device(h.device, self.device) else to_device(h, self.device)

    def _experts_on_the_side(self, tokens: int, decode: bool) -> frozenset:
        """The layers whose experts kept in CPU RAM a chunk of `tokens` tokens takes where they lie (cpu) or
        fetches on demand (streamed) instead of through the ring: in a decode step or a verification pass the cpu
        ones, and the streamed ones while the experts its tokens may hit fit the stager's slots (always, in a
        decode step: the slots are sized for it); in a prefill chunk those of a chunk short enough
        (placement.cost.experts_on_the_side, which the planner's prediction follows)."""
        if not self.experts_apart:
            return frozenset()
        a = self.arch
        slots = self.expert_stager.num_slots if self.expert_stager is not None else 0
        return frozenset(i for i in self.experts_apart if experts_on_the_side(
            "cpu" if i in self.cpu_experts else "streamed", tokens, a.num_experts, a.num_experts_per_tok, slots,
            decode))

    def _with_experts(self, layer: int, lw: dict, side) -> dict:
        """Layer `layer`'s weights with its routed experts when they are an item of their own: for a layer in
        `side` (_experts_on_the_side) where they lie on the CPU (cpu experts: the family math computes them
        there) or, for streamed experts, the means to copy the routed ones (ROUTED_EXPERTS: the family math
        calls it once it has routed); else through the ring (released after the layer)."""
        if layer not in self.experts_apart:
            return lw
        item = experts_item(layer)
        if layer not in side:
            lw.update(self.weights.acquire(item))
        elif layer in self.cpu_experts:
            self.weights.skip(item)
            lw.update(self.weights.host_tensors(item))       # (both are fresh dicts: no third copy)
            if self.staging is not None:                     # (a GPU: the routed rows cross through it)
                lw[HOST_STAGING] = self.staging
        else:
            self.weights.skip(item)
            lw[ROUTED_EXPERTS] = self._fetch[layer]
        return lw

    @staticmethod
    def _skipped_items(on_host, side) -> frozenset:
        """The items a step passes over in the ring: its cpu-computed layers and the experts it takes on the
        side."""
        return frozenset([*on_host, *map(experts_item, side)])

    def _announce_ahead(self, items: frozenset) -> None:
        """This step's and the next one's ring turns of `items` pass without copies. Announcements left by the
        step before for items this one streams are dropped first (the ring's cycle restarts, between steps), so
        that they are copied again; the ones it skips too stay, so no copy is issued for them."""
        if self._announced - items:
            self.weights.reset()
            self._announced = frozenset()
        for item in items:
            self.weights.announce_skips(item, 2)
        self._announced = items

    def logits(self, h: torch.Tensor, *, to_host: bool = False) -> torch.Tensor:
        """Final norm + LM head on hidden states [B, K, H] -> float32 logits [B, K, V].

        On the device for at most `max_logit_rows` positions (what the plan's workspace holds); with
        `to_host`, any number, computed `max_logit_rows` positions at a time and each group moved to the
        host as it is done (this blocks on the device: forward() only)."""
        B, K, H = h.shape
        assert to_host or B * K <= self.max_logit_rows, (h.shape, self.max_logit_rows)
        w_norm, w_head = self.weights.acquire("final_norm"), self.weights.acquire("lm_head")
        head_device = w_head[LM_HEAD].device
        flat = h.reshape(B * K, 1, H)                                   # [N, 1, H]
        if to_host:
            groups = [self.model.head(w_norm, w_head, flat[i:i + self.max_logit_rows].to(head_device))[:, 0].cpu()
                      for i in range(0, B * K, self.max_logit_rows)]    # each [<= max_logit_rows, V]
            out = torch.cat(groups).reshape(B, K, -1)
        else:
            out = self.model.head(w_norm, w_head, h.to(head_device)).to(self.device)
        self.weights.release("final_norm")
        self.weights.release("lm_head")
        return out

    # ---- prefill and decode ---------------------------------------------------------------------------
    def prefill(self, rows: list[list[int]], starts: list[int], all_logits: bool = False) -> torch.Tensor:
        """Feed each row's tokens (row b written from cache slot starts[b]) in chunks.

        Returns the float32 logits of each row's last token [B, V] on the device, or with `all_logits`
        those of every token [B, T_max, V] on the host (zeros past a row's end).
        """
        B, C = len(rows), self.prefill_chunk_size
        num_tokens = [len(r) for r in rows]
        assert B == len(starts) and min(num_tokens) >= 1, (B, len(starts), num_tokens)
        T_max = max(num_tokens)
        num_chunks = -(-T_max // C)
        # before announcing this prefill's own skips: drop what earlier steps announced for items it streams
        first = self._experts_on_the_side(B * min(C, T_max), decode=False)
        self._announce_ahead(self._skipped_items(frozenset(), first))
        if not all_logits and num_chunks > 1:
            # only the last chunk needs logits: a streamed head is not copied for the others
            for item in ("final_norm", "lm_head"):
                self.weights.announce_skips(item, num_chunks - 1)
        last_h: list[torch.Tensor | None] = [None] * B
        seq_lens = torch.tensor([s + n for s, n in zip(starts, num_tokens)], dtype=torch.long)
        chunks = []
        for c0 in range(0, T_max, C):
            T = min(C, T_max - c0)
            h = self.run_layers(*_ragged_chunk(rows, starts, c0, T), seq_lens)   # [B, T, H]
            if not all_logits and c0 + T < T_max:
                # no logits for this chunk: pass over the head's items so the streamed cycle stays in step
                self.weights.skip("final_norm")
                self.weights.skip("lm_head")
            if all_logits:
                # [B, T, V] float32 on the host; the GPU holds max_logit_rows positions' logits at a time
                logits = self.logits(h, to_host=True)
                for b in range(B):
                    logits[b, max(0, num_tokens[b] - c0):] = 0.0
                chunks.append(logits)
            for b in range(B):
                if c0 <= num_tokens[b] - 1 < c0 + T:
                    # a copy: a view would keep this chunk's whole [B, T, H] alive, outside the workspace
                    last_h[b] = h[b, num_tokens[b] - 1 - c0].clone()
            del h
        if all_logits:
            return torch.cat(chunks, dim=1)
        return self.logits(torch.stack(last_h)[:, None])[:, 0]      # [B, V]

    def decode(self, tokens: list[int], lengths: list[int]) -> torch.Tensor:
        """One new token per row (host ids) at slot lengths[b] -> float32 logits [B, V] on the device."""
        start = torch.tensor(lengths, dtype=torch.long)
        ids = torch.tensor(tokens, dtype=torch.long).reshape(-1, 1)               # [B, 1]
        h = self.run_layers(ids, start[:, None], start, decode=True)
        return self.logits(h)[:, 0]

    def verify_rows(self, rows: list[list[int]], starts: list[int]) -> list[torch.Tensor]:
        """Each row's tokens (a chain: the last token and a draft's proposal) fed at cache slots starts[b],
        starts[b] + 1, ... in ONE pass over the weights for all rows (the batched form of `verify`, for a server's
        rows) -> the float32 logits of every fed position on the device, [T_b, V] for row b. At most
        `max_logit_rows` positions in all (the plan's workspace holds their logits); row b's T_max slots from
        starts[b] must fit in max_seq_len (a shorter row's padding is written past its tokens)."""
        num_tokens = [len(r) for r in rows]
        assert len(starts) == len(rows) and min(num_tokens) >= 1, (len(starts), num_tokens)
        assert sum(num_tokens) <= self.max_logit_rows, (num_tokens, self.max_logit_rows)
        T = max(num_tokens)
        assert T <= self.prefill_chunk_size, (T, self.prefill_chunk_size)
        seq_lens = torch.tensor([s + n for s, n in zip(starts, num_tokens)], dtype=torch.long)
        h = self.run_layers(*_ragged_chunk(rows, starts, 0, T), seq_lens, decode=True)    # [B, T, H]
        fed = torch.cat([h[b, :n] for b, n in enumerate(num_tokens)])[None]            # [1, sum T_b, H]
        del h
        return list(self.logits(fed)[0].split(num_tokens))                             # each [T_b, V]

    @property
    def max_verify_tokens(self) -> int:
        """Tokens one verify() pass takes at most: the logits the workspace holds, and a chunk's activations
        (at most the prefill chunk of every row)."""
        return min(self.max_logit_rows, self.prefill_chunk_size * self.max_batch_size)

    def verify(self, tokens: list[int], start: int, parents: list[int] | None = None) -> torch.Tensor:
        """One row's tokens fed at cache slots start, start + 1, ... in ONE pass over the weights (as a decode
        step: what streams is streamed once for all of them, the layers computed on the CPU run there, on the T
        tokens) -> float32 logits [T, V] on the device of
        every position (speculative decoding checks a draft with them; the plan's workspace holds the logits
        of MAX_VERIFY_TOKENS positions). `parents`: a token tree, token t under token parents[t] < t (-1: under
        the cached prefix alone); token t then sees the prefix and its ancestors, at position start + its depth.
        None: a chain (each token under the one before)."""
        T = len(tokens)
        assert 1 <= T <= self.max_verify_tokens, (T, self.max_verify_tokens)
        ids = torch.tensor([tokens], dtype=torch.long)                                  # [1, T]
        ancestors = None
        if parents is not None and list(parents) != list(range(-1, T - 1)):
            ancestors = tree_ancestors(parents)                                         # [T, T]
            positions = start + ancestors.sum(dim=1)[None] - 1                          # [1, T]
        else:
            positions = start + torch.arange(T)[None]                                   # [1, T]
        h = self.run_layers(ids, positions, torch.tensor([start]), torch.tensor([int(positions.max()) + 1]),
                            decode=True, ancestors=ancestors)
        return self.logits(h)[0]                                                        # [T, V]

    # ---- control and accounting -------------------------------------------------------------------------
    def reset(self) -> None:
        """Bring the weight source back to the start of its cycle after a step was interrupted (an
        exception, KeyboardInterrupt, or a generator closed mid-step). KV slots written by the
        interrupted step lie past every row's valid length: harmless."""
        self.weights.reset()
        self._announced = frozenset()

    def close(self) -> None:
        """Free what the engine holds: the weight source's resident weights and ring (its host side too)
        and the attention backends' caches. Idempotent."""
        self.weights.close()
        if self.expert_stager is not None:
            self.expert_stager.close()
        if self.cpu_steps is not None:
            self.cpu_steps.close()                  # its views of the weights and caches
        self.backends, self.staging = [], None

    def transfer_counters(self) -> tuple[int, float]:
        """(host->device bytes, seconds waited on transfers) since creation: streamed weights and KV
        through the ring, CPU-attention outputs sent back, and the host waits for their staging copies."""
        stats = self.weights.stats
        num_bytes, wait = stats.bytes_copied, stats.wait_seconds
        if self.expert_stager is not None:
            num_bytes += self.expert_stager.bytes_copied
        if self.staging is not None:
            num_bytes += self.staging.host_to_device_bytes
            wait += self.staging.wait_seconds
        return num_bytes, wait
