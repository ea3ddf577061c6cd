"""Plan: JSON round-trip, required keys, validation on construction and on load."""
import dataclasses
import json

import pytest

from placement import Hardware, LayerPlan, Plan, PlanError, Workload, load_spec, manual_plan, plan

GiB = 1 << 30


@pytest.fixture(scope="module")
def streamed_plan():
    hw = Hardware.from_gpu_preset("rtx-4070", cpu_memory=64 * GiB, gpu_memory=8 * GiB)
    return plan(load_spec("llama-3.1-8b"), hw, Workload(batch_size=2, prompt_len=1024, gen_len=256))


def test_json_round_trip(streamed_plan, tmp_path):
    text = streamed_plan.to_json()
    assert Plan.from_json(text) == streamed_plan
    path = tmp_path / "plan.json"
    streamed_plan.to_json(path)
    assert Plan.from_json(path) == streamed_plan
    assert Plan.from_json(str(path)) == streamed_plan
    tied = manual_plan(load_spec("qwen2.5-0.5b"), Workload(batch_size=1, prompt_len=64, gen_len=8),
                       gpu_layers=10, kv_gpu_layers=0, cpu_attention=False)
    assert Plan.from_json(tied.to_json()) == tied


def test_json_has_the_documented_keys(streamed_plan):
    d = json.loads(streamed_plan.to_json())
    assert set(d["model"]) >= {"num_params", "num_layers", "dtype"}
    assert set(d["budget"]) == {"gpu_bytes", "cpu_bytes"}
    assert set(d["workload"]) == {"batch_size", "prompt_len", "gen_len"}
    assert len(d["layers"]) == 32
    for layer in d["layers"]:
        assert set(layer) == {"index", "weights", "kv", "attention", "compute", "weight_bytes", "kv_bytes",
                              "expert_bytes", "experts"}
        assert {layer["weights"], layer["kv"], layer["attention"], layer["compute"], layer["experts"]} <= {"gpu", "cpu"}
        assert layer["expert_bytes"] == 0                     # a dense model
    assert set(d["memory"]["gpu"]) == {"weights", "kv_cache", "buffers", "workspace", "total"}
    assert set(d["memory"]["cpu"]) == {"weights", "kv_cache", "total"}
    assert set(d["predicted"]) == {"prefill_s", "decode_tokens_per_s", "bottleneck", "verify_tokens"}
    for key in ("embedding", "final_norm", "lm_head"):
        assert d[key]["weights"] in ("gpu", "cpu")
    for key in ("prefetch_depth", "slot_bytes", "prefill_chunk_size", "workspace_bytes",
                "cuda_reserve_bytes"):
        assert isinstance(d[key], int)
    spec = load_spec("llama-3.1-8b")
    assert d["memory"]["gpu"]["weights"] + d["memory"]["cpu"]["weights"] == spec.total_weight_bytes
    assert d["model"]["num_params"] == spec.num_params
    assert d["layers"][0]["kv_bytes"] == 2 * (1024 + 256) * spec.kv_bytes_per_token


def test_loading_rejects_broken_plans(streamed_plan, tmp_path):
    d = json.loads(streamed_plan.to_json())
    with pytest.raises(PlanError, match="malformed JSON"):
        Plan.from_json("{oops")
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.from_json(tmp_path / "missing.json")
    broken = json.loads(json.dumps(d))
    del broken["layers"][3]["kv"]
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_dict(broken)
    over = json.loads(json.dumps(d))
    over["budget"]["gpu_bytes"] = 4 * GiB             # an edited budget the placement exceeds
    with pytest.raises(PlanError, match="GPU bytes"):
        Plan.from_dict(over)
    bad = json.loads(json.dumps(d))
    bad["layers"][0]["weights"] = "disk"
    with pytest.raises(PlanError, match="'gpu' or 'cpu'"):
        Plan.from_dict(bad)
    short = json.loads(json.dumps(d))
    short["slot_bytes"] -= 1                         # a ring slot too small for a streamed layer
    with pytest.raises(PlanError, match="slot_bytes"):
        Plan.from_dict(short)


def test_layer_plan_validation():
    with pytest.raises(PlanError, match="needs its kv on the cpu"):
        LayerPlan(index=0, weights="gpu", kv="gpu", attention="cpu", weight_bytes=1, kv_bytes=1)
    layer = LayerPlan(index=0, weights="gpu", kv="cpu", attention="gpu", weight_bytes=10, kv_bytes=3)
    assert layer.is_streamed and layer.streamed_bytes == 3


def test_plan_is_frozen_and_summary_folds_layers(streamed_plan):
    with pytest.raises(dataclasses.FrozenInstanceError):
        streamed_plan.prefetch_depth = 3
    text = streamed_plan.summary()
    assert "llama-3.1-8b" in text and "bottleneck" in text and "tokens/s" in text
    uniform = manual_plan(load_spec("llama-2-70b"), Workload(batch_size=1, prompt_len=128, gen_len=8),
                          gpu_layers=20, kv_gpu_layers=80)
    rows = [line for line in uniform.summary().splitlines() if line.strip().startswith(("0-", "20-"))]
    assert [r.split()[:2] for r in rows] == [["0-19", "20"], ["20-79", "60"]]
