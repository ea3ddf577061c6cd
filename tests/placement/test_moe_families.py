"""Mixture-of-experts descriptions (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers: every tensor name and
shape `save_pretrained` writes, parameter counts, which layers are sparse and which slide, what is quantized,
and the active bytes and parameters the cost model reads."""
from __future__ import annotations

import pytest

from placement import load_spec
from placement.architecture import Architecture, ConfigError
from placement.cost import CostModel
from placement.hardware import Hardware
from placement.workload import Workload

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")

TINY = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64, intermediate_size=96,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
QWEN2 = dict(TINY, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
QWEN3 = dict(TINY, head_dim=24, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32)
CONFIGS = {
    "mixtral": ("MixtralConfig", dict(TINY, num_local_experts=4, num_experts_per_tok=2)),
    "mixtral_window_tied": ("MixtralConfig", dict(TINY, num_local_experts=4, num_experts_per_tok=1, sliding_window=8,
                                                  tie_word_embeddings=True)),
    "qwen2_moe_dense_layer_window": ("Qwen2MoeConfig", dict(QWEN2, mlp_only_layers=[1], use_sliding_window=True,
                                                            sliding_window=4, max_window_layers=3)),
    "qwen2_moe_sparse_step_no_bias": ("Qwen2MoeConfig", dict(QWEN2, decoder_sparse_step=2, qkv_bias=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(QWEN3, norm_topk_prob=True)),
    "qwen3_moe_bias_window_step": ("Qwen3MoeConfig", dict(QWEN3, attention_bias=True, use_sliding_window=True,
                                                          sliding_window=4, decoder_sparse_step=2,
                                                          mlp_only_layers=[3])),
}


def _config(name):
    class_name, kwargs = CONFIGS[name]
    return getattr(transformers, class_name)(**kwargs)


def _saved_tensors(config, path) -> dict[str, tuple]:
    """What save_pretrained writes for `config` (per-expert names, as published checkpoints hold them)."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    with safetensors.safe_open(str(path / "model.safetensors"), "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tensor_table_is_what_save_pretrained_writes(name, tmp_path):
    config = _config(name)
    arch = Architecture.from_config(config.to_dict())
    assert arch.all_tensors() == _saved_tensors(config, tmp_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert arch.num_params == sum(p.numel() for p in model.parameters())
    # the layers transformers builds with a sparse block, and the experts' names under them
    sparse = tuple(i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts"))
    assert arch.moe_layers == sparse and sparse
    assert arch.num_experts == model.model.layers[sparse[0]].mlp.experts.num_experts
    for i in sparse:
        experts = [arch.expert_tensors(i, e) for e in range(arch.num_experts)]
        assert all(len(t) == 3 for t in experts)
        assert set().union(*experts) <= set(arch.layer_tensors(i))
    dense = next((i for i in range(arch.num_layers) if i not in sparse), None)
    if dense is not None:
        assert arch.expert_tensors(dense, 0) == {} and arch.router_tensors(dense) == {}


def test_windows_follow_transformers_layer_types():
    qwen2 = _config("qwen2_moe_dense_layer_window")
    arch = Architecture.from_config(qwen2.to_dict())
    assert arch.sliding_window_layers == tuple(i for i, t in enumerate(qwen2.layer_types) if t == "sliding_attention")
    assert arch.sliding_window_layers == (0, 2) and arch.sliding_window == 4
    published = {k: v for k, v in qwen2.to_dict().items() if k != "layer_types"}      # transformers' rule without it
    assert Architecture.from_config(published).sliding_window_layers == (0, 2)
    assert Architecture.from_config(_config("qwen3_moe_bias_window_step").to_dict()).sliding_window_layers == \
        (0, 1, 2, 3)
    assert Architecture.from_config(_config("mixtral_window_tied").to_dict()).sliding_window_layers == (0, 1, 2, 3)
    assert Architecture.from_config(_config("qwen3_moe").to_dict()).sliding_window is None


def test_options_and_routers_stay_unquantized():
    mixtral = Architecture.from_config(_config("mixtral").to_dict())
    assert mixtral.options["norm_topk_prob"] and not mixtral.options["shared_expert_size"]
    qwen2 = Architecture.from_config(_config("qwen2_moe_dense_layer_window").to_dict())
    assert not qwen2.options["norm_topk_prob"] and qwen2.options["shared_expert_size"] == 48
    quantized = qwen2.quantizable_tensors()
    routers = {n for i in qwen2.moe_layers for n in qwen2.router_tensors(i)}
    assert routers == {f"model.layers.{i}.mlp.{n}.weight" for i in (0, 2, 3) for n in ("gate", "shared_expert_gate")}
    assert not routers & set(quantized)
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in quantized
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in quantized


@pytest.mark.parametrize("change, message", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 exceeds num_experts 8"),
    ({"num_experts": 0}, "'num_experts' must be a positive integer, got 0"),
    ({"num_experts": None}, "missing 'num_local_experts'"),
    ({"moe_intermediate_size": None}, "missing 'moe_intermediate_size'"),
])
def test_bad_moe_configs_are_one_line_errors(change, message):
    config = {**_config("qwen3_moe").to_dict(), **change}
    config.pop("num_local_experts", None) if "num_experts" in change else None
    with pytest.raises(ConfigError, match=message):
        Architecture.from_config(config)


# what transformers counts (tests/placement/test_spec.py instantiates every preset on the meta device), and the
# parameters one token uses: all but the experts it is not routed to
ACTIVE = {"mixtral-8x7b": (46_702_792_704, 12_879_925_248), "qwen3-30b-a3b": (30_532_122_624, 3_353_032_704),
          "qwen1.5-moe-a2.7b": (14_315_784_192, 2_689_173_504), "qwen2-57b-a14b": (57_408_658_944, 14_249_270_784),
          "mixtral-8x22b": (140_620_634_112, 39_152_031_744), "qwen3-235b-a22b": (235_093_634_560, 22_190_763_520)}


@pytest.mark.parametrize("name", sorted(ACTIVE))
def test_presets_count_every_expert_and_know_the_active_ones(name):
    spec = load_spec(name)
    total, active = ACTIVE[name]
    arch = spec.arch
    assert spec.num_params == total and arch.moe_layers == tuple(range(arch.num_layers))
    expert = sum(torch.Size(s).numel() for s in arch.expert_tensors(0, 0).values())
    assert total - arch.num_layers * (arch.num_experts - arch.num_experts_per_tok) * expert == active
    layer = sum(torch.Size(s).numel() for s in arch.layer_tensors(0).values() if len(s) == 2)
    assert spec.layer_matmul_params == layer - (arch.num_experts - arch.num_experts_per_tok) * expert
    assert spec.layer_expert_bytes(0) == arch.num_experts * expert * 2                       # bfloat16


def test_cost_model_reads_only_the_routed_experts():
    spec = load_spec("qwen3-30b-a3b")
    cost = CostModel(spec, Hardware.from_gpu_preset("rtx-3060", cpu_memory="64GiB"),
                     Workload(batch_size=1, prompt_len=512, gen_len=128))
    w, e = spec.layer_weight_bytes(0), spec.layer_expert_bytes(0)
    # one token: 8 of 128 experts; a 512-token chunk hits nearly all
    assert cost.read_bytes(w, e, 1) == pytest.approx(w - e + e * 8 / 128)
    assert cost.read_bytes(w, e, 512) == pytest.approx(w, rel=1e-6)
    one = cost.decode_layer_on_cpu(w, e).cpu_s
    assert one < cost.decode_layer_on_cpu(w, 0).cpu_s / 5      # a dense layer of the same bytes reads them all


@pytest.mark.parametrize("experts, tokens, slots, decode, expected", [
    ("gpu", 1, 8, True, False),              # with the layer: never apart
    ("cpu", 40, 4, True, True),              # a decode step or a pass computes them where they lie, any length
    ("cpu", 31, 4, False, True),             # a prefill chunk too, when short
    ("cpu", 32, 4, False, False),            # a long one streams them through the ring
    ("streamed", 2, 4, True, True),          # 2 tokens x top-2 = 4 experts: the 4 slots hold them
    ("streamed", 3, 4, True, False),         # 6 may be hit: more than the slots, so the layer's experts stream
    ("streamed", 40, 8, True, True),         # at most all 8: they fit 8 slots whatever the pass's length
    ("streamed", 2, 4, False, True),         # a short prefill chunk fetches them as a step does
    ("streamed", 40, 8, False, False),       # a long prefill chunk streams them whatever the slots
])
def test_experts_taken_on_the_side_follow_one_rule(experts, tokens, slots, decode, expected):
    """placement.cost.experts_on_the_side, which the engine and the cost model both call: 8 experts, top-2."""
    from placement.cost import experts_on_the_side
    assert experts_on_the_side(experts, tokens, 8, 2, slots, decode) is expected
