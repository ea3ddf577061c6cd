"""Tiny GGUF files written by the `gguf` package from transformers models: what llama.cpp's converter
writes (metadata, tensor names, q/k rows interleaved for Llama), each matrix in a chosen GGML type
quantized by the package itself."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from placement.gguf_file import EXPERT_NAMES, MOE, NAMES, NORM_SHIFTED, layer_names

HF_NAMES = {hf: name for name, hf in NAMES.items()}                  # written as llama.cpp names them


def gguf_name(hf_name: str, architecture: str = "llama") -> str:
    if hf_name in HF_NAMES:
        return HF_NAMES[hf_name]
    if ".mlp.experts." in hf_name:                                # a stacked projection of every expert
        _, _, index, rest = hf_name.split(".", 3)
        return f"blk.{index}.{ {v: k for k, v in EXPERT_NAMES.items()}[rest.split('.')[2]]}.weight"
    _, _, index, rest = hf_name.split(".", 3)                     # model.layers.<i>.<rest>
    module, _, kind = rest.rpartition(".")
    # (transformers names every MoE family's router mlp.gate in memory, Mixtral's too)
    names = {hf: name for name, hf in {**layer_names(architecture), "ffn_gate_inp": "mlp.gate"}.items()}
    return f"blk.{index}.{names[module]}.{kind}"


def _llama_cpp_tensors(state_dict: dict):
    """(HF-like name, tensor) as llama.cpp's converter lays them out: transformers' fused experts
    (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]) as one stacked tensor per projection
    ("...mlp.experts.gate_proj" [E, I, H]), the shared-expert gate [1, H] as a row [H]."""
    for name, tensor in state_dict.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)
            yield name.replace("gate_up_proj", "gate_proj"), gate
            yield name.replace("gate_up_proj", "up_proj"), up
        elif name.endswith("mlp.experts.down_proj"):
            yield name, tensor
        elif name.endswith("mlp.shared_expert_gate.weight"):
            yield name, tensor.reshape(-1)
        else:
            yield name, tensor


def permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permute of q/k rows (what the runtime undoes)."""
    return weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:]) \
        .swapaxes(1, 2).reshape(weights.shape)


def unpermute(weights, num_heads: int):
    """The inverse of `permute` (numpy or torch rows [out, ...]): q/k rows back in transformers' order."""
    return weights.reshape(num_heads, weights.shape[0] // num_heads // 2, 2, *weights.shape[1:]) \
        .swapaxes(1, 2).reshape(weights.shape)


def random_blocks(shape: tuple[int, int], qtype_name: str, seed: int = 0) -> np.ndarray:
    """Valid random blocks of a K-quant type the gguf package cannot quantize: random codes and scales,
    with every block's float16 super-scales set to small finite values. [rows, bytes] uint8."""
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, qtype_name)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype_name == "Q6_K":                                   # d last
        data[..., -2:] = scales[..., 0:2]
    else:                                                      # Q4_K / Q5_K: d, dmin first
        data[..., 0:4] = scales.reshape(rows, cols // block, 4)
    return data.reshape(rows, -1)


def write_gguf(path: Path, hf_model, architecture: str, matrix_type: str = "F32",
               vocab_tokens: bool = True, type_of: dict[str, str] | None = None,
               expert_matrices: bool = False) -> Path:
    """`hf_model` (a transformers causal LM) as a GGUF file: 2-D weights in `matrix_type` (quantized by
    the gguf package; K-quants random valid blocks), or in `type_of[module]` for the modules it names (as
    llama.cpp's Q4_K_M mixes Q4_K with Q6_K for v_proj / down_proj), 1-D ones in F32. A Mixtral is written as
    llama.cpp does, architecture "llama" with its expert count; `expert_matrices`: each expert's matrix a tensor
    of its own (blk.<i>.ffn_gate.<e>.weight, as files converted before April 2024 hold them), else one 3-D
    tensor per projection."""
    import gguf
    config = hf_model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters
    if "full_attention" in rope:            # Gemma 3: the global layers' RoPE (llama.cpp fixes the local one)
        assert rope["sliding_attention"]["rope_theta"] == 10000.0, rope
        rope = rope["full_attention"]
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_freq_base(rope["rope_theta"])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * getattr(config, "partial_rotary_factor", 1.0)))
    if getattr(config, "sliding_window", None) and architecture in ("gemma2", "gemma3", "phi3"):
        writer.add_sliding_window(config.sliding_window)
    if architecture == "gemma2":                 # what llama.cpp's converter writes for Gemma 2
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
    if architecture == "phi3" and rope.get("rope_type") == "longrope":    # factors as tensors, as llama.cpp
        writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        for kind in ("long", "short"):
            writer.add_tensor(f"rope_factors_{kind}.weight", np.array(rope[f"{kind}_factor"], dtype=np.float32))
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    if config.pad_token_id is not None:
        writer.add_pad_token_id(config.pad_token_id)
    if vocab_tokens:      # a byte-level vocabulary: what transformers' GGUF loader expects to find
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
        writer.add_token_merges([])
    if architecture in MOE:                   # what llama.cpp's converter writes for Qwen2-MoE / Qwen3-MoE
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
        if architecture == "qwen2moe":
            writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    if architecture == "llama" and getattr(config, "num_local_experts", None):     # Mixtral: a "llama" with experts
        writer.add_expert_count(config.num_local_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    for name, tensor in _llama_cpp_tensors(hf_model.state_dict()):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if expert_matrices and ".mlp.experts." in name:
            for expert, matrix in enumerate(tensor):
                kind = gguf_name(name, architecture).split(".")[2].removesuffix("_exps")    # ffn_gate, ...
                _add_matrix(writer, f"blk.{name.split('.')[2]}.{kind}.{expert}.weight", matrix.detach().float().numpy(),
                            matrix_type)
            continue
        kind = next((t for module, t in (type_of or {}).items() if f".{module}." in f"{name}."), matrix_type)
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        values = tensor.detach().float().numpy()
        if architecture in NORM_SHIFTED and name.endswith("norm.weight"):
            values = values + 1
        if architecture == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            values = permute(values, config.num_attention_heads if "q_proj" in name else config.num_key_value_heads)
        if values.ndim >= 2 and kind in ("Q4_K", "Q5_K", "Q6_K"):         # (3-D: every expert's matrix)
            packed = np.stack([random_blocks(matrix.shape, kind, seed=len(name) + e)
                               for e, matrix in enumerate(values.reshape(-1, *values.shape[-2:]))])
            packed = packed.reshape(*values.shape[:-1], packed.shape[-1])
            writer.add_tensor(gguf_name(name, architecture), packed, raw_shape=packed.shape, raw_dtype=qtype)
        elif values.ndim >= 2 and kind != "F32":
            packed = gguf.quants.quantize(values, qtype)
            writer.add_tensor(gguf_name(name, architecture), packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name, architecture), np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_matrix(writer, gguf_tensor_name: str, values: np.ndarray, kind: str) -> None:
    """A 2-D matrix in GGML type `kind` (quantized by the gguf package), or F32."""
    import gguf
    if kind == "F32":
        writer.add_tensor(gguf_tensor_name, np.ascontiguousarray(values))
        return
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    packed = gguf.quants.quantize(values, qtype)
    writer.add_tensor(gguf_tensor_name, packed, raw_shape=packed.shape, raw_dtype=qtype)
