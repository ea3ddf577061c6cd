"""compressed-tensors `pack-quantized` checkpoints: made by the `compressed-tensors` package, read by us code
for code and checked against the package's own decompression and transformers; and `offload.quantize`'s
output read back by transformers (with the package installed) with the same logits."""
from __future__ import annotations

import json

import pytest
import torch

import offload
from offload.loading.checkpoint import Checkpoint, CheckpointError
from offload.weights.quant import quantize_integer
from placement import ConfigError, load_spec
from tests.offload.builders import build_checkpoint, hf_logits, load_hf
from tests.offload.offload_plans import layout_plan

pytest.importorskip("compressed_tensors")
from tests.offload.ct_builders import dense_reference, package_dequantized, write_compressed  # noqa: E402

PROMPT = [5, 17, 99, 42, 8, 63, 21, 7, 88, 3, 64, 90]
SCHEMES = [(4, True, "group", "int4-sym-g32"), (4, False, "group", "int4-g32"),
           (8, True, "channel", "int8-g64+int8-g96"), (8, False, "group", "int8-asym-g32")]


@pytest.mark.parametrize("bits, symmetric, strategy, label", SCHEMES)
@pytest.mark.parametrize("variant", ["llama", "qwen3"])
def test_package_written_checkpoints_match_its_decompression(tmp_path, variant, bits, symmetric, strategy, label):
    folder = write_compressed(tmp_path, variant, bits, symmetric, strategy)
    model = offload.load(folder, progress=False)
    assert model.plan.quantization == label and model.checkpoint.quantized_types == (f"pack-quantized {label}",)
    expected = package_dequantized(folder)
    for name in model.arch.quantizable_tensors():      # held packed, code for code: (q + 8) s - 8 s = q s
        packed = model.checkpoint.read_quantized(name, "float32")   # within float32 rounding of the sum
        torch.testing.assert_close(packed.dequantize(torch.float32), expected[name], rtol=1e-5, atol=1e-7)
    reference = hf_logits(dense_reference(folder), PROMPT)
    torch.testing.assert_close(model.forward([PROMPT])[0], reference, atol=1e-5, rtol=0)
    if symmetric:                     # transformers' own loading (it cannot load asymmetric ones: see README)
        torch.testing.assert_close(model.forward([PROMPT])[0], hf_logits(load_hf(folder), PROMPT), atol=1e-5, rtol=0)
    streamed = offload.load(folder, progress=False, plan=layout_plan(folder, weights="gc", kv="gc"))
    torch.testing.assert_close(streamed.forward([PROMPT])[0], reference, atol=1e-5, rtol=0)
    assert streamed.engine.weights.streamed_bytes_per_cycle == streamed.plan.layers[1].weight_bytes


@pytest.mark.parametrize("symmetric", [True, False])
def test_a_bfloat16_checkpoint_against_the_package(tmp_path, symmetric):
    """Symmetric: (q + 8) s - 8 s rounded once is q s, exactly the package's value. Asymmetric: the min
    -(8 + zp) s is itself rounded to bfloat16 (half a unit of a value up to 16 s)."""
    folder = write_compressed(tmp_path, "llama", 4, symmetric, dtype=torch.bfloat16)
    checkpoint = Checkpoint(folder)
    expected = package_dequantized(folder)
    for name in checkpoint.layouts:
        packed = checkpoint.read_quantized(name, "bfloat16")
        ours, theirs = packed.dequantize(torch.bfloat16), expected[name]
        assert ours.dtype == theirs.dtype == torch.bfloat16
        if symmetric:
            assert torch.equal(ours, theirs), name
        else:
            step = packed.scales.float().repeat_interleave(packed.group_size, dim=1)
            bound = (16 * step + theirs.float().abs()) * 2 ** -8       # the min's rounding and the result's
            assert ((ours.float() - theirs.float()).abs() <= bound).all(), name
        assert torch.equal(checkpoint.read(name, "bfloat16"), theirs)      # read dense: exact


def test_plans_count_the_packed_bytes(tmp_path):
    folder = write_compressed(tmp_path, "llama", 4, True)
    spec, dense = load_spec(folder), load_spec(tmp_path / "source")
    assert spec.quantization == "int4-sym-g32" and spec.num_params == dense.num_params      # symmetric: no mins
    for name, (out, inputs) in spec.arch.quantizable_tensors().items():
        assert spec.tensor_bytes[name] == out * inputs // 2 + out * (inputs // 32) * 4       # codes, scale
    assert spec.layer_weight_bytes(0) < 0.3 * dense.layer_weight_bytes(0)


@pytest.mark.parametrize("scheme, symmetric, variant", [("int4", True, "llama"), ("int8", True, "llama"),
                                                        ("int4", False, "llama"), ("int4", True, "llama_tied")])
def test_quantize_writes_what_transformers_and_we_load_alike(tmp_path, scheme, symmetric, variant):
    source = tmp_path / "source"
    hf = build_checkpoint(source, variant)
    (source / "tokenizer_config.json").write_text("{}")                 # the tokenizer files come along
    written = offload.quantize(source, tmp_path / "out", scheme, symmetric=symmetric, progress=False)
    assert (written / "tokenizer_config.json").is_file() and not list(tmp_path.glob(".out.partial*"))
    config = json.loads((written / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized" and config["ignore"] == ["lm_head", "model.embed_tokens"]
    ours = offload.load(written, progress=False)
    assert ours.plan.quantization == (("int4-sym-g32" if symmetric else "int4-g32") if scheme == "int4" else "int8-g32")
    logits = ours.forward([PROMPT])[0]
    torch.testing.assert_close(logits, hf_logits(dense_reference(written), PROMPT), atol=1e-5, rtol=0)
    if symmetric:
        torch.testing.assert_close(logits, hf_logits(load_hf(written), PROMPT), atol=1e-5, rtol=0)
    # quantization error against the float32 model: bounded, and 4-bit's fitted scales beat min-max ones
    bits = 4 if scheme == "int4" else 8
    for name, weight in hf.state_dict().items():
        if name in ours.arch.quantizable_tensors():
            error = (ours.checkpoint.read(name, "float32") - weight).norm() / weight.norm()
            assert error <= (0.1 if bits == 4 else 0.008), (name, error)
            q, scale, zp = quantize_integer(weight, bits, 32, symmetric=symmetric, fit=False)
            dense = (q.float() - (0 if zp is None else zp.float().repeat_interleave(32, 1))) * \
                scale.repeat_interleave(32, 1)
            assert error <= (dense - weight).norm() / weight.norm() + 1e-7, name


def test_quantize_group_sizes(tmp_path):
    source = tmp_path / "source"
    build_checkpoint(source, "llama", hidden_size=48, intermediate_size=80)       # 48 = 16 * 3, 80 = 16 * 5
    written = offload.quantize(source, tmp_path / "channel", "int8", progress=False)   # no common 32/64/128
    assert json.loads((written / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]["strategy"] == "channel"
    assert offload.load(written, progress=False).plan.quantization == "int8-g48+int8-g80"
    offload.quantize(source, tmp_path / "g16", "int4", group_size=16, progress=False)
    assert offload.load(tmp_path / "g16", progress=False).plan.quantization == "int4-sym-g16"


def test_bad_quantize_calls_write_nothing(tmp_path):
    source = tmp_path / "source"
    build_checkpoint(source, "llama")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="taken: exists and is not an empty folder"):
        offload.quantize(source, taken, "int4")
    with pytest.raises(ValueError, match="unknown quantization 'int3'; use one of int4, int8"):
        offload.quantize(source, tmp_path / "a", "int3")
    with pytest.raises(ConfigError, match="group_size 48 does not divide the 64 inputs"):
        offload.quantize(source, tmp_path / "b", "int4", group_size=48)
    offload.quantize(source, tmp_path / "q", "int4", progress=False)
    with pytest.raises(CheckpointError, match=r"already quantized \(pack-quantized int4-sym-g32\)"):
        offload.quantize(tmp_path / "q", tmp_path / "c", "int4")
    with pytest.raises(ValueError, match=r"already quantized \(pack-quantized int4-sym-g32\); load it without"):
        offload.load(tmp_path / "q", quantize="int8", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "source", "taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("edit, message", [
    (lambda qc, folder: qc.update(format="float-quantized"),
     "compressed-tensors format 'float-quantized' is not supported; supported: pack-quantized"),
    (lambda qc, folder: qc["config_groups"]["group_0"]["weights"].update(num_bits=2),
     "group 'group_0' has 2-bit weights; supported: int weights of 4 or 8 bits"),
])
def test_unsupported_compressed_configs_are_one_clear_line(tmp_path, edit, message):
    folder = write_compressed(tmp_path, "llama", 4, True)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"], folder)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        offload.load(folder, progress=False)
    with pytest.raises(ConfigError, match=message):
        load_spec(folder)


def test_inconsistent_packed_shapes_are_one_clear_line(tmp_path):
    from safetensors.torch import load_file, save_file
    folder = write_compressed(tmp_path, "llama", 4, True)
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight_scale"
    state[name] = state[name][:, :2].contiguous()               # 96 inputs / 32 = 3 groups: now 2
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"down_proj.weight_scale has shape \[64, 2\] \(groups of 48 inputs\); "
                                              "its quantization_config says group_size 32"):
        offload.load(folder, progress=False)
    state[name] = state[name][:, :1].repeat(1, 5).contiguous()  # 5 groups do not divide 96
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"weight_scale has shape \[64, 5\]; expected \[64, groups\] with "
                                              "groups dividing 96"):
        offload.load(folder, progress=False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("out, inputs, group", [(7, 12, 12), (3, 64, 32), (33, 96, 32)])
def test_odd_shapes_unpack_as_the_package_packs(bits, out, inputs, group):
    """The package's own pack_to_int32 (words and zero points along the outputs) read back by our unpack."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from offload.loading.compressed_tensors import pack, unpack
    from placement.quantization import Quantization
    gen = torch.Generator().manual_seed(out * inputs + bits)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(low, high, (out, inputs), generator=gen).to(torch.int8)
    zp = torch.randint(low, high, (out, inputs // group), generator=gen).to(torch.int8)
    scale = torch.rand(out, inputs // group, generator=gen) + 0.5
    packed, packed_zp = pack_to_int32(q, bits), pack_to_int32(zp, bits, packed_dim=0)
    ours = pack(q, bits, zp)
    assert torch.equal(ours["weight_packed"], packed) and torch.equal(ours["weight_zero_point"], packed_zp)
    layout = Quantization(scheme="int4" if bits == 4 else "int8-asym", group_size=group)
    weight = unpack(packed, scale, packed_zp, layout, (out, inputs), torch.float32)
    want = (q.double() - zp.double().repeat_interleave(group, 1)) * scale.double().repeat_interleave(group, 1)
    torch.testing.assert_close(weight.dequantize(torch.float32).double(), want, rtol=1e-6, atol=1e-4)  # float32
