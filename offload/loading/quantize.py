"""`quantize`: a 16/32-bit Hugging Face folder -> a compressed-tensors `pack-quantized` folder (the format:
placement/compressed_tensors.py) that transformers (with compressed-tensors installed) and vLLM load, and
`offload.load` loads back fast (the packed codes are our layouts' bytes: no requantizing).

Read and written one tensor at a time (never the whole model in 16 bits); shards of at most SHARD_BYTES; the
folder appears only when complete (written beside it under a temporary name, then renamed), so a failed or
interrupted run leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from offload.loading.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, CheckpointError, open_checkpoint
from offload.loading.compressed_tensors import pack
from offload.weights.quant import quantize_integer
from placement import compressed_tensors as compressed
from placement.quantization import GROUP_SIZES, QUANTIZE_SCHEMES, Quantization

SHARD_BYTES = 4 << 30
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def quantization_config(bits: int, group_size: int | None, symmetric: bool, ignore: list[str]) -> dict:
    """config.json's `quantization_config` for the layers' Linear modules in `bits`, per group of
    `group_size` inputs (None: per output channel), as the compressed-tensors package writes it."""
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "channel" if group_size is None else "group", "group_size": group_size}
    return {"quant_method": compressed.METHOD, "format": compressed.FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": compressed.FORMAT}},
            "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}}


def _group_size(checkpoint: Checkpoint, scheme: str, group_size: int | None) -> int | None:
    """One group size for every layer matrix (compressed-tensors names one per config group): the given one
    (checked to divide every matrix's inputs), else the largest of GROUP_SIZES that divides them all, else
    None (per output channel)."""
    matrices = checkpoint.arch.quantizable_tensors()
    quantization = Quantization(scheme=scheme, group_size=group_size)
    for name, shape in matrices.items():
        quantization.parts(name, shape, "float32")          # ConfigError: a group that does not divide
    if group_size is not None:
        return group_size
    return next((g for g in GROUP_SIZES if all(shape[1] % g == 0 for shape in matrices.values())), None)


def quantize(src, dst, scheme: str = "int4", group_size: int | None = None, *, symmetric: bool = True,
             progress: bool = True) -> Path:
    """Write `src` (a Hugging Face folder of 16/32-bit safetensors) to the new folder `dst` with the decoder
    layers' matrices in `scheme` ("int4" | "int8") per group of `group_size` inputs (None: the largest of
    128/64/32 dividing every matrix, else per channel), symmetric (w = q * scale; what vLLM's fastest kernels
    take) or not (an integer zero point per group); everything else as it is, with config.json (plus its
    quantization_config), the tokenizer and generation files copied. 4-bit scales are fitted (see
    `quantize_integer`). Returns `dst`. ValueError (CheckpointError / ConfigError) naming the problem for a
    quantized or GGUF source, an existing non-empty `dst`, an unknown scheme or a group size that does not
    divide; nothing is written then."""
    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"unknown quantization {scheme!r}; use one of {', '.join(QUANTIZE_SCHEMES)}")
    checkpoint = open_checkpoint(src)
    if not isinstance(checkpoint, Checkpoint):
        raise CheckpointError(f"{checkpoint.path}: a GGUF file; quantize writes from a Hugging Face folder "
                              "(load the GGUF directly: offload.load)")
    if checkpoint.quantized_types:
        raise CheckpointError(f"{checkpoint.path}: already quantized ({', '.join(checkpoint.quantized_types)})")
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"{dst}: exists and is not an empty folder; name a new one")
    group = _group_size(checkpoint, scheme, group_size)
    partial = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        _write(checkpoint, partial, 4 if scheme == "int4" else 8, group, symmetric, progress)
        if dst.exists():
            dst.rmdir()
        partial.rename(dst)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return dst


def _write(checkpoint: Checkpoint, folder: Path, bits: int, group: int | None, symmetric: bool,
           progress: bool) -> None:
    arch = checkpoint.arch
    shapes, matrices = arch.all_tensors(), arch.quantizable_tensors()
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for name in tqdm(shapes, desc=f"quantizing {checkpoint.path.name}", unit="tensor", disable=not progress,
                     leave=False):
        tensor = checkpoint.read(name)
        if name in matrices:
            q, scale, zp = quantize_integer(tensor, bits, group or shapes[name][1], symmetric=symmetric)
            base = name[:-len("weight")]
            tensors = {base + key: value for key, value in pack(q, bits, zp).items()}
            tensors[base + compressed.SCALE] = scale.contiguous()
        else:
            tensors = {name: tensor.contiguous()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if sizes[-1] and sizes[-1] + size > SHARD_BYTES:
            _save(shards, folder)
            shards.append({})
            sizes.append(0)
        shards[-1].update(tensors)
        sizes[-1] += size
    files = _save(shards, folder, last=True)
    if len(files) > 1:
        weight_map = {name: file for file, names in files.items() for name in names}
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes)},
                                                     "weight_map": weight_map}, indent=2))
    config = dict(checkpoint.config)
    # every other Linear stays dense; "lm_head" always (a tied head has no tensor of its own, but is a Linear)
    ignore = sorted({name[:-len(".weight")] for name, shape in shapes.items()
                     if len(shape) == 2 and name not in matrices and name.endswith(".weight")} | {"lm_head"})
    config["quantization_config"] = quantization_config(bits, group, symmetric, ignore)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for path in sorted(checkpoint.path.iterdir()):          # tokenizer, chat template, generation config
        if path.is_file() and path.name != "config.json" and not path.name.endswith(WEIGHT_FILES) \
                and path.name != INDEX_FILE:
            shutil.copy2(path, folder / path.name)


def _save(shards: list[dict], folder: Path, last: bool = False) -> dict[str, list[str]]:
    """Write the newest shard (all of them named once the count is known, `last`): file -> tensor names."""
    if not last:
        save_file(shards[-1], str(folder / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
        shards[-1] = {name: None for name in shards[-1]}          # written: keep the names only
        return {}
    count = len(shards)
    if count == 1:
        save_file(shards[0], str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return {SINGLE_FILE: list(shards[0])}
    save_file(shards[-1], str(folder / f"shard-{count:05d}.safetensors"), metadata={"format": "pt"})
    files = {}
    for i, shard in enumerate(shards, start=1):
        final = f"model-{i:05d}-of-{count:05d}.safetensors"
        (folder / f"shard-{i:05d}.safetensors").rename(folder / final)
        files[final] = list(shard)
    return files
