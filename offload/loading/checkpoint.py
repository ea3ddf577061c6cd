"""Lazy reading of a Hugging Face checkpoint folder: config.json, generation_config.json, safetensors.

`Checkpoint(path)` checks everything it can from the headers alone (every tensor the architecture needs is
present with its exact shape, every shard opens) and reads tensor data only when asked, one tensor at a
time, so nothing beyond what the caller keeps is ever materialised.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from offload.loading.compressed_tensors import unpack
from offload.weights.quant import QuantizedWeight
from placement import compressed_tensors as compressed
from placement.architecture import Architecture, ConfigError, normalize_dtype
from placement.headers import read_checkpoint_headers
from placement.jsonfile import read_json_object
from placement.quantization import layouts_label

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder this library cannot load; the message names the file and the problem."""


def torch_dtype(dtype) -> torch.dtype:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16 (float32, bfloat16, float16 only)."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype)
    return TORCH_DTYPES[normalize_dtype(dtype)]


def _read_json(path: Path) -> dict:
    return read_json_object(path, CheckpointError)


def _as_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


class Checkpoint:
    """A checkpoint folder opened lazily. `arch` describes it; `read` returns one validated tensor."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "not a folder" if self.path.exists() else "no such folder or file"
            raise CheckpointError(f"{self.path}: {what} (give a Hugging Face model folder, a .gguf file or a Hub "
                                  "name such as Qwen/Qwen3-8B)")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing; a model folder needs config.json")
        self.config = _read_json(config_path)
        try:
            self.arch = Architecture.from_config(self.config)
        except ConfigError as e:
            raise CheckpointError(f"{config_path}: {e}") from e
        gen_path = self.path / "generation_config.json"
        self.generation_config = _read_json(gen_path) if gen_path.is_file() else {}
        self._handles: dict[Path, object] = {}             # shard path -> open safe_open handle
        self._files = self._locate_files()                 # tensor name -> shard path
        self._expected = self.arch.all_tensors()           # name -> shape
        self._packed = self._packed_matrices()             # name -> Quantization (compressed-tensors)
        self._check_tensors()

    # ---- generation defaults ----------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids as transformers' generate uses them: generation_config.json's, else config.json's."""
        if "eos_token_id" in self.generation_config:
            return _as_ids(self.generation_config["eos_token_id"])
        return self.arch.eos_token_ids

    @property
    def sampling_defaults(self) -> dict:
        """temperature/top_k/top_p from generation_config.json; greedy unless it says do_sample."""
        g = self.generation_config
        if not g.get("do_sample", False):
            return {"temperature": 0.0, "top_k": None, "top_p": None}
        return {"temperature": float(g.get("temperature", 1.0)), "top_k": g.get("top_k"),
                "top_p": g.get("top_p")}

    # ---- files ------------------------------------------------------------------------------------
    def _locate_files(self) -> dict[str, Path]:
        index_path, single = self.path / INDEX_FILE, self.path / SINGLE_FILE
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' object")
            files = {name: self.path / shard for name, shard in weight_map.items()}
            for shard in sorted(set(files.values())):
                if not shard.is_file():
                    raise CheckpointError(f"{index_path}: names shard {shard.name!r}, which is missing "
                                          f"from {self.path}")
            return files
        if single.is_file():
            return {name: single for name in self._open(single).keys()}
        raise CheckpointError(f"{self.path}: no {SINGLE_FILE} and no {INDEX_FILE} (only safetensors "
                              "checkpoints are supported)")

    def _open(self, file: Path):
        handle = self._handles.get(file)
        if handle is None:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except Exception as e:  # SafetensorError is not importable by a stable name
                raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({e})") from e
            self._handles[file] = handle
        return handle

    def _packed_matrices(self) -> dict:
        """The matrices a compressed-tensors checkpoint stores packed, and our layout for each."""
        if compressed.quantization_config(self.config) is None:
            return {}
        try:
            return compressed.packed_matrices(self.config, self._expected, read_checkpoint_headers(self.path),
                                              self.path)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None

    def _check_tensors(self) -> None:
        missing = [name for name in self._expected if name not in self._files and name not in self._packed]
        if missing:
            shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise CheckpointError(f"{self.path}: checkpoint is missing tensors: {shown}")
        for name, shape in self._expected.items():
            if name in self._packed:                       # shapes checked from the headers
                continue
            file = self._files[name]
            handle = self._open(file)
            if name not in handle.keys():
                raise CheckpointError(f"{file}: index says it holds {name!r}, but it does not")
            found = tuple(handle.get_slice(name).get_shape())
            if found != tuple(shape):
                raise CheckpointError(f"{file}: tensor {name!r} has shape {list(found)}, expected "
                                      f"{list(shape)} from config.json")

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._files.values()))

    @property
    def quantized_types(self) -> tuple[str, ...]:
        """The quantized formats it holds (none: a 16/32-bit checkpoint)."""
        label = layouts_label(self._packed.values())
        return () if label is None else (f"{compressed.FORMAT} {label}",)

    @property
    def layouts(self) -> dict:
        """The layers' matrices held packed as the file stores them, name -> Quantization (a
        compressed-tensors checkpoint; none for 16/32-bit tensors, quantized only on request)."""
        quantizable = self.arch.quantizable_tensors()
        return {name: layout for name, layout in self._packed.items() if name in quantizable}

    def read_quantized(self, name: str, dtype) -> QuantizedWeight:
        """A pack-quantized matrix converted code for code into its layout, scales and mins in `dtype`."""
        base = name[:-len("weight")]
        parts = {suffix: self._get(base + suffix) if base + suffix in self._files else None
                 for suffix in (compressed.PACKED, compressed.SCALE, compressed.ZERO_POINT)}
        return unpack(parts[compressed.PACKED], parts[compressed.SCALE], parts[compressed.ZERO_POINT],
                      self._packed[name], tuple(self._expected[name]), torch_dtype(dtype))

    # ---- reading ----------------------------------------------------------------------------------
    def read(self, name: str, dtype=None) -> torch.Tensor:
        """One tensor on the CPU, converted to `dtype` (default: as stored), shape checked."""
        if name not in self._expected:
            raise KeyError(f"{name!r} is not a tensor of this {self.arch.model_type} architecture")
        if name in self._packed:          # a packed matrix dequantized (exactly, in float32)
            weight = self.read_quantized(name, torch.float32)
            scale_dtype = self._get(name[:-len("weight")] + compressed.SCALE).dtype
            return weight.dequantize(torch.float32).to(torch_dtype(dtype) if dtype is not None else scale_dtype)
        tensor = self._get(name)
        assert tuple(tensor.shape) == tuple(self._expected[name]), (name, tensor.shape)
        return tensor if dtype is None else tensor.to(torch_dtype(dtype))

    def _get(self, name: str) -> torch.Tensor:
        file = self._files[name]
        try:
            return self._open(file).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e

    def read_many(self, names, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
        """Several tensors, each converted and moved to `device` before the next is read."""
        return {name: self.read(name, dtype).to(device) for name in names}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {self.arch.model_type}, {len(self.files)} file(s))"


def open_checkpoint(path):
    """A Hugging Face folder (`Checkpoint`) or a .gguf file / a folder holding one (`GGUFCheckpoint`); `path` may
    be a Hugging Face Hub name or a pip package shipping a GGUF file (placement/hub.py: cached or downloaded)."""
    from offload.loading.gguf_checkpoint import GGUFCheckpoint
    from placement.gguf_file import find_gguf
    from placement.hub import resolve_model
    try:
        path = resolve_model(path)
        gguf_path = find_gguf(path)
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    return Checkpoint(path) if gguf_path is None else GGUFCheckpoint(gguf_path)
