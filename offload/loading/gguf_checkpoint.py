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


def _halves(qs: np.ndarray) -> np.ndarray:
    """Bytes [N, ..., k] -> their low nibbles then their high nibbles [N, ..., 2k] (GGML's order)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _float16(raw: np.ndarray) -> np.ndarray:
    """Two bytes per row [N, 2] -> float16 [N, 1]."""
    return np.ascontiguousarray(raw).view(np.float16)


def _block_codes(kind: str, blocks: np.ndarray):
    """GGML blocks [N, bytes] -> (codes [N, weights] uint8 0..15 for 4-bit layouts, else int8; scales
    [N, sub-blocks]; mins [N, sub-blocks] or None) with w = code * scale (+ min; 4-bit codes without mins:
    (code - 8) * scale) the package's value exactly
    (the layouts: placement/gguf_file.py PACKED_TYPES; the bit layouts as gguf.quants dequantizes them)."""
    import gguf
    n = blocks.shape[0]
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        d = _float16(blocks[:, 0:2])
        m = _float16(blocks[:, 2:4]) if kind in ("Q4_1", "Q5_1") else None
        rest = blocks[:, 4 if m is not None else 2:]
        if kind == "Q8_0":
            return np.ascontiguousarray(rest).view(np.int8), d, None
        if kind in ("Q4_0", "Q4_1"):
            codes = _halves(rest)                                                    # [N, 32] 0..15
            return codes, d, m                                                     # Q4_0: int4-sym
        qh = np.ascontiguousarray(rest[:, :4]).view(np.uint32)                      # [N, 1]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)        # [N, 32]
        codes = (_halves(rest[:, 4:]) | (high << 4)).astype(np.int8)                # 0..31
        return (codes - 16, d, None) if kind == "Q5_0" else (codes, d, m)
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _float16(blocks[:, 0:2]).astype(np.float32), _float16(blocks[:, 2:4]).astype(np.float32)
        sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(blocks[:, 4:16]))   # [N, 8] each
        scales, mins = d * sc.astype(np.float32), -(dmin * m.astype(np.float32))
        if kind == "Q4_K":
            codes = _halves(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 256)          # sub-blocks 2c, 2c+1
            return codes, scales, mins
        low = _halves(blocks[:, 48:].reshape(n, 4, 32)).reshape(n, 8, 32)
        high = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        return (low | (high << 4)).astype(np.int8).reshape(n, 256), scales, mins
    assert kind == "Q6_K", kind
    ql = (blocks[:, :128].reshape(n, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
    qh = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = (ql.reshape(n, 8, 32) | (qh.reshape(n, 8, 32) << 4)).astype(np.int8) - 32     # [N, 8, 32]
    scales = _float16(blocks[:, 208:210]).astype(np.float32) * \
        np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)     # [N, 16]
    return codes.reshape(n, 256), scales, None


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
            if found != tuple(shape) and not (shape[0] == 1 and found == tuple(shape[1:])):   # (a [1, H] row as [H])
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

    @property
    def layouts(self) -> dict:
        """The matrices held packed as the file stores them (the layers', the token table, the LM head): name ->
        Quantization (gguf_file.py)."""
        return self.model.packed_layouts(self.arch.packable_tensors())

    def read_quantized(self, name: str, dtype) -> QuantizedWeight:
        """A quantized matrix converted code for code into the packed layout its GGML type maps to
        (placement/gguf_file.py PACKED_TYPES), scales and mins in `dtype`, q/k rows unpermuted."""
        import gguf
        tensor = self.model.tensors[name]
        rows, cols = self._expected[name]
        block, size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
        blocks = np.asarray(tensor.data).reshape(rows * (cols // block), size)         # [N, bytes]
        codes, scales, mins = _block_codes(tensor.tensor_type.name, blocks)             # [N, block], [N, S]
        parts = {"qweight": codes.reshape(rows, cols), "scales": scales.reshape(rows, -1)}
        if mins is not None:
            parts["mins"] = mins.reshape(rows, -1)
        if codes.dtype == np.uint8:                                                     # 4-bit: our nibbles
            parts["qweight"] = parts["qweight"][:, 0::2] | (parts["qweight"][:, 1::2] << 4)
        if self.model.permutes_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = self.arch.num_heads if ".q_proj." in name else self.arch.num_kv_heads
            parts = {key: _unpermute(value, heads) for key, value in parts.items()}    # whole rows move
        out = {key: torch.from_numpy(np.array(value)) for key, value in parts.items()}       # own copies
        target = torch_dtype(dtype)
        weight = QuantizedWeight(qweight=out["qweight"], scales=out["scales"].to(target),
                                 mins=None if "mins" not in out else out["mins"].to(target))
        assert weight.scheme == self.layouts[name].scheme and weight.group_size == self.layouts[name].group_size
        return weight

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
        if self.model.shifts_norm(name):
            values = values - 1                          # stored + 1 (as transformers' loader undoes it)
        values = np.ascontiguousarray(values)
        out = torch.from_numpy(values if values.flags.writeable else values.copy())   # F32 data is the mmap
        return out if dtype is None else out.to(torch_dtype(dtype))

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, {self.arch.model_type})"
