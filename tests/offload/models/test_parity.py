"""Every family and variant against transformers: logits (float32) and greedy tokens (float32, bfloat16)."""
from __future__ import annotations

import math

import pytest
import torch

import offload
from tests.offload.builders import VARIANTS, VOCAB, hf_greedy, hf_logits, load_hf

PROMPTS = [[5, 17, 99, 42, 8, 63, 21, 7, 88], [33, 4, 120, 61], [9, 14, 77, 31, 50, 2, 66, 101, 12, 45, 3, 90, 27]]
LONG = [(i * 37 + 11) % (VOCAB - 3) + 3 for i in range(30)]
NUM_NEW = 20


def _decode_logits(model, prefix: list[int]) -> torch.Tensor:
    """Our float32 logits [V] for the last token of `prefix` computed by a decode step (the rest prefilled)."""
    model.engine.prefill([prefix[:-1]], [0])
    return model.engine.decode([prefix[-1]], [len(prefix) - 1])[0].float().cpu()


def _load(path, dtype="float32", **kwargs):
    return offload.load(path, dtype=dtype, max_seq_len=64, progress=False, **kwargs)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoint_factory, variant, sharded):
    path, hf = checkpoint_factory(variant, sharded)
    model = _load(path, max_batch_size=2, prefill_chunk_size=7)       # several chunks per prompt
    rows = [LONG, PROMPTS[2]]
    got = model.forward(rows)                                           # [2, 30, V]
    assert got.dtype == torch.float32 and got.shape == (2, len(LONG), VOCAB)
    for b, row in enumerate(rows):
        torch.testing.assert_close(got[b, :len(row)], hf_logits(hf, row), atol=1e-4, rtol=0)
    assert not got[1, len(PROMPTS[2]):].any()                           # padding: zeros


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_ragged_batch_float32(checkpoint_factory, variant):
    path, hf = checkpoint_factory(variant)
    model = _load(path, max_batch_size=3, prefill_chunk_size=5)
    got = model.generate(PROMPTS, max_new_tokens=NUM_NEW)
    for b, prompt in enumerate(PROMPTS):
        assert got[b] == hf_greedy(hf, prompt, NUM_NEW), f"row {b}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_ragged_batch_bfloat16(checkpoint_factory, variant):
    """bf16 tokens may differ from transformers' bf16 tokens only at a near-tie: at the first divergence,
    transformers' own top-2 logits must be closer than the bf16 noise measured between the two
    implementations on that same prefix (our forward and our decode step: on the CPU a decode step attends
    in float32 where transformers' SDPA rounds its probabilities to bf16), or than two bf16 steps at their
    magnitude (a batched decode rounds differently from a one-row forward, which the noise measure cannot
    see), and our token must be transformers' runner-up."""
    path, _ = checkpoint_factory(variant)
    hf = load_hf(path, torch.bfloat16)
    model = _load(path, "bfloat16", max_batch_size=3, prefill_chunk_size=5)
    got = model.generate(PROMPTS, max_new_tokens=NUM_NEW)
    num_diverged = 0
    for b, prompt in enumerate(PROMPTS):
        want = hf_greedy(hf, prompt, NUM_NEW)
        if got[b] == want:
            continue
        num_diverged += 1
        s = next(i for i, (x, y) in enumerate(zip(got[b], want)) if x != y)
        prefix = prompt + want[:s]
        ref = hf_logits(hf, prefix)[-1]                                 # transformers bf16, [V]
        ours = _load(path, "bfloat16")
        noise = max(float((ours.forward([prefix])[0, -1] - ref).abs().max()),
                    float((_decode_logits(ours, prefix) - ref).abs().max()))
        top2 = torch.topk(ref, 2)
        # (an exact tie ranks either way: our token's logit must be the runner-up's)
        assert float(ref[got[b][s]]) == float(top2.values[1]), \
            f"row {b} step {s}: our token is not transformers' runner-up"
        gap = float(top2.values[0] - top2.values[1])
        step = torch.finfo(torch.bfloat16).eps * 2.0 ** math.floor(math.log2(abs(float(top2.values[0]))))
        assert gap <= max(2 * noise, 2 * step), \
            f"row {b} step {s}: top-2 gap {gap} is beyond bf16 noise {noise} and two bf16 steps {2 * step}"
    assert num_diverged <= 1, f"{num_diverged} of {len(PROMPTS)} rows diverged in bf16"


@pytest.mark.parametrize("variant, change", [
    ("mistral_window", {"sliding_window": None}),
    ("qwen2_window", {"use_sliding_window": False}),
    ("llama_rope_dynamic", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ("llama_rope_llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    ("gemma2", {"attn_logit_softcapping": 1000.0}),
    ("gemma2", {"final_logit_softcapping": 1000.0}),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                       "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}}}),
    ("phi3", {"partial_rotary_factor": 1.0, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
    ("phi3_longrope", {"original_max_position_embeddings": 64}),
])
def test_variant_option_changes_the_logits(checkpoint_factory, tmp_path, variant, change):
    """The parity tests above exercise each option: without it, the same weights give other logits."""
    import shutil

    from tests.offload.builders import edit_config
    path, _ = checkpoint_factory(variant)
    plain = tmp_path / "plain"
    shutil.copytree(path, plain)
    edit_config(plain, **change)
    a, b = _load(path).forward([LONG]), _load(plain).forward([LONG])
    assert (a - b).abs().max() > 1e-3


def test_multimodal_gemma3_runs_its_language_model(tmp_path):
    """A `gemma3` checkpoint (vision tower + language model under `language_model.`): text in, the same
    logits and greedy tokens as transformers' Gemma3ForConditionalGeneration, on one device and offloaded."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from tests.offload.builders import VARIANTS
    from tests.offload.offload_plans import layout_plan
    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    config = Gemma3Config(text_config=VARIANTS["gemma3"][1], vision_config=vision, mm_tokens_per_image=4,
                          image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    Gemma3ForConditionalGeneration(config).eval().save_pretrained(str(tmp_path))
    hf = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    plain = _load(tmp_path, max_batch_size=2, prefill_chunk_size=7)
    offloaded = offload.load(tmp_path, plan=layout_plan(tmp_path, weights="cgc", kv="cag", embedding="cpu",
                                                        lm_head="cpu", max_seq_len=64), progress=False)
    for model in (plain, offloaded):
        got = model.forward([LONG[:20]])[0]
        torch.testing.assert_close(got, hf_logits(hf, LONG[:20]), atol=1e-4, rtol=0)
        assert model.generate([PROMPTS[0]], max_new_tokens=8) == [hf_greedy(hf, PROMPTS[0], 8)]
