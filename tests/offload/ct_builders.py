"""compressed-tensors `pack-quantized` checkpoints made by the `compressed-tensors` package (as llm-compressor
does: a quantization config applied, min-max scales and zero points computed by the package, the model
compressed and saved), and the package's own decompression of a folder (the reference for our reading)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.offload.builders import build_checkpoint


def scheme_args(bits: int, symmetric: bool, strategy: str, group_size: int | None = 32):
    from compressed_tensors.quantization import QuantizationArgs
    return QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None)


def write_compressed(path: Path, variant: str, bits: int, symmetric: bool, strategy: str = "group",
                     group_size: int = 32, dtype: torch.dtype = torch.float32, **overrides):
    """A random `variant` model written by the package as pack-quantized (every Linear but lm_head).
    Returns the folder."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams
    model = build_checkpoint(path / "source", variant, **overrides).to(dtype)
    args = scheme_args(bits, symmetric, strategy, group_size)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"]))
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            weight = module.weight.detach()
            out, inputs = weight.shape
            grouped = weight.reshape(out, -1, group_size if strategy == "group" else inputs)   # [out, G, g]
            scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    folder = path / "compressed"
    model.save_pretrained(str(folder))
    compressor.update_config(str(folder))
    return folder


def package_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's state dict with every packed matrix decompressed by the package (its scheme from
    config.json's one config group)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    group = next(iter(config["config_groups"].values()))
    scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
    state = load_file(str(Path(folder) / "model.safetensors"))
    dense = {name: value for name, value in state.items() if not name.rpartition(".")[2].startswith("weight_")}
    for name in [n for n in state if n.endswith(".weight_packed")]:
        base = name[:-len("weight_packed")]
        module = {key[len(base):]: value for key, value in state.items() if key.startswith(base)
                  and key[len(base):].startswith("weight_")}
        dense[base + "weight"] = PackedQuantizationCompressor.decompress(module, scheme)["weight"]
    return dense


def dense_reference(folder: Path):
    """A transformers model (no quantization) holding the package's decompression of `folder`."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(folder))
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).eval().float()
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in package_dequantized(folder).items()},
                                                strict=False)
    assert not unexpected and all(name == "lm_head.weight" for name in missing), (missing, unexpected)
    return model
