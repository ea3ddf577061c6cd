"""Plan: where every weight and KV-cache layer lives, and what that costs. The runtime's contract.

Placements are the strings "gpu" / "cpu". A layer's `weights` "cpu" means they live in pinned host
memory and are streamed into a ring of `prefetch_depth` GPU buffers of `slot_bytes` each ahead of
use; `kv` "cpu" means its KV cache lives in host memory, and then `attention` says whether the CPU
attends over it ("cpu": q, k, v go to the host) or the GPU does after copying the cache through the
ring ("gpu"). The `embedding` on the CPU means the lookup runs there and only the B x T rows go to the
GPU; the `lm_head` on the CPU means it is streamed through the ring like a layer. With tied embeddings
the one table is counted under `embedding` (`lm_head.weight_bytes` is 0) and both share a placement.
Memory totals are derived (properties), so a Plan cannot disagree with itself; budgets are checked
on construction: memory.gpu.total + cuda_reserve_bytes <= budget.gpu_bytes, memory.cpu.total <=
budget.cpu_bytes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .workload import Workload
from .workspace import DEFAULT_VERIFY_TOKENS
from .jsonfile import parse_json_object, read_json_object

PLACEMENTS = ("gpu", "cpu")
EXPERT_PLACEMENTS = ("gpu", "cpu", "streamed")   # a MoE layer's routed experts (LayerPlan.experts)
BOTTLENECKS = ("pcie", "gpu", "cpu")
FORMAT = "offload-plan/2"     # /2: prefill_chunk_size and slot_bytes (were prefill_chunk_tokens, buffer_bytes)


class PlanError(ValueError):
    """No plan fits the budgets, or a plan (built or read from JSON) is inconsistent."""


def _check_placement(where: str, value: str) -> None:
    if value not in PLACEMENTS:
        raise PlanError(f"{where} must be 'gpu' or 'cpu', got {value!r}")


def _check_bytes(where: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlanError(f"{where} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class LayerPlan:
    """One decoder layer: where its weights and KV cache live, where it attends, where its decode steps are
    computed, and their bytes.

    compute "cpu": a layer whose weights, KV and attention are all on the cpu is computed there during
    decode steps (only its hidden states cross PCIe); prefill chunks still stream its weights to the gpu.
    experts (a mixture-of-experts layer): "gpu": its routed experts are part of its weights, placed as
    `weights` says (resident, or streamed with the layer); "cpu": they live in CPU RAM and, in decode steps,
    the CPU computes them for the tokens routed to them (only those tokens' hidden states cross PCIe), while
    prefill chunks (where nearly every expert is hit) stream them to the GPU through the ring, in a slot of
    their own; `weights` then places the rest of the layer (attention, norms, router, shared expert);
    "streamed": they live in CPU RAM too and prefill chunks stream them alike, but in decode steps only the
    experts the router picked are copied to the GPU (one copy each, into the plan's `expert_slots` buffers of
    `expert_slot_bytes`) and computed there."""

    index: int
    weights: str
    kv: str
    attention: str
    weight_bytes: int
    kv_bytes: int          # K and V for batch_size x (prompt_len + gen_len) tokens, model dtype
    compute: str = "gpu"   # where decode steps run
    expert_bytes: int = 0  # of weight_bytes, the routed experts' (a MoE layer's tokens read only theirs)
    experts: str = "gpu"   # where the routed experts live and run (see above)

    def __post_init__(self):
        for key in ("weights", "kv", "attention", "compute"):
            _check_placement(f"layer {self.index} {key}", getattr(self, key))
        if self.experts not in EXPERT_PLACEMENTS:
            raise PlanError(f"layer {self.index} experts must be one of {', '.join(EXPERT_PLACEMENTS)}, "
                            f"got {self.experts!r}")
        if self.attention == "cpu" and self.kv != "cpu":
            raise PlanError(f"layer {self.index}: attention on the cpu needs its kv on the cpu")
        if self.compute == "cpu" and (self.weights, self.kv, self.attention) != ("cpu", "cpu", "cpu"):
            raise PlanError(f"layer {self.index}: computing on the cpu needs its weights, kv and attention on the "
                            f"cpu (got weights {self.weights}, kv {self.kv}, attention {self.attention})")
        _check_bytes(f"layer {self.index} weight_bytes", self.weight_bytes)
        _check_bytes(f"layer {self.index} kv_bytes", self.kv_bytes)
        _check_bytes(f"layer {self.index} expert_bytes", self.expert_bytes)
        if self.expert_bytes > self.weight_bytes:
            raise PlanError(f"layer {self.index}: expert_bytes {self.expert_bytes} exceed weight_bytes "
                            f"{self.weight_bytes}")
        if self.experts_apart and not self.expert_bytes:
            raise PlanError(f"layer {self.index} has no routed experts to place {self.experts} (a dense layer)")
        if self.compute == "cpu" and self.experts == "streamed":
            raise PlanError(f"layer {self.index} is computed on the cpu: its experts cannot stream to the gpu "
                            "(place them 'cpu' or 'gpu')")

    @property
    def experts_apart(self) -> bool:
        """The routed experts live in CPU RAM apart from the layer ("cpu" or "streamed")."""
        return self.experts != "gpu"

    @property
    def may_compute_on_cpu(self) -> bool:
        """Its decode steps may run on the cpu: weights, KV and attention there, experts not streamed."""
        return (self.weights, self.kv, self.attention) == ("cpu", "cpu", "cpu") and self.experts != "streamed"

    @property
    def placed_bytes(self) -> int:
        """The bytes `weights` places: all of the layer's but experts kept apart in CPU RAM."""
        return self.weight_bytes - (self.expert_bytes if self.experts_apart else 0)

    @property
    def is_streamed(self) -> bool:
        """Goes through the buffer ring: streamed weights, or a CPU cache the GPU attends over."""
        return self.weights == "cpu" or (self.kv == "cpu" and self.attention == "gpu")

    @property
    def streamed_bytes(self) -> int:
        """Bytes this layer streams each step, all in one ring slot (0 when not streamed)."""
        kv = self.kv_bytes if self.kv == "cpu" and self.attention == "gpu" else 0
        return (self.placed_bytes if self.weights == "cpu" else 0) + kv

    @property
    def ring_slot_bytes(self) -> int:
        """The largest ring slot the layer needs: its streamed bytes, or its experts kept apart (prefill streams
        them)."""
        return max(self.streamed_bytes, self.expert_bytes if self.experts_apart else 0)

    def to_dict(self) -> dict:
        return {"index": self.index, "weights": self.weights, "kv": self.kv, "attention": self.attention,
                "compute": self.compute, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
                "expert_bytes": self.expert_bytes, "experts": self.experts}


@dataclass(frozen=True)
class ItemPlan:
    """The embedding, final norm or LM head: where its weights live and their bytes."""

    weights: str
    weight_bytes: int
    read_bytes: int = -1   # what the GPU reads (a tied LM head reads the table); -1: weight_bytes

    def __post_init__(self):
        _check_placement("item weights", self.weights)
        _check_bytes("item weight_bytes", self.weight_bytes)
        if self.read_bytes == -1:
            object.__setattr__(self, "read_bytes", self.weight_bytes)
        _check_bytes("item read_bytes", self.read_bytes)

    def to_dict(self) -> dict:
        return {"weights": self.weights, "weight_bytes": self.weight_bytes, "read_bytes": self.read_bytes}


@dataclass(frozen=True)
class Budget:
    gpu_bytes: int
    cpu_bytes: int

    def __post_init__(self):
        _check_bytes("budget gpu_bytes", self.gpu_bytes)
        _check_bytes("budget cpu_bytes", self.cpu_bytes)


@dataclass(frozen=True)
class GpuMemory:
    weights: int
    kv_cache: int
    buffers: int          # the prefetch ring and the routed experts' slots
    workspace: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + self.workspace


@dataclass(frozen=True)
class CpuMemory:
    weights: int
    kv_cache: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


@dataclass(frozen=True)
class Memory:
    gpu: GpuMemory
    cpu: CpuMemory

    def to_dict(self) -> dict:
        return {"gpu": {"weights": self.gpu.weights, "kv_cache": self.gpu.kv_cache,
                        "buffers": self.gpu.buffers, "workspace": self.gpu.workspace,
                        "total": self.gpu.total},
                "cpu": {"weights": self.cpu.weights, "kv_cache": self.cpu.kv_cache,
                        "total": self.cpu.total}}


@dataclass(frozen=True)
class Prediction:
    """Cost-model prediction: whole-prompt prefill seconds, decode tokens/s summed over the batch,
    and what bounds a decode step ("pcie", "gpu" or "cpu")."""

    prefill_s: float
    decode_tokens_per_s: float
    bottleneck: str
    verify_tokens: int = DEFAULT_VERIFY_TOKENS   # speculative decoding: tokens a pass verifies for about a step

    def __post_init__(self):
        if self.bottleneck not in BOTTLENECKS:
            raise PlanError(f"bottleneck must be one of {', '.join(BOTTLENECKS)}, got {self.bottleneck!r}")
        if not (self.prefill_s >= 0 and self.decode_tokens_per_s >= 0):
            raise PlanError("predicted times must be non-negative")
        if isinstance(self.verify_tokens, bool) or not isinstance(self.verify_tokens, int) or self.verify_tokens < 1:
            raise PlanError(f"predicted verify_tokens must be a positive int, got {self.verify_tokens!r}")


@dataclass(frozen=True)
class Plan:
    """A complete placement for one model, hardware budget and workload (see the module docstring)."""

    model: str
    model_type: str
    num_params: int
    num_layers: int
    dtype: str
    tie_word_embeddings: bool
    budget: Budget
    workload: Workload
    layers: tuple
    embedding: ItemPlan
    final_norm: ItemPlan
    lm_head: ItemPlan
    prefetch_depth: int
    slot_bytes: int
    prefill_chunk_size: int
    workspace_bytes: int
    cuda_reserve_bytes: int
    predicted: Prediction
    hardware: str = ""
    quantization: str | None = None      # the layers' matrices' packed layout ("int4", "int8-g64"), or None
    expert_slots: int = 0        # GPU buffers for the routed experts a decode step copies (experts "streamed")
    expert_slot_bytes: int = 0   # one routed expert's bytes

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != self.num_layers or any(
                not isinstance(l, LayerPlan) or l.index != i for i, l in enumerate(self.layers)):
            raise PlanError(f"plan needs one LayerPlan per decoder layer, indexed 0..{self.num_layers - 1}")
        if self.tie_word_embeddings:
            if self.lm_head.weight_bytes != 0:
                raise PlanError("tied embeddings: the table is counted under embedding, "
                                "lm_head.weight_bytes must be 0")
            if self.lm_head.weights != self.embedding.weights:
                raise PlanError("tied embeddings: embedding and lm_head must share one placement "
                                f"(got {self.embedding.weights} and {self.lm_head.weights})")
        for key in ("slot_bytes", "workspace_bytes", "cuda_reserve_bytes", "prefetch_depth", "expert_slots",
                    "expert_slot_bytes"):
            _check_bytes(key, getattr(self, key))
        if not isinstance(self.prefill_chunk_size, int) or not 0 < self.prefill_chunk_size:
            raise PlanError(f"prefill_chunk_size must be a positive int, got {self.prefill_chunk_size!r}")
        need = self.required_slot_bytes
        if need and (self.prefetch_depth < 1 or self.slot_bytes != need):
            raise PlanError(f"streamed items need prefetch_depth >= 1 and slot_bytes == {need} "
                            f"(the largest ring slot), got {self.prefetch_depth} x {self.slot_bytes}")
        if not need and (self.prefetch_depth or self.slot_bytes):
            raise PlanError("nothing is streamed: prefetch_depth and slot_bytes must be 0")
        both = next((l.index for l in self.layers if l.experts_apart and l.is_streamed), None)
        if both is not None and self.prefetch_depth < 2:
            raise PlanError(f"layer {both} streams its weights and, in prefill, its experts kept apart: two ring "
                            f"slots at once need prefetch_depth >= 2, got {self.prefetch_depth}")
        on_demand = any(l.experts == "streamed" for l in self.layers)
        if on_demand != bool(self.expert_slots and self.expert_slot_bytes):
            raise PlanError("experts streamed on demand need expert_slots >= 1 and expert_slot_bytes > 0, and "
                            f"only they do (got {self.expert_slots} x {self.expert_slot_bytes})")
        gpu, cpu = self.memory.gpu.total, self.memory.cpu.total
        if gpu + self.cuda_reserve_bytes > self.budget.gpu_bytes:
            raise PlanError(f"plan needs {gpu + self.cuda_reserve_bytes} GPU bytes (including "
                            f"{self.cuda_reserve_bytes} CUDA reserve), budget is {self.budget.gpu_bytes}")
        if cpu > self.budget.cpu_bytes:
            raise PlanError(f"plan needs {cpu} CPU bytes, budget is {self.budget.cpu_bytes}")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def max_seq_len(self) -> int:
        return self.workload.max_seq_len

    @property
    def max_batch_size(self) -> int:
        return self.workload.batch_size

    @property
    def required_slot_bytes(self) -> int:
        """The largest ring slot any streamed item needs (0 when nothing is streamed): CPU experts stream in
        prefill chunks, in a slot of their own."""
        need = max((l.ring_slot_bytes for l in self.layers), default=0)
        if self.lm_head.weights == "cpu":
            need = max(need, self.lm_head.read_bytes)
        return need

    @property
    def expert_buffer_bytes(self) -> int:
        """GPU bytes of the slots that routed experts streamed on demand are copied into."""
        return self.expert_slots * self.expert_slot_bytes

    @property
    def memory(self) -> Memory:
        items = (self.embedding, self.final_norm, self.lm_head)
        return Memory(
            gpu=GpuMemory(weights=sum(l.placed_bytes for l in self.layers if l.weights == "gpu")
                          + sum(i.weight_bytes for i in items if i.weights == "gpu"),
                          kv_cache=sum(l.kv_bytes for l in self.layers if l.kv == "gpu"),
                          buffers=self.prefetch_depth * self.slot_bytes + self.expert_buffer_bytes,
                          workspace=self.workspace_bytes),
            cpu=CpuMemory(weights=sum(l.placed_bytes for l in self.layers if l.weights == "cpu")
                          + sum(l.expert_bytes for l in self.layers if l.experts_apart)
                          + sum(i.weight_bytes for i in items if i.weights == "cpu"),
                          kv_cache=sum(l.kv_bytes for l in self.layers if l.kv == "cpu")))

    @property
    def num_gpu_layers(self) -> int:
        """Layers whose weights are resident on the GPU (llama.cpp's -ngl)."""
        return sum(l.weights == "gpu" for l in self.layers)

    def summary(self) -> str:
        """A human-readable report: model, budgets, folded per-layer table, memory, prediction."""
        from .report import format_plan
        return format_plan(self)

    # ---- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "model": {"name": self.model, "model_type": self.model_type, "num_params": self.num_params,
                      "num_layers": self.num_layers, "dtype": self.dtype, "quantization": self.quantization,
                      "tie_word_embeddings": self.tie_word_embeddings},
            "hardware": self.hardware,
            "budget": {"gpu_bytes": self.budget.gpu_bytes, "cpu_bytes": self.budget.cpu_bytes},
            "workload": self.workload.to_dict(),
            "layers": [l.to_dict() for l in self.layers],
            "embedding": self.embedding.to_dict(),
            "final_norm": self.final_norm.to_dict(),
            "lm_head": self.lm_head.to_dict(),
            "prefetch_depth": self.prefetch_depth,
            "slot_bytes": self.slot_bytes,
            "expert_slots": self.expert_slots,
            "expert_slot_bytes": self.expert_slot_bytes,
            "prefill_chunk_size": self.prefill_chunk_size,
            "workspace_bytes": self.workspace_bytes,
            "cuda_reserve_bytes": self.cuda_reserve_bytes,
            "memory": self.memory.to_dict(),
            "predicted": {"prefill_s": self.predicted.prefill_s,
                          "decode_tokens_per_s": self.predicted.decode_tokens_per_s,
                          "bottleneck": self.predicted.bottleneck,
                          "verify_tokens": self.predicted.verify_tokens},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """Inverse of to_dict (the derived `memory` is recomputed, not read)."""
        try:
            if d.get("format", FORMAT) != FORMAT:
                raise PlanError(f"unsupported plan format {d.get('format')!r}; expected {FORMAT!r} (make the "
                                "plan again with this version's offload-plan --json)")
            m = d["model"]
            return cls(model=m["name"], model_type=m["model_type"], num_params=m["num_params"],
                       num_layers=m["num_layers"], dtype=m["dtype"], quantization=m.get("quantization"),
                       tie_word_embeddings=m["tie_word_embeddings"],
                       budget=Budget(**d["budget"]), workload=Workload.from_dict(d["workload"]),
                       layers=tuple(LayerPlan(**l) for l in d["layers"]),
                       embedding=ItemPlan(**d["embedding"]), final_norm=ItemPlan(**d["final_norm"]),
                       lm_head=ItemPlan(**d["lm_head"]), prefetch_depth=d["prefetch_depth"],
                       slot_bytes=d["slot_bytes"], expert_slots=d.get("expert_slots", 0),
                       expert_slot_bytes=d.get("expert_slot_bytes", 0), prefill_chunk_size=d["prefill_chunk_size"],
                       workspace_bytes=d["workspace_bytes"], cuda_reserve_bytes=d["cuda_reserve_bytes"],
                       predicted=Prediction(**d["predicted"]), hardware=d.get("hardware", ""))
        except (KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"malformed plan: missing or invalid field ({e})") from None

    def to_json(self, path: str | Path | None = None, indent: int | None = 2) -> str:
        """The plan as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Plan":
        """From JSON text or a path to a JSON file (as written by to_json or `offload-plan --json`)."""
        if isinstance(text_or_path, str) and text_or_path.lstrip().startswith("{"):
            data = parse_json_object(text_or_path, "plan JSON", PlanError)
        else:
            data = read_json_object(text_or_path, PlanError, missing="cannot read plan (no such file)")
        return cls.from_dict(data)
