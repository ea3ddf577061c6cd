"""The one-device path on a CUDA GPU: same logits and tokens as transformers on the CPU."""
from __future__ import annotations

import pytest
import torch

import offload
from tests.offload.builders import hf_greedy, hf_logits

PROMPT = [5, 17, 99, 42, 8, 63, 21, 7, 88]


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["llama", "mistral_window", "opt_proj"])
def test_cuda_matches_transformers(checkpoint_factory, variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    path, hf = checkpoint_factory(variant)
    model = offload.load(path, device="cuda", dtype="float32", max_batch_size=2, max_seq_len=64,
                         prefill_chunk_size=4, progress=False)
    logits = model.forward([PROMPT])
    assert logits.device.type == "cpu"          # forward() hands logits to the host chunk by chunk
    torch.testing.assert_close(logits[0].cpu(), hf_logits(hf, PROMPT), atol=1e-4, rtol=0)
    assert model.generate([PROMPT, PROMPT[:4]], max_new_tokens=12) == \
        [hf_greedy(hf, PROMPT, 12), hf_greedy(hf, PROMPT[:4], 12)]
    session = model.session()
    first = session.generate(PROMPT, max_new_tokens=5)
    assert session.generate([3, 4], max_new_tokens=5) == hf_greedy(hf, PROMPT + first + [3, 4], 5)
    assert len(model.generate([PROMPT], max_new_tokens=6, temperature=0.8, seed=1)[0]) == 6


@pytest.mark.cuda
def test_cuda_speculative_decoding_with_trees_and_a_draft_model_is_plain_greedy(llama5):
    """On the GPU: token trees verified through SDPA's tree mask over a streamed / host-attended / device KV mix,
    and a draft model resident beside an offloaded target (proposing chains, and trees built in its own tree
    passes), give plain greedy decoding's tokens."""
    from tests.offload.generation.test_speculative import PROMPT as REPEATING, TreeScript
    from tests.offload.offload_plans import layout_plan
    torch.backends.cuda.matmul.allow_tf32 = False
    plan = layout_plan(llama5, weights="gcgcg", kv="acgac", batch_size=1, chunk=16, max_seq_len=64, dtype="float32")
    model = offload.load(llama5, plan=plan, device="cuda", progress=False)
    plain = model.generate([REPEATING], max_new_tokens=20)[0]
    for seed in range(3):
        assert model.generate([REPEATING], max_new_tokens=20, draft=TreeScript(REPEATING, plain, seed),
                              speculate="always")[0] == plain
    assert model.generate([REPEATING], max_new_tokens=20, draft="ngram-tree", speculate="always")[0] == plain
    drafted = offload.load(llama5, device="cuda", dtype="float32", max_seq_len=64, gpu_layers=2, draft=llama5,
                           draft_quantize="int8", progress=False)
    assert drafted.generate([REPEATING], max_new_tokens=20, speculate="always")[0] == plain
    assert drafted.stats.num_verify_passes > 0 and drafted.stats.bytes_per_decode_token > 0
    from offload.generation.drafts import ModelDraft
    tree = ModelDraft(drafted.draft_model, tree=True)
    for _ in range(2):                                   # (the second time, with what the first taught it)
        assert drafted.generate([REPEATING], max_new_tokens=20, draft=tree, speculate="always")[0] == plain
    assert tree.acceptance.tries.sum() > 0


@pytest.mark.cuda
def test_cuda_verification_passes_run_the_cpu_layers_in_place_and_batch_a_servers_rows(llama5, device="cuda"):
    """On the GPU: a pass over layers computed on the CPU runs them there on all its tokens (a chain or a tree),
    copying only what a plain step copies (the LM head); a server's rows verified in one pass
    (Engine.verify_rows) and a draft model proposing for all of them give each row's plain greedy tokens."""
    from offload.generation.drafts import ModelDraft
    from tests.offload.generation.test_speculative import PROMPT as REPEATING, ScriptedDraft, TreeScript
    torch.backends.cuda.matmul.allow_tf32 = False
    options = dict(device=device, dtype="float32", max_seq_len=64, max_batch_size=3, progress=False)
    model = offload.load(llama5, gpu_layers=1, kv_gpu_layers=1, cpu_compute=True, **options)
    assert model.engine.cpu_layers
    weights = model.engine.weights
    head = weights.prefetcher.items[weights.streamed_items.index("lm_head")].num_bytes
    plain = model.generate([REPEATING], max_new_tokens=16)[0]
    for draft in (ScriptedDraft(REPEATING, plain), TreeScript(REPEATING, plain, 0)):
        assert model.generate([REPEATING], max_new_tokens=16, draft=draft, speculate="always")[0] == plain
        stats = model.stats
        assert stats.num_verify_passes > 0
        assert stats.host_to_device_bytes - stats.prefill_host_to_device_bytes == \
            head * (stats.num_decode_tokens - stats.num_accepted_tokens)
    prompts = [REPEATING, REPEATING[:5], REPEATING[2:9]]
    alone = [model.generate([p], max_new_tokens=6)[0] for p in prompts]
    draft_model = offload.load(llama5, **options)
    assert ModelDraft(draft_model).propose_rows(prompts, [5, 5, 5]) == [a[:5] for a in alone]
    engine = model.engine
    assert engine.prefill(prompts, [0, 0, 0]).argmax(-1).tolist() == [a[0] for a in alone]
    checked = engine.verify_rows([a[:5] for a in alone], [len(p) for p in prompts])   # each [5, V]
    assert [row.argmax(-1).tolist() for row in checked] == [a[1:6] for a in alone]
