"""ModelSpec: exact parameter and byte counts against the reference configs, bundled presets, and
safetensors headers written by the safetensors library itself."""
import json

import pytest

from placement import ConfigError, ModelSpec, load_spec
from placement import presets
from placement.architecture import Architecture

from .helpers import REFERENCE_CONFIGS, reference_config, reference_counts, tiny_llama_config

REFERENCE = reference_counts()


def test_reference_table_is_complete():
    assert len(REFERENCE) == len(list(REFERENCE_CONFIGS.glob("*.json"))) >= 8


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_exact_params_and_bytes_of_reference_configs(name):
    spec = ModelSpec.from_config_file(REFERENCE_CONFIGS / f"{name}.json")
    assert spec.num_params == REFERENCE[name]
    assert spec.dtype in ("float16", "bfloat16")
    assert spec.total_weight_bytes == 2 * REFERENCE[name]          # 16-bit weights: 2 bytes each
    items = (spec.embedding_bytes + spec.final_norm_bytes + spec.lm_head_bytes
             + sum(spec.layer_weight_bytes(i) for i in range(spec.num_layers)))
    assert items == spec.total_weight_bytes
    assert ModelSpec.from_config_file(REFERENCE_CONFIGS / f"{name}.json", dtype="float32") \
        .total_weight_bytes == 4 * REFERENCE[name]


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_bundled_presets_match_reference_configs(name):
    assert presets.load(name) == reference_config(name)
    assert load_spec(name).num_params == REFERENCE[name]


def test_kv_bytes_per_token():
    # llama-2-7b: MHA, 32 heads x 128 dims, K and V, fp16
    assert load_spec("llama-2-7b").kv_bytes_per_token == 2 * 32 * 128 * 2
    # llama-3.1-8b: GQA with 8 KV heads
    assert load_spec("llama-3.1-8b").kv_bytes_per_token == 2 * 8 * 128 * 2
    # mistral-nemo: head_dim 128 although 5120 / 32 = 160
    assert load_spec("mistral-nemo-12b").kv_bytes_per_token == 2 * 8 * 128 * 2
    assert load_spec("llama-3.2-1b", dtype="float32").kv_bytes_per_token == 2 * 8 * 64 * 4
    assert load_spec("llama-2-7b").layer_kv_bytes(3 * 100) == 300 * 2 * 32 * 128 * 2


def test_tied_presets_count_the_table_once():
    for name in ("llama-3.2-1b", "llama-3.2-3b", "qwen2.5-0.5b", "opt-125m", "opt-350m"):
        spec = load_spec(name)
        assert spec.arch.tie_word_embeddings
        assert spec.lm_head_bytes == 0
        assert spec.lm_head_read_bytes == spec.token_table_bytes > 0
    assert load_spec("opt-350m").token_table_bytes == 50272 * 512 * 2   # word_embed_proj_dim


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_param_count_matches_transformers(name):
    """Instantiate each preset with transformers on the meta device (no memory) and count."""
    transformers = pytest.importorskip("transformers")
    import torch
    config_dict = presets.load(name)
    config = transformers.AutoConfig.for_model(**config_dict)
    # a multimodal checkpoint (gemma3): what we plan and load is its language model
    text_config = config.get_text_config()
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(text_config)
    assert load_spec(name).num_params == sum(p.numel() for p in model.parameters())


def test_lookup_names():
    assert presets.resolve("Llama-3.1-8B") == "llama-3.1-8b"
    assert presets.resolve("meta-llama/llama-3.1-8b") == "llama-3.1-8b"
    with pytest.raises(ConfigError, match="did you mean llama-3.1-8b"):
        load_spec("llama-3.1-8bb")
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_spec("./does/not/exist")


# ---- checkpoints: config.json + safetensors headers ------------------------------------------------
@pytest.fixture
def safetensors_torch():
    return pytest.importorskip("safetensors.torch")


def _tensors(config, dtype_of):
    import torch
    arch = Architecture.from_config(config)
    return {name: torch.zeros(shape, dtype=dtype_of(name)) for name, shape in arch.all_tensors().items()}


def _file_tensor_bytes(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


def test_single_file_checkpoint_bytes_equal_file_tensor_bytes(tmp_path, safetensors_torch):
    import torch
    config = tiny_llama_config()
    (tmp_path / "config.json").write_text(json.dumps(config))
    # bf16 weights, f32 norms (as some checkpoints store them), plus a buffer the model does not use
    tensors = _tensors(config, lambda n: torch.float32 if "norm" in n else torch.bfloat16)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    spec = load_spec(tmp_path)
    assert spec.source == "checkpoint" and spec.dtype == "bfloat16"
    extra = 8 * 4
    assert spec.total_weight_bytes == _file_tensor_bytes(tmp_path / "model.safetensors") - extra
    assert spec.tensor_bytes["model.norm.weight"] == 64 * 4
    assert spec.tensor_bytes["model.embed_tokens.weight"] == 128 * 64 * 2
    assert spec.num_params == Architecture.from_config(config).num_params
    # a dtype override counts every tensor in that dtype
    assert load_spec(tmp_path, dtype="float16").total_weight_bytes == 2 * spec.num_params


def test_sharded_checkpoint_with_index(tmp_path, safetensors_torch):
    import torch
    config = tiny_llama_config(torch_dtype="float32", tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = _tensors(config, lambda n: torch.float32)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, part in shards.items():
        safetensors_torch.save_file({n: tensors[n] for n in part}, tmp_path / file)
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    spec = load_spec(tmp_path)
    assert spec.dtype == "float32"
    assert spec.total_weight_bytes == sum(_file_tensor_bytes(tmp_path / f) for f in shards)
    assert spec.total_weight_bytes == 4 * spec.num_params
    assert spec.lm_head_bytes == 0


@pytest.mark.parametrize("index, message", [
    ("{not json", "malformed JSON"),
    ("[]", "expected a JSON object"),
    ('{"metadata": {}}', "malformed index"),
    ('{"weight_map": {"model.norm.weight": 3}}', "malformed index"),
    ('{"weight_map": {"model.norm.weight": "model-00009.safetensors"}}', "missing shard"),
])
def test_malformed_index_is_one_error_naming_it(tmp_path, index, message):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config()))
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ConfigError, match=message) as error:
        load_spec(tmp_path)
    assert "model.safetensors.index.json" in str(error.value)


def test_checkpoint_mismatch_errors(tmp_path, safetensors_torch):
    import torch
    config = tiny_llama_config()
    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = _tensors(config, lambda n: torch.bfloat16)
    del tensors["model.layers.3.mlp.down_proj.weight"]
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="no tensor 'model.layers.3.mlp.down_proj.weight'"):
        load_spec(tmp_path)
    tensors["model.layers.3.mlp.down_proj.weight"] = torch.zeros(64, 95, dtype=torch.bfloat16)
    safetensors_torch.save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match=r"shape \[64, 95\]"):
        load_spec(tmp_path)


def test_truncated_or_garbage_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_llama_config()))
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ConfigError, match="not a safetensors file"):
        load_spec(tmp_path)


@pytest.mark.parametrize("content, message", [
    (None, "config.json: not found"), ("{not json", "malformed JSON"), ("[1, 2]", "JSON object"),
    (json.dumps({"model_type": "gpt2", "vocab_size": 5}), "unsupported model_type 'gpt2'"),
    (json.dumps({"model_type": "llama", "vocab_size": 5}), "missing 'hidden_size'"),
])
def test_bad_configs(tmp_path, content, message):
    if content is not None:
        (tmp_path / "config.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_spec(tmp_path)


def test_quantized_bytes_are_exact_and_only_the_layers_matrices_are_packed():
    """int4 at group 64: 0.5 byte a weight plus a 16-bit scale and min per 64; norms, embedding and head
    keep the model dtype; parameters are counted as before."""
    spec = load_spec("llama-3.1-8b")
    int4 = load_spec("llama-3.1-8b", quantization="int4-g64")
    assert int4.num_params == spec.num_params and int4.quantization == "int4-g64"
    arch = spec.arch
    matrices = arch.quantizable_tensors()
    assert len(matrices) == 7 * arch.num_layers and all(".layers." in n for n in matrices)
    for name, shape in matrices.items():
        out, inputs = shape
        assert int4.tensor_bytes[name] == out * inputs // 2 + 2 * (out * inputs // 64) * 2
    for name in set(spec.tensor_bytes) - set(matrices):
        assert int4.tensor_bytes[name] == spec.tensor_bytes[name]
    assert int4.layer_weight_bytes(0) / spec.layer_weight_bytes(0) < 0.3          # what a streamed layer moves
    int8 = load_spec("llama-3.1-8b", quantization="int8")                         # group 128: 1 + 2/128 bytes
    name, (out, inputs) = next(iter(matrices.items()))
    assert int8.tensor_bytes[name] == out * inputs + out * (inputs // 128) * 2
    with pytest.raises(ConfigError, match="already quantized"):
        int4.quantized("int8")
    with pytest.raises(ConfigError, match="group_size 100 does not divide"):
        load_spec("llama-3.1-8b", quantization="int4-g100")
    with pytest.raises(ConfigError, match="cannot quantize to int8-asym; use one of int4, int8"):
        load_spec("llama-3.1-8b", quantization="int8-asym")       # a layout GGUF files give, not written


def test_seventy_b_in_4_bits_fits_a_24_gib_card_and_64_gib_of_ram():
    import placement
    workload = placement.Workload(batch_size=1, prompt_len=2048, gen_len=512)
    hardware = placement.Hardware.from_gpu_preset("rtx-4090", cpu_memory="64GiB")
    with pytest.raises(placement.PlanError, match="does not fit"):
        placement.plan(load_spec("llama-3.1-70b"), hardware, workload)
    plan = placement.plan(load_spec("llama-3.1-70b", quantization="int4"), hardware, workload)
    assert plan.quantization == "int4" and plan.predicted.decode_tokens_per_s > 0
    assert placement.Plan.from_json(plan.to_json()) == plan
    assert plan.memory.cpu.total <= 64 << 30 and plan.memory.gpu.total + plan.cuda_reserve_bytes <= 24 << 30
