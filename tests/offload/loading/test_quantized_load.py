"""offload.load(quantize=...): layers quantized as they are read, held and streamed packed (the plan's exact
bytes, the ledger's too), the same numbers resident or offloaded, close to the 16-bit model."""
from __future__ import annotations

import pytest
import torch

import offload
import placement
from tests.offload.builders import hf_logits
from tests.offload.loading.test_offload_parity import LONG, PROMPTS
from tests.offload.offload_plans import EVERY_BACKEND, assert_runs_plan, layout_plan


def _load(path, **kwargs):
    return offload.load(path, dtype="float32", max_seq_len=48, max_batch_size=3, progress=False, **kwargs)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_every_placement_computes_the_same_quantized_model(llama5, scheme):
    resident = _load(llama5, quantize=scheme)
    assert resident.plan.quantization == scheme
    want = resident.forward([LONG, PROMPTS[2]])
    spec = placement.load_spec(llama5, dtype="float32", quantization=scheme)
    offloaded = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND, dtype="float32",
                                                       quantization=scheme), progress=False)
    assert_runs_plan(offloaded, offloaded.plan)              # ledger == the plan's packed bytes
    torch.testing.assert_close(offloaded.forward([LONG, PROMPTS[2]]), want, atol=1e-5, rtol=0)
    assert offloaded.generate(PROMPTS, max_new_tokens=8) == resident.generate(PROMPTS, max_new_tokens=8)
    weights = offloaded.engine.weights
    dense = offload.load(llama5, plan=layout_plan(llama5, **EVERY_BACKEND, dtype="float32"), progress=False)
    # what crosses PCIe each step: the packed layers (and the 32-bit head, the same in both)
    head = spec.lm_head_read_bytes
    ratio = (weights.streamed_bytes_per_cycle - head) / (dense.engine.weights.streamed_bytes_per_cycle - head)
    assert ratio < {"int4": 0.45, "int8": 0.6}[scheme]      # of float32 layers (+ the streamed KV, unchanged)


# (qwen3_moe's top-3-of-8 routing flips a token's experts under 8-bit noise on this tiny random model, which
# moves its logits past this bound: tests/offload/models/test_moe.py measures quantized experts as such)
@pytest.mark.parametrize("variant", ["llama", "qwen2_tied", "mistral_window", "opt", "qwen3", "gemma2", "phi3",
                                     "mixtral_window", "qwen2_moe"])
def test_int8_stays_close_to_the_model_in_every_family(checkpoint_factory, variant):
    """Every family's matrices go through the same packed linear; 8-bit logits stay within a few percent."""
    path, hf = checkpoint_factory(variant)
    model = _load(path, quantize="int8")
    want = hf_logits(hf, LONG)
    got = model.forward([LONG])[0]
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert model.engine.weights.resident_bytes < 0.5 * _load(path).engine.weights.resident_bytes


def test_int4_error_shrinks_with_the_group_size(llama5):
    want = _load(llama5).forward([LONG])[0]
    errors = {g: float((_load(llama5, quantize="int4", group_size=g).forward([LONG])[0] - want).abs().mean())
              for g in (32, 16)}
    assert errors[16] < errors[32]


def test_bad_quantize_arguments_are_clear_and_load_nothing(llama5, tmp_path):
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        _load(llama5, quantize="int3")
    with pytest.raises(ValueError, match="group_size is the group of a quantization"):
        _load(llama5, group_size=64)
    with pytest.raises(ValueError, match="group_size 48 does not divide the 64 inputs"):
        _load(llama5, quantize="int4", group_size=48)
    plan = layout_plan(llama5, **EVERY_BACKEND, dtype="float32", quantization="int4")
    with pytest.raises(ValueError, match="quantize='int8' disagrees with the plan's 'int4'"):
        offload.load(llama5, plan=plan, quantize="int8", progress=False)
    # a --quantize plan file from the CLI runs as planned
    path = tmp_path / "plan.json"
    plan.to_json(path)
    assert offload.load(llama5, plan=str(path), progress=False).plan.quantization == "int4"
