"""The routing of offload/models/moe.py against transformers' own router and expert modules: the same experts
and weights (float32 and bfloat16, ties included), the same combined output; and 4/8-bit experts measured
against the 16-bit model."""
from __future__ import annotations

import pytest
import torch

import offload
from offload.models.moe import _cpu_experts, route, routed_experts
from tests.offload.builders import hf_config, hf_logits
from tests.offload.loading.test_offload_parity import LONG

transformers = pytest.importorskip("transformers")


def _block(variant: str, dtype: torch.dtype, **overrides):
    """transformers' sparse block of layer 0 of `variant` (random weights, scaled so routing is not flat)."""
    torch.manual_seed(0)
    config = hf_config(variant, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
    return config, block.to(dtype)


def _weights_of(block, names: tuple[str, str, str]) -> dict:
    """Our weight dict (checkpoint names under "experts.{e}.") from transformers' fused expert tensors."""
    gate, up, down = names
    E = block.experts.gate_up_proj.shape[0]
    lw = {}
    for e in range(E):
        g, u = block.experts.gate_up_proj[e].chunk(2, dim=0)                  # [I, H] each
        lw[f"experts.{e}.{gate}.weight"], lw[f"experts.{e}.{up}.weight"] = g, u
        lw[f"experts.{e}.{down}.weight"] = block.experts.down_proj[e]
    return lw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant, names", [("mixtral_window", ("w1", "w3", "w2")),
                                            ("qwen3_moe", ("gate_proj", "up_proj", "down_proj")),
                                            ("qwen2_moe", ("gate_proj", "up_proj", "down_proj"))])
def test_routing_and_experts_are_transformers(variant, names, dtype):
    config, block = _block(variant, dtype)
    x = torch.randn(37, config.hidden_size, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        _, want_weights, want_experts = block.gate(x)
        weights, experts = route(torch.nn.functional.linear(x, block.gate.weight), config.num_experts_per_tok,
                                 getattr(config, "norm_topk_prob", True) if variant != "mixtral_window" else True)
        if variant != "mixtral_window":
            weights = weights.to(dtype)                  # Qwen rounds the weights to the model dtype
        assert torch.equal(experts, want_experts) and torch.equal(weights, want_weights)
        act = torch.nn.functional.silu
        got = routed_experts(x, weights, experts, _weights_of(block, names), "experts.", names, act)
        want = block.experts(x, want_experts, want_weights)
    # float32: to rounding; bfloat16: within a rounding of the output's scale (transformers multiplies by the
    # fused gate_up matrix, we by gate and up apart: the same dot products, rounded by different kernels)
    scale = float(want.abs().max())
    atol = 1e-6 * scale if dtype == torch.float32 else 2 ** -7 * scale
    torch.testing.assert_close(got, want, atol=atol, rtol=0)


def test_ties_pick_what_torch_topk_picks():
    # identical router rows: every expert ties; top-k takes the same ones transformers' router takes
    config, block = _block("qwen3_moe", torch.float32)
    with torch.no_grad():
        block.gate.weight.copy_(block.gate.weight[:1].expand_as(block.gate.weight))
        x = torch.randn(5, config.hidden_size)
        _, want_weights, want_experts = block.gate(x)
        weights, experts = route(torch.nn.functional.linear(x, block.gate.weight), config.num_experts_per_tok, True)
    assert torch.equal(experts, want_experts) and torch.equal(weights, want_weights)
    assert torch.allclose(weights, torch.full_like(weights, 1 / config.num_experts_per_tok))


@pytest.mark.parametrize("variant", ["mixtral_window", "qwen3_moe"])
def test_quantized_experts_agree_with_the_16_bit_model(checkpoint_factory, variant):
    """int8 and int4 experts (routers kept dense) against transformers' float32 model: the largest logit error
    relative to the largest logit, and how often the top token agrees. Tiny random models are harsh on 4 bits
    (their dense siblings measure alike: llama int4 0.40 / 60%, int8 0.02 / 97%); a wrong packing or a
    quantized router would agree about as often as chance (1/128)."""
    path, hf = checkpoint_factory(variant)
    want = hf_logits(hf, LONG)
    measured = {}
    for scheme in ("int8", "int4"):
        model = offload.load(path, dtype="float32", max_seq_len=48, quantize=scheme, progress=False)
        got = model.forward([LONG])[0]
        measured[scheme] = (float((got - want).abs().max() / want.abs().max()),
                            float((got.argmax(-1) == want.argmax(-1)).float().mean()))
        lw = model.engine.weights.acquire(0)
        block = "block_sparse_moe" if variant == "mixtral_window" else "mlp"
        assert isinstance(lw[f"{block}.gate.weight"], torch.Tensor)                       # the router: dense
        assert not isinstance(lw[f"{block}.experts.0.{'w2' if block != 'mlp' else 'down_proj'}.weight"], torch.Tensor)
        model.engine.weights.release(0)
    (e8, a8), (e4, a4) = measured["int8"], measured["int4"]
    assert e8 < 0.2 and a8 >= 0.9 and e4 > e8 and a4 >= 0.5, measured


@pytest.mark.parametrize("dtype, layout, rows", [(dtype, layout, rows) for dtype in (torch.float32, torch.bfloat16)
                                                 for layout in (None, "int4", "int8") for rows in (1, 2, 4)]
                         + [(torch.float16, None, 2), (torch.float16, "int4", 1)])
def test_cpu_experts_in_one_call_equal_expert_by_expert(dtype, layout, rows):
    """A few rows on the CPU take cpu_kernels.gated_experts (every hit expert's gate and up in one loop, their
    down projections in another, the weighted sum, in one call): in bfloat16 the very numbers of computing the
    experts one by one with `linear`; in float32 to the last bit of SiLU's exp (Numba's libm expf and torch's
    vectorised one may round apart)."""
    from offload.models.layers import gated_mlp
    from offload.weights.quant import quantize
    from placement.quantization import Quantization
    torch.manual_seed(3)
    E, k, H, I = 8, 3, 64, 96
    lw = {f"experts.{e}.{n}.weight": (torch.randn(I, H) if n != "down_proj" else torch.randn(H, I)).to(dtype) * 0.1
          for e in range(E) for n in ("gate_proj", "up_proj", "down_proj")}
    if layout is not None:
        lw = {name: quantize(w, Quantization(layout, 32), name, dtype) for name, w in lw.items()}
    names, act = ("gate_proj", "up_proj", "down_proj"), torch.nn.functional.silu
    x = torch.randn(rows, H).to(dtype)
    weights, experts = route(torch.randn(rows, E).to(dtype), k, True)
    for scale in (weights, weights.to(dtype)):                     # Mixtral's float32 weights, Qwen's rounded
        got = _cpu_experts(x, scale, experts, lw, "experts.", names, act)
        assert got is not None                                      # (the one-call path, not a fallback)
        assert torch.equal(routed_experts(x, scale, experts, lw, "experts.", names, act), got)
        want = torch.zeros_like(x)
        for e in torch.unique(experts).tolist():
            token, slot = torch.where(experts == e)
            y = gated_mlp(x[token], lw, f"experts.{e}.", act, names)
            want.index_add_(0, token, (y * scale[token, slot, None]).to(dtype))
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        else:
            assert torch.equal(got, want), (got - want).abs().max()


def test_experts_of_mixed_layouts_are_refused_by_the_kernel_and_computed_one_by_one():
    """gated_experts takes one packed layout per projection; a layer whose experts differ (one held int8, the
    others int4) gets its ValueError, and routed_experts then computes them expert by expert, same numbers."""
    from cpu_kernels import gated_experts
    from offload.models.layers import gated_mlp
    from offload.weights.quant import quantize
    from placement.quantization import Quantization
    torch.manual_seed(5)
    E, H, I = 4, 64, 96
    names, act = ("gate_proj", "up_proj", "down_proj"), torch.nn.functional.silu
    lw = {f"experts.{e}.{n}.weight": quantize((torch.randn(I, H) if n != "down_proj" else torch.randn(H, I)) * 0.1,
                                              Quantization("int8" if e == 0 else "int4", 32), f"{e}.{n}", torch.float32)
          for e in range(E) for n in names}
    x = torch.randn(1, H)
    experts = torch.tensor([[0, 2]])
    weights = torch.tensor([[0.75, 0.25]])
    trios = [tuple(lw[f"experts.{e}.{n}.weight"].cpu_matrix() for n in names) for e in (0, 2)]
    with pytest.raises(ValueError, match="one layout per projection"):
        gated_experts(x, trios, torch.tensor([[0.75], [0.25]]), torch.float32)
    assert _cpu_experts(x, weights, experts, lw, "experts.", names, act) is None
    want = sum(w * gated_mlp(x, lw, f"experts.{e}.", act, names) for e, w in ((0, 0.75), (2, 0.25)))
    torch.testing.assert_close(routed_experts(x, weights, experts, lw, "experts.", names, act), want,
                               atol=1e-6, rtol=1e-6)
