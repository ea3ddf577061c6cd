"""Quantized matrices in the layouts of placement/quantization.py: quantize, pack, dequantize.

A `QuantizedWeight` stands in a layer's weight dict where the dense weight would (family math calls
`linear` on it, which dequantizes next to the matmul). For storage and streaming it is flattened into its
plain tensors ("<name>.qweight", "<name>.scales", "<name>.mins"), which PlacedWeights packs like any
other tensors, so the packed bytes are what sits in RAM and crosses PCIe; `unflatten` rebuilds it from
whatever holds those tensors (a resident copy or a ring slot's views).

Quantization is per group: 4-bit asymmetric (codes 0..15, w = code * scale + min; the grid fitted per group,
see `quantize`), 8-bit symmetric round-to-nearest (codes -127..127, w = code * scale). 4-bit without mins
(int4-sym: w = (code - 8) * scale) and 8-bit with mins (int8-asym) are only converted from files. The scale and min are
rounded to the model dtype first and the codes chosen against the rounded values, so dequantizing gives the
codes' exact grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from placement.quantization import PARTS, QUANTIZE_SCHEMES, Quantization

INT4_LEVELS = 15
INT8_LEVELS = 127


@dataclass(frozen=True)
class QuantizedWeight:
    """A matrix [out, in] packed: 4-bit (`qweight` uint8 [out, in / 2], `scales` [out, groups], and `mins`
    when asymmetric, else w = (code - 8) * scale) or 8-bit (`qweight` int8 [out, in], `scales` [out, groups],
    and `mins` when asymmetric)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    _cpu_matrix: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        q, s = self.qweight, self.scales
        assert q.dim() == 2 and s.dim() == 2 and s.shape[0] == q.shape[0], (q.shape, s.shape)
        assert q.dtype in (torch.uint8, torch.int8), q.dtype
        assert self.mins is None or self.mins.shape == s.shape, (s.shape, self.mins.shape)
        assert self.in_features % s.shape[1] == 0, (self.in_features, s.shape)

    @property
    def scheme(self) -> str:
        if self.qweight.dtype == torch.uint8:
            return "int4" if self.mins is not None else "int4-sym"
        return "int8" if self.mins is None else "int8-asym"

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (2 if self.qweight.dtype == torch.uint8 else 1)

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.in_features

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    @property
    def device(self) -> torch.device:
        """Where the packed parts lie."""
        return self.qweight.device

    def cpu_matrix(self):
        """Its cpu_kernels.PackedMatrix (views of its host tensors, checked once and kept with it)."""
        if self._cpu_matrix is None:
            from cpu_kernels import PackedMatrix
            object.__setattr__(self, "_cpu_matrix", PackedMatrix.of(self.qweight, self.scales, self.mins))
        return self._cpu_matrix

    def rows(self, index) -> "QuantizedWeight":
        """Some of its rows, still packed: `index` a slice (views) or a tensor of row indices (gathered)."""
        return QuantizedWeight(qweight=self.qweight[index], scales=self.scales[index],
                               mins=None if self.mins is None else self.mins[index])

    def codes(self) -> torch.Tensor:
        """The integer codes [out, in] (uint8 0..15 for 4-bit, int8 for 8-bit)."""
        if self.qweight.dtype == torch.int8:
            return self.qweight
        q = self.qweight                                                    # [out, in / 2]
        return torch.stack((q & 0xF, q >> 4), dim=-1).view(q.shape[0], -1)  # [out, in]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense matrix [out, in] in `dtype` (default: the scales' dtype), computed in that dtype with one
        output buffer (the workspace counts it: placement/workspace.py)."""
        dtype = dtype or self.scales.dtype
        out, in_features = self.shape
        groups = self.scales.shape[1]
        w = torch.empty(out, in_features, dtype=dtype, device=self.qweight.device)
        if self.qweight.dtype == torch.int8:
            w.copy_(self.qweight)
        else:                              # the nibbles straight into the even and odd columns
            w[:, 0::2] = self.qweight & 0xF
            w[:, 1::2] = self.qweight >> 4
        grouped = w.view(out, groups, in_features // groups)                          # [out, G, g]
        if self.mins is None:
            if self.qweight.dtype == torch.uint8:                     # int4-sym: codes - 8, exact integers
                grouped.sub_(8)
            grouped.mul_(self.scales.to(dtype)[..., None])
        else:        # one rounding of code * scale + min (a 16-bit dtype computes it in float32)
            torch.addcmul(self.mins.to(dtype)[..., None], grouped, self.scales.to(dtype)[..., None], out=grouped)
        return w

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The plain tensors it is stored as, keyed "<name>.<part>"."""
        parts = {"qweight": self.qweight, "scales": self.scales, "mins": self.mins}
        return {f"{name}.{part}": parts[part] for part in PARTS[self.scheme]}


def _int4_codes(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """Nearest codes 0..15 of w [out, G, g] on the grid code * scale + min (scales, mins [out, G])."""
    step = torch.where(scales == 0, torch.ones_like(scales), scales)[..., None]
    return torch.round((w - mins[..., None]) / step).clamp(0, INT4_LEVELS)


def _fit_int4(w: torch.Tensor, *, fit: bool, clips=(0.0, 0.06), rounds: int = 1):
    """Per group (w [out, G, g] float32) the 4-bit grid's scale and min: the full range (round-to-nearest),
    or with `fit` the best of a few clipped ranges, each refined by least squares on its codes (scale and min
    refit, codes re-rounded), keeping per group whichever has the smallest squared error."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    best_scales, best_mins = (high - low) / INT4_LEVELS, low
    if not fit:
        return best_scales, best_mins
    best_err = torch.full_like(low, float("inf"))
    for clip in clips:
        span = (high - low) * clip
        scales, mins = (high - low - 2 * span) / INT4_LEVELS, low + span
        for _ in range(rounds + 1):
            codes = _int4_codes(w, scales, mins)                                  # [out, G, g]
            err = ((codes * scales[..., None] + mins[..., None] - w) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scales, best_mins = torch.where(better, scales, best_scales), torch.where(better, mins, best_mins)
            # least squares w ~ codes * scale + min for these codes (a constant code: keep the grid)
            q_mean, w_mean = codes.mean(-1), w.mean(-1)
            var = ((codes - q_mean[..., None]) ** 2).mean(-1)
            cov = ((codes - q_mean[..., None]) * (w - w_mean[..., None])).mean(-1)
            fitted = torch.where(var > 0, cov / var.clamp_min(1e-30), scales)
            scales = torch.where(fitted > 0, fitted, scales)
            mins = w_mean - scales * q_mean
    return best_scales, best_mins


def quantize(weight: torch.Tensor, quantization: Quantization, name: str,
             dtype: torch.dtype | None = None, *, fit: bool = True) -> QuantizedWeight:
    """Quantize a matrix [out, in] per group; scales (and mins) in `dtype` (default: the weight's).
    8-bit: round-to-nearest (symmetric). 4-bit: with `fit` (default) each group's grid is the best of a few
    clipped ranges refined by least squares (lower error than round-to-nearest on the full range, which
    `fit=False` gives). ConfigError (a ValueError) naming `name` when the group size does not divide `in`."""
    assert weight.dim() == 2 and weight.is_floating_point(), (name, weight.shape, weight.dtype)
    assert quantization.scheme in QUANTIZE_SCHEMES, quantization
    dtype = dtype or weight.dtype
    out, in_features = weight.shape
    g = quantization.group_size_for(name, tuple(weight.shape))
    quantization.parts(name, tuple(weight.shape), "float32")           # checks the 4-bit packing too
    w = weight.detach().to(torch.float32).reshape(out, in_features // g, g)   # [out, G, g]
    if quantization.scheme == "int8":
        scales = (w.abs().amax(dim=-1) / INT8_LEVELS).to(dtype)
        step = torch.where(scales == 0, torch.ones_like(scales), scales).to(torch.float32)[..., None]
        codes = torch.round(w / step).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        return QuantizedWeight(qweight=codes.view(out, in_features), scales=scales)
    scales, mins = _fit_int4(w, fit=fit)
    scales, mins = scales.to(dtype), mins.to(dtype)
    codes = _int4_codes(w, scales.to(torch.float32), mins.to(torch.float32)).to(torch.uint8).view(out, in_features)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)                   # [out, in / 2]
    return QuantizedWeight(qweight=packed.contiguous(), scales=scales, mins=mins)


def flatten(tensors: dict) -> dict[str, torch.Tensor]:
    """A weight dict with QuantizedWeights -> plain tensors only (each QuantizedWeight as its parts)."""
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        out.update(value.tensors(name) if isinstance(value, QuantizedWeight) else {name: value})
    return out


def unflatten(tensors: dict[str, torch.Tensor]) -> dict:
    """Inverse of `flatten`: "<name>.qweight" (with its scales/mins) -> a QuantizedWeight under <name>."""
    if not any(key.endswith(".qweight") for key in tensors):
        return dict(tensors)
    out = {}
    for key, tensor in tensors.items():
        name, _, part = key.rpartition(".")
        if part == "qweight":
            out[name] = QuantizedWeight(qweight=tensor, scales=tensors[f"{name}.scales"],
                                        mins=tensors.get(f"{name}.mins"))
        elif not ((part == "scales" or part == "mins") and f"{name}.qweight" in tensors):
            out[key] = tensor
    return out


def quantize_integer(weight: torch.Tensor, bits: int, group_size: int, *, symmetric: bool = True,
                     dtype: torch.dtype | None = None, fit: bool = True):
    """Per group of `group_size` inputs, integer codes with an integer zero point, the convention of
    compressed-tensors (and GPTQ/AWQ): w = (q - zp) * scale, q in -2^(bits-1) .. 2^(bits-1) - 1.
    Returns (q int8 [out, in], scale [out, G] in `dtype` (default the weight's), zp int8 [out, G] or None
    when symmetric). The scale is rounded to `dtype` before the codes are chosen. Round-to-nearest on the
    min-max range (symmetric: scale = absmax / (2^bits - 1) * 2); with `fit` (4-bit) also a 6%-clipped
    range, and each refit by least squares on its codes, the one with the smallest error kept per group."""
    assert bits in (4, 8) and weight.dim() == 2 and weight.shape[1] % group_size == 0, (bits, weight.shape)
    dtype = dtype or weight.dtype
    out, in_features = weight.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = weight.detach().to(torch.float32).reshape(out, in_features // group_size, group_size)   # [out, G, g]
    zero = torch.zeros(w.shape[:2])

    def rounded(scale):                                # the stored scale, never zero
        scale = scale.to(dtype).to(torch.float32)
        return torch.where(scale == 0, torch.ones_like(scale), scale)

    def codes(scale, zp):                              # [out, G, g]
        return (torch.round(w / scale[..., None]) + zp[..., None]).clamp(qmin, qmax)

    def grid(low, high):                               # (scale, zp) whose grid spans low..high
        if symmetric:
            return rounded(torch.maximum(-low, high) / ((qmax - qmin) / 2)), zero
        scale = rounded((high - low) / (qmax - qmin))
        return scale, torch.round(qmin - low / scale).clamp(qmin, qmax)

    low, high = w.amin(dim=-1).clamp(max=0), w.amax(dim=-1).clamp(min=0)
    best = grid(low, high)
    if fit and bits == 4:
        best_err = torch.full_like(low, float("inf"))
        for clip in (0.0, 0.06):
            scale, zp = grid(low * (1 - clip), high * (1 - clip))
            for _ in range(2):
                q = codes(scale, zp) - zp[..., None]                                # q - zp
                err = ((q * scale[..., None] - w) ** 2).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, scale, best[0]), torch.where(better, zp, best[1])
                qq = (q * q).sum(-1)                   # least squares w ~ (q - zp) * scale, zp kept
                scale = torch.where(qq > 0, rounded((q * w).sum(-1) / qq.clamp_min(1e-30)), scale)
    scale, zp = best
    q = codes(scale, zp).to(torch.int8).view(out, in_features)
    return q, scale.to(dtype), None if symmetric else zp.to(torch.int8)
