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
