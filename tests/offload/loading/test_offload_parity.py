"""Offloaded plans give exactly what the all-resident path gives (float32 logits within 1e-4, identical
greedy tokens, ragged batches): streamed weights (contiguous or interleaved), CPU KV with CPU or GPU
attention, KV split across tiers, host embedding and streamed LM head (tied and untied), prefetch depth
1 and 3, every family; and each model runs exactly its plan (placements, ring, ledger)."""
from __future__ import annotations

import pytest
import torch

import offload
from tests.offload.builders import DEEP_LAYERS, VARIANTS, VOCAB, build_checkpoint
from tests.offload.offload_plans import assert_runs_plan, layout_plan

PROMPTS = [[5, 17, 99, 42, 8, 63, 21, 7, 88], [33, 4, 120, 61], [9, 14, 77, 31, 50, 2, 66, 101, 12, 45, 3, 90, 27]]
LONG = [(i * 37 + 11) % (VOCAB - 3) + 3 for i in range(30)]
NUM_NEW = 12


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """deep(variant) -> path of a 5-layer checkpoint of that variant (enough layers to interleave)."""
    built = {}

    def make(variant: str):
        if variant not in built:
            built[variant] = tmp_path_factory.mktemp(f"{variant}_deep")
            build_checkpoint(built[variant], variant, num_hidden_layers=DEEP_LAYERS)
        return built[variant]

    return make


_references: dict = {}


def reference(path):
    """The all-resident path's logits for [LONG, PROMPTS[2]] and greedy tokens for PROMPTS (cached)."""
    if path not in _references:
        model = offload.load(path, device="cpu", dtype="float32", max_batch_size=3, max_seq_len=48,
                             prefill_chunk_size=5, progress=False)
        _references[path] = (model.forward([LONG, PROMPTS[2]]), model.generate(PROMPTS, max_new_tokens=NUM_NEW))
    return _references[path]


def check_parity(path, plan) -> offload.Model:
    model = offload.load(path, plan=plan, progress=False)
    assert_runs_plan(model, plan)
    logits, tokens = reference(path)
    got = model.forward([LONG, PROMPTS[2]])
    torch.testing.assert_close(got, logits, atol=1e-4, rtol=0)
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == tokens
    assert model.generate(PROMPTS, max_new_tokens=NUM_NEW) == tokens     # a second call: the ring cycles on
    assert_runs_plan(model, plan)                                        # peaks unchanged by running
    return model


LAYOUTS = {   # name: (weights, kv, embedding, lm_head, depth)
    "all_streamed": ("ccccc", "ggggg", "cpu", "cpu", 2),
    "interleaved_streamed": ("gcgcc", "ggggg", "gpu", "gpu", 2),
    "all_kv_cpu_attention": ("ggggg", "ccccc", "gpu", "gpu", 2),
    "kv_split_across_tiers": ("gcggc", "gcgac", "gpu", "cpu", 2),
    "kv_cpu_gpu_attention": ("gcgcg", "aaaaa", "gpu", "gpu", 2),
    "kv_cpu_gpu_attention_resident_weights": ("ggggg", "gagag", "gpu", "gpu", 2),
    "everything_offloaded_depth1": ("ccccc", "cacac", "cpu", "cpu", 1),
    "everything_offloaded_depth3": ("cgccg", "acgca", "cpu", "cpu", 3),
    "host_embedding_streamed_head": ("ggggg", "ggggg", "cpu", "cpu", 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_the_resident_path(deep, layout):
    weights, kv, embedding, lm_head, depth = LAYOUTS[layout]
    path = deep("llama")
    check_parity(path, layout_plan(path, weights=weights, kv=kv, embedding=embedding, lm_head=lm_head,
                                   prefetch_depth=depth))


@pytest.mark.parametrize("variant", ["llama_tied", "qwen2_tied"])
@pytest.mark.parametrize("where", ["cpu", "gpu"])
def test_tied_head_on_the_host_or_resident(deep, variant, where):
    path = deep(variant)
    model = check_parity(path, layout_plan(path, weights="cgcgc", kv="gcagc", embedding=where, lm_head=where))
    if where == "gpu":        # one resident table serves both the lookup and the head
        w = model.engine.weights
        emb = next(iter(w.acquire("embedding").values()))
        assert w.acquire("lm_head")["lm_head.weight"] is emb
        w.release("embedding"), w.release("lm_head")


@pytest.mark.parametrize("swap", [False, True], ids=["cpu_kv_first", "cpu_kv_last"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_family_offloaded(checkpoint_factory, variant, swap):
    """The 2- and 3-layer variants: streamed, CPU-attended and GPU-attended CPU KV layers, host
    embedding, streamed head, several prefill chunks longer than the sliding windows; both ways round,
    so sliding and full layers each meet every attention backend."""
    import placement
    path, _ = checkpoint_factory(variant)
    n = placement.load_spec(path).num_layers
    weights, kv = ("cg" + "c" * (n - 2), "ca" + "g" * (n - 2)) if not swap else \
        ("g" * (n - 2) + "cg", "a" + "g" * (n - 2) + "c")
    check_parity(path, layout_plan(path, weights=weights, kv=kv, embedding="cpu", lm_head="cpu", prefetch_depth=2))


def test_planner_interleaved_plan_runs_as_planned(deep):
    """A plan from the planner itself (budget between 'everything streamed' and 'everything resident')."""
    import placement
    path = deep("qwen2_window")
    spec = placement.load_spec(path)
    workload = placement.Workload(batch_size=3, prompt_len=36, gen_len=12)
    full = placement.manual_plan(spec, workload, prefill_chunk_size=5)
    seen = set()
    for fraction in (0.01, 0.1, 0.3):           # today: interleaved resident/streamed layers, then fewer resident
        budget = full.budget.gpu_bytes - int(fraction * full.memory.gpu.weights)
        plan = placement.plan(spec, placement.Hardware.detect(gpu_memory=budget, cpu_memory="1GiB"), workload)
        key = tuple((l.weights, l.kv, l.attention) for l in plan.layers)
        if key in seen:
            continue
        seen.add(key)
        check_parity(path, plan)
    assert any(l[0] == "cpu" for key in seen for l in key)      # something was streamed
