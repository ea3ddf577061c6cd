"""A random-weight Hugging Face checkpoint for a real config: what the offload benchmarks load.

    from random_checkpoint import build_random_checkpoint, read_config
    path = build_random_checkpoint(read_config("llama-3.1-8b"), "bfloat16", "/tmp/bench-models")

One folder per (config, dtype): config.json (the given config with its dtype set, eos removed so that every
run generates exactly the tokens asked for, and the fields the two readers could default differently
written out) and safetensors shards of at most `max_shard_bytes` (model.safetensors when one suffices,
else model-0000i-of-0000n.safetensors + model.safetensors.index.json, as save_pretrained writes them).
Tensor names and shapes come from `placement.Architecture.all_tensors()`; matrices are N(0, 0.02) (the
config's initializer_range), norm weights 1, biases 0. Weights are generated on the GPU when there is
one, else on the CPU, a row block at a time, and only one shard is in memory at once: an 8B model
builds in well under a few minutes. A folder is reused only when its `.complete` marker (written last)
records the same config and dtype, so an interrupted build is rebuilt.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from placement import presets
from placement.architecture import Architecture, ConfigError, normalize_dtype
from placement.jsonfile import read_json_object

DEFAULT_MAX_SHARD_BYTES = 2 << 30
BLOCK_NUMEL = 1 << 25                    # elements generated per call: bounds the temporary memory
MARKER = ".complete"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_config(name_or_path: str) -> dict:
    """A config.json path or a placement preset name ('llama-3.1-8b') -> the config dict.

    Raises ConfigError (a ValueError) naming the file or the closest presets.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        config = read_json_object(path, ConfigError)
        Architecture.from_config(config)                  # unsupported model types fail here, by name
        return config
    if str(name_or_path).endswith(".json") or path.parent.exists() and path.parent != Path("."):
        raise ConfigError(f"{name_or_path}: no such file (expected a config.json or a preset name)")
    return presets.load(name_or_path)                     # also 'meta-llama/Llama-3.1-8B'; errors name close ones


def benchmark_config(config: dict, dtype: str) -> dict:
    """The config both runtimes read: `dtype` set, no eos, defaults that could differ made explicit."""
    dtype = normalize_dtype(dtype)
    arch = Architecture.from_config({**config, "torch_dtype": dtype})
    out = {k: v for k, v in config.items() if k not in ("torch_dtype", "dtype", "eos_token_id")}
    out.update(dtype=dtype, eos_token_id=None, tie_word_embeddings=arch.tie_word_embeddings,
               use_cache=True)
    out.setdefault("num_key_value_heads", arch.num_kv_heads)     # a config key the family ignores is harmless
    out.setdefault("head_dim", arch.head_dim)
    return out


def _fill(tensor: torch.Tensor, name: str, std: float, generator: torch.Generator, device) -> None:
    """Norm weights 1, biases 0, everything else N(0, std), generated one row block at a time."""
    if name.endswith(".bias"):
        tensor.zero_()
        return
    if tensor.dim() == 1:                                  # a norm weight
        tensor.fill_(1.0)
        return
    rows = tensor.view(tensor.shape[0], -1)               # [R, C]
    block = max(1, BLOCK_NUMEL // rows.shape[1])
    for start in range(0, rows.shape[0], block):
        part = rows[start:start + block]
        random = torch.empty(part.shape, dtype=part.dtype, device=device).normal_(0.0, std, generator=generator)
        part.copy_(random)


def _shards(tensors: dict[str, tuple], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, shape in tensors.items():
        numel = 1
        for s in shape:
            numel *= s
        if current and size + numel * itemsize > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += numel * itemsize
    return shards + [current] if current else shards


def _fingerprint(config: dict, seed: int, max_shard_bytes: int) -> str:
    text = json.dumps({"config": config, "seed": seed, "max_shard_bytes": max_shard_bytes}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def build_random_checkpoint(config: dict, dtype: str, workdir: str | Path, *, label: str = "", seed: int = 0,
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, log=print) -> Path:
    """The folder of a random checkpoint of `config` in `dtype` under `workdir`, built unless cached.

    label: names the folder (e.g. the preset name); the folder name also carries a hash of the config.
    """
    config = benchmark_config(config, dtype)
    arch = Architecture.from_config(config)
    fingerprint = _fingerprint(config, seed, max_shard_bytes)
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in (label or arch.model_type))
    path = Path(workdir).expanduser() / f"random-{name}-{arch.dtype}-{fingerprint[:12]}"
    marker = path / MARKER
    if marker.is_file() and marker.read_text(encoding="utf-8").strip() == fingerprint:
        return path
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    torch_dtype = TORCH_DTYPES[arch.dtype]
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(seed)
    std = float(config.get("initializer_range", 0.02))
    tensors = arch.all_tensors()
    shards = _shards(tensors, itemsize, max_shard_bytes)
    log(f"building a random {arch.model_type} checkpoint ({arch.num_params / 1e9:.2f}B parameters, "
        f"{arch.dtype}, {len(shards)} shard(s)) in {path} ...")
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, names in zip(files, shards):
        data = {}
        for tensor_name in names:
            data[tensor_name] = torch.empty(tensors[tensor_name], dtype=torch_dtype)
            _fill(data[tensor_name], tensor_name, std, generator, device)
            weight_map[tensor_name] = file
        save_file(data, str(path / file), metadata={"format": "pt"})
        del data
    if len(shards) > 1:
        index = {"metadata": {"total_size": arch.num_params * itemsize}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    marker.write_text(fingerprint + "\n", encoding="utf-8")
    return path
