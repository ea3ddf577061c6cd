"""workspace_bytes bounds the activations of a real forward pass (transformers, eager attention)."""
import pytest

from placement import Architecture, workspace_bytes
from placement.workspace import ALLOCATOR_SLACK_BYTES

from .helpers import tiny_llama_config


def _activation_bytes(config: dict, batch_size: int, num_tokens: int) -> int:
    """Sum of the bytes of every tensor produced inside decoder layer 0 (each module's outputs,
    attention probabilities included) plus the last-position logits, in one transformers forward."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.AutoConfig.for_model(**config)
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    total = 0

    def count(module, inputs, output):
        nonlocal total
        outputs = output if isinstance(output, tuple) else (output,)
        total += sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    hooks = [m.register_forward_hook(count) for m in model.model.layers[0].modules()]
    ids = torch.randint(0, config["vocab_size"], (batch_size, num_tokens))
    with torch.no_grad():
        out = model(input_ids=ids, logits_to_keep=1)
    for h in hooks:
        h.remove()
    return total + out.logits.numel() * out.logits.element_size()


@pytest.mark.parametrize("batch_size, num_tokens, kv_heads", [(1, 32, 2), (3, 64, 4), (2, 1, 2)])
def test_workspace_bounds_a_real_forward(batch_size, num_tokens, kv_heads):
    config = tiny_llama_config(torch_dtype="float32", num_key_value_heads=kv_heads)
    bound = workspace_bytes(Architecture.from_config(config), batch_size, num_tokens, num_tokens, "float32")
    assert bound - ALLOCATOR_SLACK_BYTES >= _activation_bytes(config, batch_size, num_tokens)


def test_workspace_grows_with_chunk_batch_and_context():
    arch = Architecture.from_config(tiny_llama_config())
    base = workspace_bytes(arch, 1, 16, 64, "bfloat16")
    assert workspace_bytes(arch, 1, 32, 64, "bfloat16") > base
    assert workspace_bytes(arch, 2, 16, 64, "bfloat16") > base
    assert workspace_bytes(arch, 1, 16, 128, "bfloat16") > base
    assert workspace_bytes(arch, 1, 1, 64, "bfloat16") < base          # decode is covered by prefill
    assert workspace_bytes(arch, 1, 16, 64, "float32") > base
    with pytest.raises(ValueError, match="positive"):
        workspace_bytes(arch, 0, 16, 64, "bfloat16")


def test_a_large_packed_head_is_held_a_chunk_of_rows_at_a_time():
    """A packed LM head of 128256 x 4096 (Llama 3's) is dequantized DEQUANT_MAX_WEIGHTS weights at a time: the
    workspace grows by one chunk and its product, not by the whole dense head (2.6 GB in bfloat16)."""
    from placement.workspace import DEQUANT_MAX_WEIGHTS, dequant_rows
    arch = Architecture.from_config(tiny_llama_config())
    head, layer = (128256, 4096), (1024, 4096)
    assert dequant_rows(layer) == 1024 and dequant_rows(head) * 4096 == DEQUANT_MAX_WEIGHTS
    base = workspace_bytes(arch, 2, 16, 64, "bfloat16", [layer])
    chunked = workspace_bytes(arch, 2, 16, 64, "bfloat16", [layer, head])
    assert 0 < chunked - base < 200 << 20 and chunked - base < head[0] * head[1] * 5 / 10
