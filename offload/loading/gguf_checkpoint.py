"""A .gguf file opened as a checkpoint: the same `arch` / `read` / generation defaults as `Checkpoint`.

Tensors are dequantized by the `gguf` package (every type llama.cpp writes that placement/gguf_file.py
lists) to float32 and then to the dtype asked for; llama.cpp's q/k row interleaving of Llama models is
undone, as transformers' GGUF loader does. One tensor at a time, as it is read.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from offload.loading.checkpoint import CheckpointError, torch_dtype
from offload.weights.quant import QuantizedWeight
from placement.architecture import Architecture, ConfigError
from placement.gguf_file import read_gguf


def _unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows [heads * D, ...]: each head's halves were interleaved."""
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)


class GGUFCheckpoint:
    """A .gguf file opened lazily (the gguf package memory-maps it); `read` returns one dense tensor."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self.model = read_gguf(self.path)
            self.arch = Architecture.from_config(self.model.config)
        except ConfigError as error:
            raise CheckpointError(str(error)) from None
        expected = self.arch.all_tensors()
        missing = [name for name in expected if name not in self.model.tensors]
        if missing:
            raise CheckpointError(f"{self.path}: the GGUF file lacks tensors {', '.join(missing[:4])}"
                                  f"{f' ... ({len(missing)} in all)' if len(missing) > 4 else ''}")
        for name, shape in expected.items():
            found = tuple(int(n) for n in reversed(self.model.tensors[name].shape.tolist()))   # GGUF: ne[0] last
            if found != tuple(shape):
                raise CheckpointError(f"{self.path}: tensor {self.model.tensors[name].name} has shape "
                                      f"{list(found)}, expected {list(shape)} from its metadata")
        self._expected = expected

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.arch.eos_token_ids

    @property
    def sampling_defaults(self) -> dict:
        return {"temperature": 0.0, "top_k": None, "top_p": None}

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def quantization(self, dtype: str) -> str | None:
        """The packed layout its layers' matrices are held in for a `dtype` model, or None (dequantized)."""
        return self.model.packed_quantization(self.arch.quantizable_tensors(), dtype)

    def read_quantized(self, name: str, dtype) -> QuantizedWeight:
        """A Q4_0 / Q4_1 / Q8_0 matrix converted exactly into our packed layout (group 32, float16 scales
        held in `dtype`): the codes of each 32-weight block and its scale (and min), q/k rows unpermuted."""
        import gguf
        tensor = self.model.tensors[name]
        kind = tensor.tensor_type.name
        rows, cols = self._expected[name]
        block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]                       # 32 weights a block
        assert block == 32 and kind in ("Q4_0", "Q4_1", "Q8_0"), (kind, block)
        blocks = np.asarray(tensor.data).reshape(rows, cols // block, size)           # [out, G, bytes]
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]                          # [out, G]
        if kind == "Q8_0":
            codes = blocks[..., 2:].copy().view(np.int8).reshape(rows, cols)           # [out, in]
            parts = dict(qweight=codes, scales=d)
        else:
            qs = blocks[..., 4 if kind == "Q4_1" else 2:]                              # [out, G, 16]
            codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, cols)   # block j, j+16
            mins = blocks[..., 2:4].copy().view(np.float16)[..., 0] if kind == "Q4_1" else \
                (-8 * d.astype(np.float32)).astype(np.float16)                        # exact: a power of 2
            packed = codes[:, 0::2] | (codes[:, 1::2] << 4)                            # our nibble order
            parts = dict(qweight=packed, scales=d, mins=mins)
        if self.model.permutes_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.arch.num_heads if ".q_proj." in name else self.arch.num_kv_heads
            parts = {key: _unpermute(value, heads) for key, value in parts.items()}    # whole rows move
        out = {key: torch.from_numpy(np.array(value)) for key, value in parts.items()}       # own copies
        target = torch_dtype(dtype)
        return QuantizedWeight(qweight=out["qweight"], scales=out["scales"].to(target),
                               mins=None if "mins" not in out else out["mins"].to(target))

    @property
    def quantized_types(self) -> tuple[str, ...]:
        """The GGML quantized types of its tensors (F32/F16/BF16 are not)."""
        kinds = {t.tensor_type.name for t in self.model.tensors.values()}
        return tuple(sorted(kinds - {"F32", "F16", "BF16"}))

    def read(self, name: str, dtype=None) -> torch.Tensor:
        """One tensor on the CPU, dequantized and converted to `dtype` (default float32)."""
        import gguf
        if name not in self._expected:
            raise KeyError(f"{name!r} is not a tensor of this {self.arch.model_type} architecture")
        tensor = self.model.tensors[name]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as error:                 # noqa: BLE001 (a truncated or corrupt block)
            raise CheckpointError(f"{self.path}: cannot read tensor {tensor.name} ({error})") from None
        values = np.asarray(values, dtype=np.float32).reshape(self._expected[name])
        if self.model.permutes_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.arch.num_heads if ".q_proj." in name else self.arch.num_kv_heads
            values = _unpermute(values, heads)
        values = np.ascontiguousarray(values)
        out = torch.from_numpy(values if values.flags.writeable else values.copy())   # F32 data is the mmap
        return out if dtype is None else out.to(torch_dtype(dtype))

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {self.arch.model_type})"
