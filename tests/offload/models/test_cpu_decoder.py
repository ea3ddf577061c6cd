"""The fused CPU decode step (offload/models/cpu_decoder.py) against the eager family math it replaces:
the same layer, weights and KV cache history, one decode step at a time, rows at different positions.

With HostAttention both attend in float32 over the cache, so a 16-bit model agrees to the bit wherever the
products agree: packed matrices share their kernel, dense ones sum in another order, and SiLU's exp is
LLVM's where torch's is Sleef's (1 ulp apart in float32, so after rounding to float16 about 1 value in 6000
differs by one step, and what follows it in that row). All but a few elements are exact and none is off by
more than two rounding steps at its row's scale; float32 agrees to rounding.
"""
from __future__ import annotations

import pytest
import torch

from offload.attention.contract import Chunk
from offload.attention.device import TorchAttention
from offload.attention.host import HostAttention
from offload.models import build_model
from offload.models.cpu_decoder import CpuDecoderSteps
from offload.weights.quant import QuantizedWeight, quantize
from placement.architecture import Architecture
from placement.cost import CPU_DECODE_MAX_ROWS
from placement.workspace import MAX_VERIFY_TOKENS
from placement.quantization import Quantization

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INNER, MAX_LEN = 64, 4, 2, 16, 160, 32


# a layer of several layouts, as GGUF files mix them (Q4_K_M: v and down in Q6_K): q/k/v of one code type but
# with and without mins and with groups of 1 and 2 runs (computed together in one call), gate and up of two
# types (computed one by one)
MIXED = dict(q_proj="int8", k_proj="int8-asym", v_proj="int8-g64", o_proj="int4", gate_proj="int4",
             up_proj="int8", down_proj="int8-asym")


def _layer(dtype, *, bias=False, kind="dense", window=None, model_type="llama", seed=0):
    config = dict(model_type=model_type, vocab_size=256, hidden_size=HIDDEN, intermediate_size=INNER,
                  num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
                  attention_bias=bias, mlp_bias=bias)
    if window:
        config.update(model_type="mistral", sliding_window=window)
    arch = Architecture.from_config(config)
    gen = torch.Generator().manual_seed(seed)
    prefix = arch.layer_prefix(0)
    weights = {}
    for name, shape in arch.layer_tensors(0).items():
        value = torch.randn(shape, generator=gen) * (0.25 if len(shape) == 2 else 0.3)
        if name.endswith("norm.weight"):
            value += 1.0
        value = value.to(dtype)
        if len(shape) == 2 and kind != "dense":
            layout = Quantization.parse(MIXED[name.split(".")[-2]] if kind == "mixed" else kind)
            value = quantize(value, Quantization(layout.scheme.removesuffix("-asym"), layout.group_size or 32), name)
            if layout.scheme == "int8-asym":
                value = QuantizedWeight(qweight=value.qweight, scales=value.scales,
                                        mins=(torch.randn(value.scales.shape, generator=gen) * 0.05).to(dtype))
        weights[name[len(prefix):]] = value
    return arch, build_model(arch), weights


def _run_both(arch, model, weights, dtype, backend_class, steps=5, rows=3):
    """(fused, eager) hidden states of every step, each [rows, 1, H]."""
    fused_steps = CpuDecoderSteps(model, dtype)
    backends = [backend_class(max_batch_size=rows, max_seq_len=MAX_LEN, num_kv_heads=arch.num_kv_heads,
                              head_dim=arch.head_dim, dtype=dtype, device="cpu",
                              sliding_window=arch.window_of(0)) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    results = []
    for step in range(steps):
        h = torch.randn(rows, 1, arch.hidden_size, generator=gen).to(dtype)
        start = torch.tensor([step + 3 * b for b in range(rows)])          # ragged positions
        ctx = model.prepare(start[:, None], dtype)
        got = fused_steps.step(0, weights, h, ctx, backends[0], Chunk(start=start, num_tokens=1, device=torch.device("cpu")))
        assert got is not None, "the fused step declined a step it covers"
        chunk = Chunk(start=start, num_tokens=1, device=torch.device("cpu"))
        q, k, v = model.attention_inputs(weights, h, ctx, 0)
        want = model.attention_output(weights, h, backends[1].attend(q, k, v, chunk, weights))
        results.append((got, want))
    return results


@pytest.mark.parametrize("kind", ["dense", "int8", "int4", "mixed"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_steps_match_the_eager_math_to_the_bit(dtype, bias, kind):
    arch, model, weights = _layer(dtype, bias=bias, kind=kind)
    results = _run_both(arch, model, weights, dtype, HostAttention)
    got = torch.cat([g for g, _ in results]).float()
    want = torch.cat([w for _, w in results]).float()
    differ = (got != want).reshape(-1, arch.hidden_size)               # [steps * rows, H]
    rows_touched = int(differ.any(-1).sum())                             # a rounding step reaches a whole row
    assert rows_touched <= 2, f"{int(differ.sum())} elements in {rows_touched} of {differ.shape[0]} rows differ"
    step = torch.finfo(dtype).eps * want.abs().amax(dim=-1, keepdim=True)     # one rounding step at the row's scale
    assert ((got - want).abs() <= 2 * step).all()


@pytest.mark.parametrize("backend_class", [HostAttention, TorchAttention])
@pytest.mark.parametrize("kind", ["dense", "int4", "mixed"])
def test_float32_steps_match_the_eager_math(backend_class, kind):
    """Also against TorchAttention (the CPU fallback's cache): SDPA in float32 is the same math."""
    arch, model, weights = _layer(torch.float32, bias=True, kind=kind)
    for got, want in _run_both(arch, model, weights, torch.float32, backend_class):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_step_on_the_previous_steps_result_reads_it_as_a_copy_would_be_read(dtype):
    """The next layer's input is usually the step's own result, read through the array the step wrote (no view
    derived from the tensor again; float16 bits as int16): two layers fed the result itself, and two fed a copy
    of it, give the very same bits."""
    arch, model, weights = _layer(dtype, kind="int4")
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, 1, arch.hidden_size, generator=gen).to(dtype)
    start = torch.tensor([0, 5])
    ctx = model.prepare(start[:, None], dtype)
    outs = []
    for copy in (False, True):
        steps = CpuDecoderSteps(model, dtype)
        backends = [HostAttention(max_batch_size=2, max_seq_len=MAX_LEN, num_kv_heads=arch.num_kv_heads,
                                  head_dim=arch.head_dim, dtype=dtype, device="cpu") for _ in range(2)]
        chunk = Chunk(start=start, num_tokens=1, device=torch.device("cpu"))
        first = steps.step(0, weights, h, ctx, backends[0], chunk)
        assert (first is steps._last[0]) and first.dtype == dtype
        outs.append(steps.step(0, weights, first.clone() if copy else first, ctx, backends[1], chunk))
    assert torch.equal(outs[0].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       outs[1].view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("kind", ["dense", "int4", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_verification_passes_run_fused_and_match_the_eager_math(dtype, kind):
    """A speculative decoding pass computed fused: several tokens a row (two ragged rows of chains; one row's
    token tree, each token at its depth and seeing only its ancestors among the pass's tokens), after a few
    decode steps, against the eager math with HostAttention: as close as a decode step (above), but for a 16-bit
    row that a one-ulp SiLU difference reaches through 4-bit down_proj, whose input is quantized to integers
    per row (its scale moves with that value): up to 4 rounding steps there."""
    from offload.generation.engine import tree_ancestors
    arch, model, weights = _layer(dtype, kind=kind, window=None)
    cpu = torch.device("cpu")
    fused_steps = CpuDecoderSteps(model, dtype)
    backends = [HostAttention(max_batch_size=2, max_seq_len=MAX_LEN, num_kv_heads=arch.num_kv_heads,
                              head_dim=arch.head_dim, dtype=dtype, device="cpu") for _ in range(2)]
    gen = torch.Generator().manual_seed(3)
    parents = [-1, 0, 0, 1, 2, 2, 4]                                    # a tree of 7 tokens, 4 deep
    passes = [(2, 1, None), (2, 1, None), (2, 5, None), (1, 7, parents), (2, 8, None)]   # (rows, T, tree)
    got, want = [], []
    for i, (rows, T, tree) in enumerate(passes):
        h = torch.randn(rows, T, arch.hidden_size, generator=gen).to(dtype)
        start = torch.tensor([2 * i + 5 * b for b in range(rows)])          # ragged rows
        ancestors = None if tree is None else tree_ancestors(tree)
        depth = torch.arange(T) if tree is None else ancestors.sum(dim=1) - 1
        ctx = model.prepare(start[:, None] + depth[None], dtype)
        out = fused_steps.step(0, weights, h, ctx, backends[0], Chunk(start=start, num_tokens=T, device=cpu,
                                                                       ancestors=ancestors))
        assert out is not None and out.shape == (rows, T, arch.hidden_size), "the fused step declined a pass"
        chunk = Chunk(start=start, num_tokens=T, device=cpu, ancestors=ancestors)
        q, k, v = model.attention_inputs(weights, h, ctx, 0)
        got.append(out.float().reshape(-1, arch.hidden_size))
        want.append(model.attention_output(weights, h, backends[1].attend(q, k, v, chunk, weights)).float()
                    .reshape(-1, arch.hidden_size))
    got, want = torch.cat(got), torch.cat(want)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        return
    differ = got != want
    assert int(differ.any(-1).sum()) <= 2, f"{int(differ.sum())} elements in {int(differ.any(-1).sum())} rows differ"
    step = torch.finfo(dtype).eps * want.abs().amax(dim=-1, keepdim=True)
    assert ((got - want).abs() <= (2 if kind == "dense" else 4) * step).all()


def test_sliding_window_is_applied():
    arch, model, weights = _layer(torch.float32, window=4)
    assert arch.window_of(0) == 4
    for got, want in _run_both(arch, model, weights, torch.float32, HostAttention, steps=8):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_declines_what_it_does_not_cover():
    arch, model, weights = _layer(torch.float32)
    steps = CpuDecoderSteps(model, torch.float32)
    backend = HostAttention(max_batch_size=CPU_DECODE_MAX_ROWS + 1, max_seq_len=MAX_LEN, num_kv_heads=KV_HEADS,
                            head_dim=HEAD_DIM, dtype=torch.float32, device="cpu")
    # too many rows; more tokens than a verification pass holds
    for rows, tokens in ((CPU_DECODE_MAX_ROWS + 1, 1), (1, MAX_VERIFY_TOKENS + 1), (2, MAX_VERIFY_TOKENS // 2 + 1)):
        start = torch.zeros(rows, dtype=torch.long)
        positions = start[:, None] + torch.arange(tokens)
        h = torch.randn(rows, tokens, HIDDEN)
        chunk = Chunk(start=start, num_tokens=tokens, device=torch.device("cpu"))
        assert steps.step(0, weights, h, model.prepare(positions, torch.float32), backend, chunk) is None
    # more rows than the backend's cache holds, or a position past its end: the kernels would index out of it
    small = HostAttention(max_batch_size=1, max_seq_len=4, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                          dtype=torch.float32, device="cpu")
    for start in (torch.zeros(2, dtype=torch.long), torch.tensor([4])):
        chunk = Chunk(start=start, num_tokens=1, device=torch.device("cpu"))
        h = torch.randn(len(start), 1, HIDDEN)
        assert steps.step(0, weights, h, model.prepare(start[:, None], torch.float32), small, chunk) is None
    capped = HostAttention(max_batch_size=1, max_seq_len=MAX_LEN, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
                           dtype=torch.float32, device="cpu", softcap=30.0)
    start = torch.zeros(1, dtype=torch.long)
    chunk = Chunk(start=start, num_tokens=1, device=torch.device("cpu"))
    assert steps.step(0, weights, torch.randn(1, 1, HIDDEN), model.prepare(start[:, None], torch.float32),
                      capped, chunk) is None
    # families whose math differs (Qwen3's q/k norms, Gemma, Phi-3, OPT) are not covered at all
    qwen3 = build_model(Architecture.from_config(dict(
        model_type="qwen3", vocab_size=256, hidden_size=HIDDEN, intermediate_size=INNER, num_hidden_layers=1,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=128,
        rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu")))
    assert not CpuDecoderSteps.supports(qwen3, torch.float32)
    assert CpuDecoderSteps.supports(model, torch.bfloat16)
    # the planner's cost model names the same family math as the one the fused step covers
    from placement.cost import FUSED_CPU_MATH
    assert FUSED_CPU_MATH == f"{type(model).__module__}:{type(model).__name__}" == arch.family.math


@pytest.mark.parametrize("kwargs", [{}, dict(gpu_layers=1, kv_gpu_layers=1, cpu_compute=True)])
def test_the_engine_decodes_with_it_and_matches_transformers(checkpoint_factory, monkeypatch, kwargs):
    """On the CPU fallback (every layer) and for the layers a plan computes on the CPU, decode steps and
    speculative decoding's passes (chains and trees) run fused (counted), and greedy generation still gives
    transformers' tokens."""
    import offload
    from tests.offload.builders import hf_greedy
    from tests.offload.generation.test_speculative import ScriptedDraft, TreeScript
    path, hf = checkpoint_factory("llama_bias")
    fused = []
    original = CpuDecoderSteps.step

    def counted(self, layer, lw, h, *args):
        out = original(self, layer, lw, h, *args)
        fused.append((out is not None, h.shape[1]))
        return out
    monkeypatch.setattr(CpuDecoderSteps, "step", counted)
    model = offload.load(path, dtype="float32", max_seq_len=64, progress=False, **kwargs)
    prompts = [[1, 5, 9, 2, 7], [3, 4]]
    got = model.generate(prompts, max_new_tokens=6)
    assert fused and all(ok for ok, _ in fused), "decode steps declined by the fused path"
    assert all(got[b] == hf_greedy(hf, prompt, 6) for b, prompt in enumerate(prompts))
    want = hf_greedy(hf, prompts[0], 16)
    for draft in (ScriptedDraft(prompts[0], want, wrong_every=3), TreeScript(prompts[0], want)):
        fused.clear()
        assert model.generate([prompts[0]], max_new_tokens=16, draft=draft, speculate="always")[0] == want
        assert all(ok for ok, _ in fused) and max(tokens for _, tokens in fused) > 1, fused
