"""Quantized weight layouts: which tensors are quantized, into what, and their exact bytes. Torch-free.

The one place the layouts are defined (offload/quant.py packs and unpacks them). Quantize-on-load packs the
decoder layers' matrices (2-D `.weight` tensors); norms, biases, the embedding and the LM head keep the model
dtype, unless a GGUF file holds the token table and the LM head packed (then they are held as it has them: a
row per token, gathered packed by the embedding and multiplied packed by the head).
A matrix [out, in] with group size g (in / g groups per row) becomes three tensors:

    int4  qweight  uint8 [out, in / 2]   two 4-bit codes per byte: column 2j in the low nibble, 2j+1 high
          scales   dtype [out, in / g]   w = code * scale + min (asymmetric, codes 0..15)
          mins     dtype [out, in / g]
    int4-sym                             as int4 without mins: w = (code - 8) * scale (held as files give
                                         it: GGUF's Q4_0, compressed-tensors' symmetric int4)
    int8  qweight  int8  [out, in]       w = code * scale (symmetric, codes -127..127)
          scales   dtype [out, in / g]
    int8-asym                            as int8 plus mins [out, in / g]: w = code * scale + min
                                         (held as files give it: GGUF's 5-bit types, codes 0..31)

`dtype` is the model dtype (bfloat16/float16/float32). For 4-bit at g = 64 that is 0.5625 bytes a weight:
0.28x of bfloat16, which is also what crosses PCIe when the layer is streamed.

A model's layouts are per tensor (`layouts_label` names a set of them): quantize-on-load gives every matrix
one layout, a GGUF file gives each the layout its GGML type converts into (placement/gguf_file.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from placement.config_fields import DTYPE_BYTES, ConfigError

SCHEMES = ("int4", "int4-sym", "int8", "int8-asym")
QUANTIZE_SCHEMES = ("int4", "int8")   # what quantize-on-load writes (int4-sym, int8-asym are only read from files)
GROUP_SIZES = (128, 64, 32)          # the default: the largest that divides a matrix's input size
PARTS = {"int4": ("qweight", "scales", "mins"), "int4-sym": ("qweight", "scales"), "int8": ("qweight", "scales"),
         "int8-asym": ("qweight", "scales", "mins")}


@dataclass(frozen=True)
class Quantization:
    """A packed layout: "int4", "int4-sym", "int8" or "int8-asym", with a group size (None: per matrix, the largest of
    GROUP_SIZES dividing its input size, else one group per row)."""

    scheme: str
    group_size: int | None = None

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization {self.scheme!r}; use one of {', '.join(SCHEMES)}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 2 or self.group_size % 2):
            raise ConfigError(f"group_size must be an even integer >= 2 or None, got {self.group_size!r}")

    @classmethod
    def parse(cls, name: str) -> "Quantization":
        """ "int4", "int4-g64", "int8-g128", "int8-asym-g32" (as `label` writes it) -> Quantization."""
        scheme, _, group = str(name).strip().lower().partition("-g")
        if group and not group.isdigit():
            raise ConfigError(f"unknown quantization {name!r}; use {', '.join(QUANTIZE_SCHEMES)}, or e.g. "
                              "int4-g64")
        return cls(scheme=scheme, group_size=int(group) if group else None)

    @property
    def label(self) -> str:
        return self.scheme if self.group_size is None else f"{self.scheme}-g{self.group_size}"

    @property
    def bits(self) -> int:
        return 4 if self.scheme.startswith("int4") else 8

    def group_size_for(self, name: str, shape: tuple[int, ...]) -> int:
        """The group size of matrix `name` [out, in]; ConfigError when the given one does not divide `in`."""
        in_features = shape[1]
        if self.group_size is not None:
            if in_features % self.group_size:
                raise ConfigError(f"group_size {self.group_size} does not divide the {in_features} inputs of "
                                  f"{name}; use a divisor of {in_features} or group_size=None")
            return self.group_size
        return next((g for g in GROUP_SIZES if in_features % g == 0), in_features)

    def parts(self, name: str, shape: tuple[int, ...], dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
        """The packed tensors of matrix `name` [out, in]: suffix -> (shape, dtype)."""
        out, in_features = shape
        groups = in_features // self.group_size_for(name, shape)
        if self.bits == 4:
            if in_features % 2:
                raise ConfigError(f"4-bit packing needs an even input size; {name} has {in_features}")
            parts = {"qweight": ((out, in_features // 2), "uint8"), "scales": ((out, groups), dtype)}
        else:
            parts = {"qweight": ((out, in_features), "int8"), "scales": ((out, groups), dtype)}
        return {**parts, "mins": ((out, groups), dtype)} if "mins" in PARTS[self.scheme] else parts

    def num_bytes(self, name: str, shape: tuple[int, ...], dtype: str) -> int:
        """Exact bytes of matrix `name` in this layout."""
        size = {"uint8": 1, "int8": 1, **DTYPE_BYTES}
        return sum(math.prod(s) * size[d] for s, d in self.parts(name, shape, dtype).values())



def layouts_label(layouts) -> str | None:
    """One name for a model's set of layouts (`layouts`: Quantizations): "int4-g32", "int4-g32+int8-g16";
    None for none (dense)."""
    labels = sorted({q.label for q in layouts})
    return "+".join(labels) if labels else None
