"""compressed-tensors `pack-quantized` tensors <-> our packed layouts (the format: placement/compressed_tensors.py).

For 4 and 8 bits the package's dense int32 packing is a byte layout: viewed as bytes, a 4-bit row holds code
2j in the low nibble of byte j and 2j+1 in the high one (our int4 qweight), an 8-bit row one code a byte; the
codes are stored with an offset of 2^(bits-1). Zero points are packed the same way along the output dim.
"""
from __future__ import annotations

import sys

import torch

from offload.weights.quant import QuantizedWeight
from placement.quantization import Quantization

assert sys.byteorder == "little", "the int32 words are read as little-endian bytes"


def _codes(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """int32 words [rows, W] -> the bytes holding each row's first `count` stored codes: uint8
    [rows, ceil(count / 2)] (two 4-bit codes a byte) or [rows, count] (8-bit)."""
    assert words.dtype == torch.int32 and words.dim() == 2, (words.dtype, words.shape)
    width = -(-count // 2) if bits == 4 else count
    return words.clone(memory_format=torch.contiguous_format).view(torch.uint8)[:, :width]


def _signed(stored: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored codes (bytes: two 4-bit ones, or one 8-bit) -> signed values q [rows, count] as int16."""
    if bits == 8:
        return stored.to(torch.int16) - 128
    return torch.stack((stored & 0xF, stored >> 4), dim=-1).view(stored.shape[0], -1).to(torch.int16) - 8


def unpack(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, layout: Quantization,
           shape: tuple[int, int], dtype: torch.dtype) -> QuantizedWeight:
    """A pack-quantized matrix [out, in] -> a QuantizedWeight in `layout` with scales and mins in `dtype`."""
    out, inputs = shape
    bits = layout.bits
    assert scale.shape == (out, inputs // layout.group_size), (scale.shape, shape, layout)
    stored = _codes(packed, bits, inputs)                                         # [out, in / 2] or [out, in]
    zp = None if zero_point is None else \
        _signed(_codes(zero_point.t(), bits, out), bits)[:, :out].t().to(torch.float32)   # [out, G]
    scale32 = scale.to(torch.float32)
    if bits == 4:                                                                 # code q + 8
        mins = None if zp is None else (-(8 + zp) * scale32).to(dtype)           # (symmetric: int4-sym)
        return QuantizedWeight(qweight=stored.clone(), scales=scale.to(dtype), mins=mins)
    codes = (stored ^ 0x80).view(torch.int8).clone()                              # q = stored - 128
    return QuantizedWeight(qweight=codes, scales=scale.to(dtype),
                           mins=None if zp is None else (-zp * scale32).to(dtype))


def _words(stored: torch.Tensor) -> torch.Tensor:
    """Bytes [rows, n] -> int32 words [rows, ceil(n / 4)] (zero bytes pad the last word)."""
    rows, n = stored.shape
    padded = torch.zeros(rows, -(-n // 4) * 4, dtype=torch.uint8)
    padded[:, :n] = stored
    return padded.view(torch.int32)


def _stored(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed values q [rows, count] -> stored codes as bytes (q + 2^(bits-1); two 4-bit ones a byte, an odd
    count's last high nibble 0, as the package pads)."""
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 8:
        return u
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[:, 0::2] | (u[:, 1::2] << 4)


def pack(q: torch.Tensor, bits: int, zero_point: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Signed codes q [out, in] (and signed zero points [out, G]) -> the packed tensors, keyed by suffix."""
    assert bits in (4, 8) and q.dim() == 2 and (bits == 8 or q.shape[1] % 2 == 0), (bits, q.shape)
    tensors = {"weight_packed": _words(_stored(q, bits)),
               "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    if zero_point is not None:
        stored = _stored(zero_point.t(), bits)                                   # [G, out (/ 2)]
        tensors["weight_zero_point"] = _words(stored).t().contiguous()           # [out * bits / 32, G]
    return tensors
