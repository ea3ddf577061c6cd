"""Read the JSON headers of safetensors files (never the tensors) for exact per-tensor dtype and bytes.

A safetensors file starts with an 8-byte little-endian length N, then N bytes of JSON:
`{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}`.
A sharded checkpoint lists its files in `model.safetensors.index.json` (`weight_map`: name -> file).
Pure Python: no torch, no safetensors package.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .architecture import ConfigError
from .jsonfile import read_json_object

# safetensors dtype code -> (our dtype name or None when we cannot run it, bytes per element)
SAFETENSORS_DTYPES = {"BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4),
                      "F64": (None, 8), "I64": (None, 8), "I32": (None, 4), "I16": (None, 2),
                      "I8": (None, 1), "U8": (None, 1), "BOOL": (None, 1),
                      "F8_E4M3": (None, 1), "F8_E5M2": (None, 1)}
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it."""

    name: str
    dtype: str            # safetensors code: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    num_bytes: int
    file: str


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo for every tensor in one .safetensors file; reads only the header."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise ConfigError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", prefix)
            size = path.stat().st_size
            if length == 0 or length > min(_MAX_HEADER_BYTES, size - 8):
                raise ConfigError(f"{path}: not a safetensors file (header length {length} does not "
                                  f"fit a {size}-byte file)")
            raw = f.read(length)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read safetensors header ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConfigError(f"{path}: safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: safetensors header is not a JSON object")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), \
                entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise ConfigError(f"{path}: malformed header entry for tensor {name!r}") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise ConfigError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        numel = 1
        for s in shape:
            numel *= s
        num_bytes = int(end) - int(begin)
        if num_bytes != numel * SAFETENSORS_DTYPES[dtype][1] or int(end) > size - 8 - length:
            raise ConfigError(f"{path}: tensor {name!r} data offsets {begin}..{end} do not match its "
                              f"shape {list(shape)} and dtype {dtype}")
        tensors[name] = TensorInfo(name=name, dtype=dtype, shape=shape, num_bytes=num_bytes,
                                   file=path.name)
    return tensors


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The .safetensors files of a checkpoint directory: those its index names, else all of them."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = read_json_object(index, ConfigError).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConfigError(f"{index}: malformed index (expected a JSON object with a "
                              f"'weight_map' of tensor name -> file)")
        names = sorted(set(weight_map.values()))
        files = [directory / n for n in names]
        missing = [str(f.name) for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{index}: names missing shard file(s) {', '.join(missing)}")
        return files
    return sorted(directory.glob("*.safetensors"))


def read_checkpoint_headers(directory: str | Path) -> dict[str, TensorInfo]:
    """Name -> TensorInfo over all shards of a checkpoint directory (empty when it has none)."""
    tensors: dict[str, TensorInfo] = {}
    for path in checkpoint_files(directory):
        for name, info in read_header(path).items():
            if name in tensors:
                raise ConfigError(f"{directory}: tensor {name!r} appears in both "
                                  f"{tensors[name].file} and {info.file}")
            tensors[name] = info
    return tensors
