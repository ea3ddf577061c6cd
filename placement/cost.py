"""Cost model: predicted seconds of a prefill chunk and of a decode step for a placement.

Every item (decoder layer, embedding, final norm, LM head) costs:
- `transfer_s` on the host->device copy engine: its streamed weights / PCIe bandwidth, plus, for a
  layer whose KV lives on the CPU but is attended on the GPU, that KV / PCIe bandwidth;
- `gpu_s` on the GPU: max(FLOPs / gpu_flops, bytes read / gpu memory bandwidth) for the matmuls and
  for attention (when it runs on the GPU), plus a per-layer launch overhead; quantized matrices also
  cost their dequantization (the dense weight written and read again);
- `cpu_s` on the critical path but off the GPU: CPU attention, max(KV bytes / CPU attention bandwidth,
  FLOPs / CPU FLOP/s) plus a round trip for q, k, v and the output; the CPU embedding lookup's rows;
  a layer computed on the CPU in decode (compute "cpu"): its weights read at the CPU's memory speed (the
  attention bandwidth stands in for it) or its FLOPs, its attention, the hidden states' round trip and a
  per-layer dispatch overhead, with nothing streamed; a MoE layer's routed experts kept on the CPU (experts
  "cpu"): the experts its tokens are routed to read at the CPU's matmul rate (or their FLOPs), the routed
  hidden states' round trip and a dispatch overhead, none of their bytes streamed or read by the GPU; routed
  experts streamed on demand (experts "streamed"): the experts hit, copied after the routing, on the copy
  engine and (the layer waits for them) on the GPU's critical path too.
A MoE layer's tokens read only the experts they are routed to (spec.expert_hit_fraction); a streamed layer
copies all of them.
The copy engine runs ahead of compute through a ring of `prefetch_depth` (d) buffers, so a step costs
- nothing streamed:  T_c                                     (T_c = sum of gpu_s + cpu_s)
- d = 1:             T_c + max(0, T_x - R)   (a copy overlaps only the compute of resident items, R)
- d >= 2:            max(T_x, T_c + max(0, t_max - (d - 1) * T_c / s))
  where T_x is the sum of transfers over the s streamed items and t_max the largest one (a big item,
  e.g. a streamed LM head, stalls compute unless deeper prefetch hides it).
Prefill runs ceil(prompt_len / chunk) chunks, each streams every streamed item again (the LM head only
in the last chunk), plus a pipeline fill of one t_max. Every term is non-increasing when an item
becomes resident, so more GPU memory never predicts less throughput.
"""
from __future__ import annotations

from dataclasses import dataclass

from .hardware import DEFAULT_CPU_LAYER_OVERHEAD_S, Hardware
from .spec import ModelSpec
from .workload import Workload

LAYER_OVERHEAD_S = 60e-6        # kernel launches of one decoder layer (eager PyTorch)
ROUND_TRIP_S = 30e-6            # q, k, v to the host, CPU attention dispatch, output back
MAX_PREFETCH_DEPTH = 4
# up to this many rows a matmul on the CPU reads its matrix as held (packed: never dequantized) and a
# llama-like layer's decode step runs fused (offload/models/cpu_decoder.py)
CPU_DECODE_MAX_ROWS = 4
FUSED_CPU_MATH = "offload.models.decoder:DecoderModel"   # the family math the fused CPU step covers
# below this many tokens in a chunk (a decode step, a short prefill chunk), routed experts kept in CPU RAM are
# computed there or fetched on demand instead of streamed whole (llama.cpp copies weights for batches of 32+)
EXPERTS_STREAM_MIN_TOKENS = 32


def experts_on_the_side(experts: str, tokens: int, num_experts: int, top_k: int, slots: int,
                        decode: bool = False) -> bool:
    """Whether a chunk of `tokens` tokens takes a layer's routed experts kept in CPU RAM where they lie ("cpu":
    computed there) or copies only the routed ones ("streamed": when at most `slots` can be hit), rather than
    streaming them all through the ring: a decode step or a verification pass (`decode`) whatever its length, a
    prefill chunk when shorter than EXPERTS_STREAM_MIN_TOKENS."""
    if experts == "gpu" or (not decode and tokens >= EXPERTS_STREAM_MIN_TOKENS):
        return False
    return experts == "cpu" or min(num_experts, top_k * tokens) <= slots


@dataclass(frozen=True)
class ItemCost:
    """Seconds one item costs in one step: on the copy engine, the GPU, and the CPU."""

    transfer_s: float
    gpu_s: float
    cpu_s: float
    is_streamed: bool


@dataclass(frozen=True)
class StepTime:
    seconds: float
    bottleneck: str


def step_time(groups, prefetch_depth: int, serial: bool = False) -> StepTime:
    """Time of one pass over items given as (count, ItemCost) pairs with a ring of `depth` buffers.
    `serial`: copies and compute share one machine (the CPU standing in for the GPU: its "PCIe" is a
    memcpy reading the same RAM on the same cores), so they add up instead of overlapping."""
    t_x = t_gpu = t_cpu = resident = t_max = 0.0
    num_streamed = 0
    for count, cost in groups:
        if not count:
            continue
        t_gpu += count * cost.gpu_s
        t_cpu += count * cost.cpu_s
        if cost.is_streamed:
            num_streamed += count
            t_x += count * cost.transfer_s
            t_max = max(t_max, cost.transfer_s)
        else:
            resident += count * (cost.gpu_s + cost.cpu_s)
    t_c = t_gpu + t_cpu
    if num_streamed == 0 or serial:
        seconds = t_c + t_x
    elif prefetch_depth <= 1:
        seconds = t_c + max(0.0, t_x - resident)
    else:
        window = (prefetch_depth - 1) * t_c / num_streamed
        seconds = max(t_x, t_c + max(0.0, t_max - window))
    if num_streamed and t_x >= t_c:
        bottleneck = "pcie"
    else:
        bottleneck = "cpu" if t_cpu > t_gpu else "gpu"
    return StepTime(seconds=seconds, bottleneck=bottleneck)


class CostModel:
    """Per-item costs of one model on one hardware for one workload (decode and prefill chunks)."""

    def __init__(self, spec: ModelSpec, hardware: Hardware, workload: Workload,
                 fused_rows: int = CPU_DECODE_MAX_ROWS):
        """`fused_rows`: the most rows (tokens) whose step on the CPU runs fused: a decode step's
        CPU_DECODE_MAX_ROWS; MAX_VERIFY_TOKENS for a speculative decoding pass's tokens (placement.build's
        verify_budget prices a pass as a decode step of its tokens)."""
        self.spec, self.hw, self.wl = spec, hardware, workload
        self.fused_rows = fused_rows
        arch = spec.arch
        self.dtype_bytes = spec.kv_bytes_per_token // (2 * arch.num_kv_heads * arch.head_dim)
        # decode attends over the average cache length of the generation
        self.decode_context = workload.prompt_len + workload.gen_len / 2
        # a layer's ops dispatched: CUDA kernel launches, or on the CPU stand-in the CPU's own dispatch
        # how the CPU multiplies this model's layer matrices in decode (Hardware.cpu_matmul_bytes_per_s)
        bits = {quantization.bits for quantization in spec.layer_layouts.values()}
        self.cpu_matmul_kind = "int4" if 4 in bits else "int8" if bits else "dense"
        # a decode step on the CPU runs fused (offload/models/cpu_decoder.py: what --profile measures) for
        # the plain llama-like decoder with SiLU, full RoPE and no soft-cap, a few rows at a time (fused_rows);
        # otherwise its eager ops cost the default overhead
        self.cpu_step_fused = (arch.family.math == FUSED_CPU_MATH and arch.hidden_act in ("silu", "swish")
                               and arch.rotary_dim == arch.head_dim and arch.attn_logit_softcap is None
                               and workload.batch_size <= fused_rows)
        self.cpu_layer_overhead_s = (hardware.cpu_layer_overhead_s(self.cpu_matmul_kind) if self.cpu_step_fused
                                     else DEFAULT_CPU_LAYER_OVERHEAD_S)
        self.layer_overhead_s = self.cpu_layer_overhead_s if hardware.is_cpu_only else LAYER_OVERHEAD_S

    # ---- building blocks ----------------------------------------------------------------------
    def _gpu(self, flops: float, num_bytes: float) -> float:
        return max(flops / self.hw.gpu_flops, num_bytes / self.hw.gpu_mem_bytes_per_s)

    def read_bytes(self, weight_bytes: int, expert_bytes: int, tokens: int) -> float:
        """What `tokens` tokens through a layer read of its weights: all but the routed experts no token
        picked (spec.expert_hit_fraction)."""
        return weight_bytes - expert_bytes * (1.0 - self.spec.expert_hit_fraction(tokens))

    def cpu_experts_s(self, expert_bytes: int, tokens: int) -> float:
        """The CPU computing a layer's routed experts for `tokens` tokens: the experts hit, read at its matmul
        rate (or their FLOPs), the tokens' hidden states there and back, one dispatch."""
        spec, hw = self.spec, self.hw
        flops = 2 * tokens * spec.arch.num_experts_per_tok * spec.expert_matmul_params
        hidden = 2 * tokens * spec.arch.hidden_size * self.dtype_bytes / hw.pcie_bytes_per_s
        read = expert_bytes * spec.expert_hit_fraction(tokens)
        return ROUND_TRIP_S + max(read / hw.cpu_matmul_bytes_per_s(self.cpu_matmul_kind), flops / hw.cpu_flops) \
            + hidden

    def streamed_experts_s(self, expert_bytes: int, tokens: int) -> float:
        """Copying the experts `tokens` tokens are routed to, after the routing (a host sync): their bytes over
        PCIe plus one round trip; nothing else can hide it, the layer's compute waits for it."""
        return ROUND_TRIP_S + expert_bytes * self.spec.expert_hit_fraction(tokens) / self.hw.pcie_bytes_per_s

    def layer(self, *, weights: str, kv: str, attention: str, weight_bytes: int, num_rows: int,
              num_keys: float, expert_bytes: int = 0, experts: str = "gpu", decode: bool = True) -> ItemCost:
        """One decoder layer processing `num_rows` tokens per sequence, each attending over
        `num_keys` keys on average; `expert_bytes` of its `weight_bytes` are routed experts (the tokens
        read only those they are routed to; a streamed layer copies them all). With `experts` "cpu" a decode
        step computes them on the CPU (neither streamed nor read by the GPU), with "streamed" it copies the ones
        hit (a verification pass too, while its tokens' experts fit the slots sized for a decode step); a prefill
        chunk streams them all, unless it is short enough to do as a decode step does (experts_on_the_side)."""
        spec, hw, B = self.spec, self.hw, self.wl.batch_size
        tokens = B * num_rows
        kv_read = B * num_keys * spec.kv_bytes_per_token
        attn_flops = tokens * num_keys * spec.attention_flops_per_key
        cpu_s = transfer_s = 0.0
        placed = weight_bytes
        on_demand_s = 0.0
        if experts != "gpu":                                  # kept apart in CPU RAM
            placed = weight_bytes - expert_bytes
            arch = spec.arch
            slots = spec.expert_slots(B)         # the stager's, sized for a decode step
            if not experts_on_the_side(experts, tokens, arch.num_experts, arch.num_experts_per_tok, slots, decode):
                transfer_s += expert_bytes / hw.pcie_bytes_per_s
            elif experts == "cpu":
                cpu_s += self.cpu_experts_s(expert_bytes, tokens)
                weight_bytes, expert_bytes = placed, 0
            else:                                             # "streamed": the routed ones copied on demand
                on_demand_s = self.streamed_experts_s(expert_bytes, tokens)
                transfer_s += on_demand_s - ROUND_TRIP_S
        read = self.read_bytes(weight_bytes, expert_bytes, tokens)
        if hw.is_cpu_only and (tokens <= CPU_DECODE_MAX_ROWS or decode and tokens <= self.fused_rows):
            # the CPU stand-in decoding: its matmuls read the matrices as held, at the CPU's rate for them
            matmul_s = max(2 * tokens * spec.layer_matmul_params / hw.gpu_flops,
                           read / hw.cpu_matmul_bytes_per_s(self.cpu_matmul_kind))
            gpu_s = self.layer_overhead_s + matmul_s
        else:
            if spec.layer_layouts:
                # each matrix dequantized next to its matmul: packed bytes read, the dense weight written and read
                read += 2 * spec.layer_matmul_params * self.dtype_bytes
            gpu_s = self.layer_overhead_s + self._gpu(2 * tokens * spec.layer_matmul_params, read)
        if weights == "cpu":
            transfer_s += placed / hw.pcie_bytes_per_s
        if on_demand_s and not hw.is_cpu_only:
            gpu_s += on_demand_s             # the layer waits for its routed experts' copies (they follow routing)
        if attention == "gpu":
            gpu_s += self._gpu(attn_flops, kv_read)
            if kv == "cpu":   # the runtime brings the layer's whole preallocated cache through the ring
                cache_tokens = B * (self.wl.prompt_len + self.wl.gen_len)
                transfer_s += cache_tokens * spec.kv_bytes_per_token / hw.pcie_bytes_per_s
        else:
            arch = spec.arch
            qkvo = tokens * (2 * arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim * self.dtype_bytes
            cpu_s += (ROUND_TRIP_S + max(kv_read / hw.cpu_attention_bytes_per_s, attn_flops / hw.cpu_flops)
                      + qkvo / hw.pcie_bytes_per_s)
        is_streamed = transfer_s > 0 or weights == "cpu" or (kv == "cpu" and attention == "gpu")
        return ItemCost(transfer_s=transfer_s, gpu_s=gpu_s, cpu_s=cpu_s, is_streamed=is_streamed)

    def embedding(self, weights: str, num_rows: int) -> ItemCost:
        rows_bytes = self.wl.batch_size * num_rows * self.spec.arch.hidden_size * self.dtype_bytes
        if weights == "gpu":
            return ItemCost(0.0, self.layer_overhead_s / 4 + self._gpu(0, 2 * rows_bytes), 0.0, False)
        # CPU gather, rows sent over PCIe on the critical path
        cpu_s = rows_bytes / self.hw.cpu_attention_bytes_per_s + rows_bytes / self.hw.pcie_bytes_per_s
        return ItemCost(0.0, self.layer_overhead_s / 4, cpu_s, False)

    def final_norm(self) -> ItemCost:
        return ItemCost(0.0, self.layer_overhead_s / 4 + self._gpu(0, self.spec.final_norm_bytes), 0.0, False)

    def lm_head(self, weights: str, positions: int | None = None) -> ItemCost:
        """Logits of the last position of every row (prefill computes them once, in its last chunk), or of
        `positions` positions (a verification pass: every position of its row)."""
        spec, hw = self.spec, self.hw
        positions = self.wl.batch_size if positions is None else positions
        read = spec.lm_head_read_bytes
        if spec.lm_head_packed and not (hw.is_cpu_only and positions <= CPU_DECODE_MAX_ROWS):
            # dequantized next to its matmul (a few rows on the CPU read it packed): the dense matrix written, read
            read += 2 * spec.arch.vocab_size * spec.arch.embed_dim * self.dtype_bytes
        gpu_s = self.layer_overhead_s / 2 + self._gpu(positions * spec.lm_head_flops_per_token, read)
        if weights == "gpu":
            return ItemCost(0.0, gpu_s, 0.0, False)
        return ItemCost(read / self.hw.pcie_bytes_per_s, gpu_s, 0.0, True)

    # ---- whole passes -------------------------------------------------------------------------
    def decode_layer(self, weights: str, kv: str, attention: str, weight_bytes: int,
                     expert_bytes: int = 0, experts: str = "gpu") -> ItemCost:
        return self.layer(weights=weights, kv=kv, attention=attention, weight_bytes=weight_bytes,
                          num_rows=1, num_keys=self.decode_context, expert_bytes=expert_bytes, experts=experts)

    def decode_layer_on_cpu(self, weight_bytes: int, expert_bytes: int = 0) -> ItemCost:
        """A decode step of a layer computed where its weights lie (weights, KV and attention on the CPU)."""
        spec, hw, B = self.spec, self.hw, self.wl.batch_size
        read = self.read_bytes(weight_bytes, expert_bytes, B)
        matmul_s = max(read / hw.cpu_matmul_bytes_per_s(self.cpu_matmul_kind),
                       2 * B * spec.layer_matmul_params / hw.cpu_flops)
        attention = B * self.decode_context
        attention_s = max(attention * spec.kv_bytes_per_token / hw.cpu_attention_bytes_per_s,
                          attention * spec.attention_flops_per_key / hw.cpu_flops)
        hidden = 2 * B * spec.arch.hidden_size * self.dtype_bytes / hw.pcie_bytes_per_s   # there and back
        return ItemCost(0.0, 0.0, self.cpu_layer_overhead_s + matmul_s + attention_s + hidden, False)

    def prefill_layer(self, weights: str, kv: str, attention: str, weight_bytes: int, expert_bytes: int,
                      experts: str, chunk: int) -> ItemCost:
        prompt = self.wl.prompt_len
        chunk = min(chunk, prompt)
        # averaged over the chunks: keys per query (prompt + chunk) / 2
        return self.layer(weights=weights, kv=kv, attention=attention, weight_bytes=weight_bytes,
                          num_rows=chunk, num_keys=(prompt + chunk) / 2, expert_bytes=expert_bytes,
                          experts=experts, decode=False)

    def prefill_seconds(self, body, *, lm_head: ItemCost, embedding: ItemCost, prefetch_depth: int,
                        chunk: int) -> float:
        """Whole prefill in chunks of `chunk` tokens per row: `body` is (count, ItemCost) of the
        layers and final norm for one chunk, `embedding` is for one chunk; the LM head runs in the
        last chunk only."""
        num_chunks = -(-self.wl.prompt_len // chunk)
        groups = list(body) + [(1, embedding)]
        serial = self.hw.is_cpu_only
        chunk_s = step_time(groups, prefetch_depth, serial).seconds
        last_s = step_time(groups + [(1, lm_head)], prefetch_depth, serial).seconds
        fill = max([c.transfer_s for n, c in groups + [(1, lm_head)] if n and c.is_streamed], default=0.0)
        return (num_chunks - 1) * chunk_s + last_s + fill


def best_decode_step(groups, eligible: int, streamed: ItemCost, on_cpu: ItemCost, prefetch_depth: int,
                     cpu_compute: bool | None, exhaustive: bool = False, serial: bool = False) -> tuple[StepTime, int]:
    """(step time, k): a decode step over `groups` (count, ItemCost) plus `eligible` all-cpu layers, k of them
    computed on the CPU (`on_cpu`) and the rest streamed (`streamed`). cpu_compute True: k = eligible; False:
    k = 0; None: the best k. Moving a layer to the CPU takes its copy off PCIe and adds CPU time to the
    compute chain, so the best k balances the two: tried are 0, all, and the balance point's neighbours (the
    planner's search), or with `exhaustive` every k (the layout it settles on); `serial` as in step_time."""
    if cpu_compute is False or eligible == 0:
        candidates = {0}
    elif cpu_compute:
        candidates = {eligible}
    elif exhaustive:
        candidates = set(range(eligible + 1))
    else:
        all_groups = list(groups) + [(eligible, streamed)]
        t_x = sum(n * c.transfer_s for n, c in all_groups if c.is_streamed)
        t_c = sum(n * (c.gpu_s + c.cpu_s) for n, c in all_groups)
        per_layer = streamed.transfer_s + on_cpu.cpu_s - (streamed.gpu_s + streamed.cpu_s)
        balance = (t_x - t_c) / per_layer if per_layer > 0 else eligible
        middle = int(min(max(balance, 0), eligible))
        candidates = {0, eligible, middle, min(middle + 1, eligible)}
    timed = [(step_time(list(groups) + [(eligible - k, streamed), (k, on_cpu)], prefetch_depth, serial), k)
             for k in sorted(candidates)]
    return min(timed, key=lambda pair: (pair[0].seconds, pair[1]))
