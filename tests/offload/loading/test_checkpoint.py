"""Checkpoint reading: lazy, validated, and a clear error naming the file for every broken folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.loading.checkpoint import Checkpoint, CheckpointError
from offload.weights.source import item_tensors, weight_items
from tests.offload.builders import edit_config, hf_logits


@pytest.fixture
def llama_copy(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory("llama")
    copy = tmp_path / "llama"
    shutil.copytree(path, copy)
    return copy


@pytest.fixture
def sharded_copy(checkpoint_factory, tmp_path):
    path, _ = checkpoint_factory("llama", sharded=True)
    copy = tmp_path / "llama_sharded"
    shutil.copytree(path, copy)
    return copy


@pytest.mark.parametrize("sharded", [False, True])
def test_reads_exactly_what_transformers_saved(checkpoint_factory, sharded):
    path, hf = checkpoint_factory("qwen2_tied", sharded)
    ckpt = Checkpoint(path)
    assert len(ckpt.files) > 1 if sharded else len(ckpt.files) == 1
    state = hf.state_dict()
    for name in ckpt.arch.all_tensors():
        torch.testing.assert_close(ckpt.read(name), state[name], atol=0, rtol=0)
    assert ckpt.read("model.norm.weight", "bfloat16").dtype == torch.bfloat16
    many = ckpt.read_many(["model.norm.weight", "model.embed_tokens.weight"], torch.float16, "cpu")
    assert [t.dtype for t in many.values()] == [torch.float16] * 2


def test_generation_config_sets_eos_and_sampling_defaults(llama_copy):
    (llama_copy / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    ckpt = Checkpoint(llama_copy)
    assert ckpt.eos_token_ids == (2, 7)
    assert ckpt.sampling_defaults == {"temperature": 0.6, "top_k": None, "top_p": 0.9}
    (llama_copy / "generation_config.json").unlink()
    edit_config(llama_copy, eos_token_id=[5, 6])
    ckpt = Checkpoint(llama_copy)
    assert ckpt.eos_token_ids == (5, 6) and ckpt.sampling_defaults["temperature"] == 0.0


def test_weight_source_items_cover_every_tensor_once(checkpoint_factory):
    for variant in ("llama_tied", "opt_proj", "mistral_window"):
        path, hf = checkpoint_factory(variant)
        ckpt = Checkpoint(path)
        weights = offload.load(path, device="cpu", dtype="float32", max_seq_len=16, progress=False).engine.weights
        assert set(weights.placement.values()) == {"gpu"}          # the plain path: all on the device
        seen = []
        for item in weight_items(ckpt.arch):
            tensors = weights.acquire(item)
            assert tensors.keys() == item_tensors(ckpt.arch, item).keys()
            seen += [n for n in item_tensors(ckpt.arch, item).values()]
            weights.release(item)
        if ckpt.arch.tie_word_embeddings:   # the head is the embedding table itself, not a copy
            emb = next(iter(ckpt.arch.embedding_tensors()))
            assert weights.acquire("lm_head")["lm_head.weight"] is weights.acquire("embedding")[emb]
        assert sorted(set(seen)) == sorted(ckpt.arch.all_tensors())
        layer0 = weights.acquire(0)
        assert all(not k.startswith(ckpt.arch.layer_prefix(0)) for k in layer0)


def test_old_style_config_loads_the_same(checkpoint_factory, tmp_path):
    """Pre-v5 configs (rope_scaling/rope_theta/torch_dtype) load to the same model."""
    path, hf = checkpoint_factory("llama_rope_linear")
    old = tmp_path / "old"
    shutil.copytree(path, old)
    edit_config(old, rope_parameters=None, dtype=None, rope_theta=10000.0,
                rope_scaling={"type": "linear", "factor": 4.0}, torch_dtype="float32")
    prompt = [5, 6, 7, 8, 9, 10]
    got = offload.load(old, progress=False).forward([prompt])[0]
    torch.testing.assert_close(got, hf_logits(hf, prompt), atol=1e-4, rtol=0)


# ---- broken folders --------------------------------------------------------------------------------
def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        offload.load(path, progress=False)
    return str(info.value)


def test_missing_config(llama_copy):
    (llama_copy / "config.json").unlink()
    assert "config.json" in _error(llama_copy) and str(llama_copy) in _error(llama_copy)


def test_not_a_folder(tmp_path):
    assert "nope: no such folder or file (give a Hugging Face model folder, a .gguf file or a Hub name" in \
        _error(tmp_path / "nope")


def test_unsupported_model_type_lists_the_supported(llama_copy):
    edit_config(llama_copy, model_type="gpt2")
    msg = _error(llama_copy)
    assert "config.json" in msg and "'gpt2'" in msg and "llama, mistral, qwen2, opt" in msg


def test_unsupported_rope_type(llama_copy):
    edit_config(llama_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    assert "yarn" in _error(llama_copy)


def test_no_safetensors(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    assert "model.safetensors" in _error(llama_copy)


def test_missing_tensors_are_named(llama_copy):
    file = llama_copy / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    msg = _error(llama_copy)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.norm.weight" in msg


def test_wrong_shape(llama_copy):
    file = llama_copy / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, file, metadata={"format": "pt"})
    msg = _error(llama_copy)
    assert str(file) in msg and "k_proj" in msg and "[64, 64]" in msg and "[32, 64]" in msg


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_truncated_or_corrupt_file(llama_copy, damage):
    file = llama_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    msg = _error(llama_copy)
    assert str(file) in msg and "truncated or corrupt" in msg


def test_index_names_a_missing_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = _error(sharded_copy)
    assert "model.safetensors.index.json" in msg and shard.name in msg


def test_truncated_shard(sharded_copy):
    shard = sorted(sharded_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    assert shard.name in _error(sharded_copy)


def test_unreadable_json(llama_copy):
    (llama_copy / "config.json").write_text("{not json")
    assert "config.json" in _error(llama_copy)
