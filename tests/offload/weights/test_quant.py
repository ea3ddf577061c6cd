"""Quantized matrices: the packed layout of placement/quantization.py, round-to-nearest error bounds, the
exact grid, and the flat tensors that PlacedWeights packs and streams."""
from __future__ import annotations

import pytest
import torch

from offload.weights.quant import QuantizedWeight, flatten, quantize, unflatten
from placement.quantization import Quantization


def _matrix(out=48, inputs=256, seed=0, dtype=torch.float32):
    return torch.randn(out, inputs, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scheme, group", [("int4", 64), ("int4", 128), ("int4", None), ("int8", 32), ("int8", None)])
def test_round_to_nearest_error_is_at_most_half_a_step(scheme, group, dtype):
    w = _matrix(dtype=dtype)
    q = quantize(w, Quantization(scheme=scheme, group_size=group), "w", fit=False)       # round-to-nearest
    g = q.group_size
    assert g == (group or 128) and q.shape == tuple(w.shape) and q.scales.dtype == dtype
    deq = q.dequantize(torch.float32)
    step = q.scales.to(torch.float32).repeat_interleave(g, dim=1)                       # [out, in]
    # half a step, plus the rounding of the stored scale/min and of the dequantized value to `dtype`
    slack = 2 * torch.finfo(dtype).eps * w.to(torch.float32).abs() + 1e-6
    assert ((deq - w.to(torch.float32)).abs() <= step / 2 + slack + step * torch.finfo(dtype).eps * 16).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_fitted_4_bit_grid_has_a_lower_error_than_round_to_nearest(group):
    """Per group the best of a few clipped ranges refined by least squares: never worse than the full range
    (it is one of the candidates), clearly better over a matrix."""
    w = _matrix(out=256, inputs=512, seed=3)
    quantization = Quantization(scheme="int4", group_size=group)
    nearest, fitted = (quantize(w, quantization, "w", fit=fit) for fit in (False, True))
    error = {name: ((q.dequantize(torch.float32) - w) ** 2).view(256, -1, group).sum(-1)
             for name, q in (("nearest", nearest), ("fitted", fitted))}
    assert (error["fitted"] <= error["nearest"] * (1 + 1e-5) + 1e-9).all()
    assert error["fitted"].sum() < 0.95 * error["nearest"].sum()


def test_int4_layout_low_nibble_first_and_values_on_the_grid_are_exact():
    """Column 2j in the low nibble, 2j+1 in the high one; a matrix already on a 4-bit grid comes back exactly."""
    codes = torch.randint(0, 16, (8, 64), generator=torch.Generator().manual_seed(1))
    scale, low = 0.25, -1.5
    w = codes.to(torch.float32) * scale + low
    w[:, 0], w[:, 1] = low, low + 15 * scale                   # every group spans the full code range
    q = quantize(w, Quantization(scheme="int4", group_size=64), "w")
    assert q.qweight.dtype == torch.uint8 and q.qweight.shape == (8, 32)
    assert torch.equal(q.qweight & 0xF, q.codes()[:, 0::2].to(torch.uint8))
    assert torch.equal(q.qweight >> 4, q.codes()[:, 1::2].to(torch.uint8))
    assert torch.equal(q.dequantize(torch.float32), w)
    int8 = quantize(torch.tensor([[-127.0, 3.0, 0.0, 127.0]]), Quantization(scheme="int8", group_size=4), "w")
    assert int8.qweight.tolist() == [[-127, 3, 0, 127]] and int8.scales.tolist() == [[1.0]]


def test_a_constant_group_is_exact_and_never_divides_by_zero():
    w = torch.zeros(4, 64)
    w[1] = 2.5
    for scheme in ("int4", "int8"):
        q = quantize(w, Quantization(scheme=scheme, group_size=32), "w")
        assert torch.equal(q.dequantize(torch.float32), w)


def test_flat_tensors_round_trip_and_packed_bytes_match_the_planner():
    w = _matrix(out=96, inputs=576, dtype=torch.bfloat16)           # SmolLM2's width: 128 does not divide 576
    for scheme in ("int4", "int8"):
        quantization = Quantization(scheme=scheme)
        q = quantize(w, quantization, "model.layers.0.mlp.up_proj.weight")
        assert q.group_size == 64
        flat = flatten({"mlp.up_proj.weight": q, "input_layernorm.weight": torch.ones(576)})
        assert set(flat) == {"input_layernorm.weight", *(f"mlp.up_proj.weight.{p}" for p in
                                                          (("qweight", "scales", "mins") if scheme == "int4"
                                                           else ("qweight", "scales")))}
        assert sum(t.numel() * t.element_size() for k, t in flat.items() if k.startswith("mlp")) == \
            quantization.num_bytes("w", (96, 576), "bfloat16")
        back = unflatten(flat)
        assert set(back) == {"mlp.up_proj.weight", "input_layernorm.weight"}
        assert torch.equal(back["mlp.up_proj.weight"].dequantize(), q.dequantize())


def test_bad_quantizations_are_clear_errors():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        Quantization(scheme="int3")
    with pytest.raises(ValueError, match="group_size 48 does not divide the 100 inputs of w"):
        quantize(torch.ones(4, 100), Quantization(scheme="int4", group_size=48), "w")
    with pytest.raises(ValueError, match="group_size must be"):
        Quantization(scheme="int8", group_size=3)
    with pytest.raises(ValueError, match="even input size"):
        quantize(torch.ones(4, 33), Quantization(scheme="int4"), "w")
    assert Quantization.parse("int4-g64") == Quantization(scheme="int4", group_size=64)
    assert Quantization.parse("INT8").label == "int8"
    assert isinstance(quantize(torch.ones(2, 4), Quantization(scheme="int8"), "w"), QuantizedWeight)
