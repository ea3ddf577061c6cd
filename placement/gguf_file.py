"""GGUF files (llama.cpp's format): the config.json and the tensor names of the model a .gguf holds.

Read with the `gguf` package (maintained with llama.cpp; numpy only, no torch). The config comes from the
metadata as transformers' GGUF loader reads it; tensors are named as the Hugging Face checkpoint names them
(`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`). The runtime reads and dequantizes the
data (offload/loading/gguf_checkpoint.py); llama.cpp's q/k row permutation of Llama models is undone there.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from placement.config_fields import ConfigError
from placement.quantization import Quantization

# general.architecture -> config.json model_type (llama covers Mistral, and Mixtral: see MIXTRAL, as llama.cpp
# writes them)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3_text",
                 "phi3": "phi3", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
MOE = ("qwen2moe", "qwen3moe")
NORM_SHIFTED = ("gemma2", "gemma3")      # llama.cpp's converter stores Gemma's norm weights + 1
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
PERMUTED_QK = ("llama",)     # architectures whose q/k rows llama.cpp's converter interleaves
# GGML type -> the packed layout (placement/quantization.py) its blocks convert into, code for code: the legacy
# types in blocks of 32 weights with a float16 d (and m): Q4_0 w = (q - 8) d (int4-sym), Q4_1 w = q d + m, Q5_0
# w = (q - 16) d, Q5_1 w = q d + m, Q8_0 w = q d; the K-quants in super-blocks of 256 whose sub-blocks scale
# by d * sc (and subtract dmin * m), 6-bit sc and m: Q4_K and Q5_K sub-blocks of 32, Q6_K of 16 (int8 sc,
# w = (q - 32) d sc). The scales and mins are held in the model dtype: exact in float32 for every type (and
# in float16 for the legacy ones), rounded to bfloat16 in a bfloat16 model. 5-bit codes take a byte each.
PACKED_TYPES = {"Q4_0": "int4-sym-g32", "Q4_1": "int4-g32", "Q5_0": "int8-g32", "Q5_1": "int8-asym-g32",
                "Q8_0": "int8-g32", "Q4_K": "int4-g32", "Q5_K": "int8-asym-g32", "Q6_K": "int8-g16"}
# GGUF tensor name -> Hugging Face name (llama.cpp's gguf-py tensor_mapping for these architectures)
NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
# the architectures whose layers name some tensors otherwise (Gemma's four norms; Phi-3's fused matrices)
ARCHITECTURE_LAYER_NAMES = {
    "gemma2": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}}
ARCHITECTURE_LAYER_NAMES["gemma3"] = ARCHITECTURE_LAYER_NAMES["gemma2"]
# mixture of experts: the router, the shared expert and its gate (a 1-D [hidden] row in the file), and the
# routed experts, each projection one 3-D tensor [experts, out, in] split here into the experts' matrices
MOE_LAYER_NAMES = {"ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                   "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
                   "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
EXPERT_NAMES = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
for _arch in MOE:
    ARCHITECTURE_LAYER_NAMES[_arch] = MOE_LAYER_NAMES
# Mixtral: llama.cpp writes it as architecture "llama" with `llama.expert_count`; its router and experts take
# transformers' Mixtral names. Files converted before April 2024 hold each expert's matrix as a tensor of its
# own (blk.<i>.ffn_gate.<e>.weight), later ones one 3-D tensor per projection, as above.
MIXTRAL = "mixtral"
ARCHITECTURE_LAYER_NAMES[MIXTRAL] = {"ffn_gate_inp": "block_sparse_moe.gate"}
# the tensor naming -> (its experts' prefix in a layer, GGUF projection -> the experts' matrix name)
EXPERT_BLOCKS = {MIXTRAL: ("block_sparse_moe.experts.", {"ffn_gate_exps": "w1", "ffn_up_exps": "w3",
                                                         "ffn_down_exps": "w2"}),
                 **{arch: ("mlp.experts.", EXPERT_NAMES) for arch in MOE}}
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LEGACY_EXPERT = re.compile(r"blk\.(\d+)\.(ffn_gate|ffn_up|ffn_down)\.(\d+)\.weight$")


def find_gguf(path) -> Path | None:
    """The .gguf file `path` names: itself, or the only .gguf in a folder without a config.json."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        files = sorted(path.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        if len(files) > 1:
            raise ConfigError(f"{path}: holds {len(files)} .gguf files ({', '.join(f.name for f in files[:4])}); "
                              "name the one to load")
    return None


def layer_names(architecture: str) -> dict[str, str]:
    """GGUF layer tensor name -> Hugging Face module name, for `architecture` (a tensor naming: tensor_naming)."""
    return {**LAYER_NAMES, **ARCHITECTURE_LAYER_NAMES.get(architecture, {})}


def tensor_naming(architecture: str, metadata: dict) -> str:
    """How a file's tensors map to Hugging Face names: its architecture's, or MIXTRAL for a "llama" file with
    experts."""
    return MIXTRAL if architecture == "llama" and metadata.get("llama.expert_count") else architecture


@dataclass(frozen=True)
class ExpertTensor:
    """One routed expert's matrix inside a GGUF 3-D expert tensor (ffn_*_exps, experts outermost), with the
    attributes of a gguf ReaderTensor that the runtime reads: name, tensor_type, shape (ne order), data."""

    tensor: object
    expert: int

    @property
    def name(self) -> str:
        return f"{self.tensor.name}[{self.expert}]"

    @property
    def tensor_type(self):
        return self.tensor.tensor_type

    @property
    def shape(self):
        return self.tensor.shape[:2]

    @property
    def data(self):
        return self.tensor.data[self.expert]


def expert_tensors(tensor, architecture: str) -> dict:
    """HF name -> ExpertTensor for each expert of a GGUF routed-expert tensor ([experts, out, in]); {} for any
    other tensor. `architecture`: the file's tensor naming (tensor_naming)."""
    match = _LAYER.match(tensor.name)
    prefix, projections = EXPERT_BLOCKS.get(architecture, ("", {}))
    if match is None or match.group(2) not in projections:
        return {}
    layer, projection = match.group(1), projections[match.group(2)]
    return {f"model.layers.{layer}.{prefix}{e}.{projection}.weight": ExpertTensor(tensor, e)
            for e in range(int(tensor.shape[2]))}


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one no supported model reads (rope_freqs).
    `architecture`: the file's tensor naming (tensor_naming)."""
    if gguf_name in NAMES:
        return NAMES[gguf_name]
    legacy = _LEGACY_EXPERT.match(gguf_name) if architecture == MIXTRAL else None
    if legacy is not None:                        # one expert's matrix (a file converted before April 2024)
        prefix, projections = EXPERT_BLOCKS[MIXTRAL]
        layer, kind, expert = legacy.groups()
        return f"model.layers.{layer}.{prefix}{expert}.{projections[kind + '_exps']}.weight"
    match, names = _LAYER.match(gguf_name), layer_names(architecture)
    if match is None or match.group(2) not in names:
        return None
    return f"model.layers.{match.group(1)}.{names[match.group(2)]}.{match.group(3)}"


@dataclass(frozen=True)
class GGUFModel:
    """What a .gguf holds: its config.json, and its tensors by Hugging Face name."""

    path: Path
    architecture: str             # the GGUF architecture ("llama", "qwen2", ...)
    config: dict
    tensors: dict                 # HF name -> the gguf ReaderTensor
    metadata: dict                # every scalar / string metadata field (arrays left out)

    @property
    def permutes_qk(self) -> bool:
        return self.architecture in PERMUTED_QK

    def shifts_norm(self, name: str) -> bool:
        """Whether tensor `name` (a Hugging Face name) is stored + 1 (Gemma's norm weights)."""
        return self.architecture in NORM_SHIFTED and name.endswith("norm.weight")

    def packed_layouts(self, matrix_names) -> dict[str, Quantization]:
        """The layouts the matrices `matrix_names` are held in as the file stores them: each
        quantized one in the layout its type converts into (PACKED_TYPES); float ones are left out (dense)."""
        types = {name: self.tensors[name].tensor_type.name for name in matrix_names}
        return {name: Quantization.parse(PACKED_TYPES[kind]) for name, kind in types.items() if kind in PACKED_TYPES}


def gguf_reader(path):
    """The `gguf` package's reader of `path`, kept for the file as it is now: the tokenizer, the planner and the
    checkpoint each read a GGUF file's metadata, whose parsing takes seconds for a large vocabulary."""
    stat = Path(path).stat()
    return _cached_reader(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime_ns: int, size: int):
    import gguf
    return gguf.GGUFReader(path)


def read_gguf(path) -> GGUFModel:
    """Open `path` (a .gguf) and read its config; ConfigError naming the file for a corrupt file, an
    architecture or a tensor type this library does not run."""
    path = Path(path)
    try:
        reader = gguf_reader(path)
    except Exception as error:                    # truncated, not a GGUF, bad magic/version
        raise ConfigError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None
    metadata = {}
    for key, field in reader.fields.items():
        try:
            value = field.contents()
        except Exception:                         # noqa: BLE001 (a field the package cannot decode)
            continue
        if not isinstance(value, list):
            metadata[key] = value
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"{path}: GGUF architecture {architecture!r} is not supported; supported: "
                          f"{', '.join(ARCHITECTURES)}")
    tensors = {}
    naming = tensor_naming(architecture, metadata)
    for tensor in reader.tensors:
        name = hf_name(tensor.name, naming)
        experts = expert_tensors(tensor, naming)
        if name is None and not experts:
            continue
        if tensor.tensor_type.name not in SUPPORTED_TYPES:
            raise ConfigError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, a GGML type this "
                              f"library does not read; supported: {', '.join(SUPPORTED_TYPES)}")
        tensors.update(experts or {name: tensor})
    return GGUFModel(path=path, architecture=architecture, config=_config(path, architecture, metadata, reader,
                                                                            tensors), tensors=tensors,
                     metadata=metadata)


def _config(path: Path, arch: str, meta: dict, reader, tensors: dict) -> dict:
    def get(key, default=None, required=True):
        value = meta.get(f"{arch}.{key}", default)
        if value is None and required:
            raise ConfigError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return value

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", None, required=False) or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(tensors["model.embed_tokens.weight"].shape[-1])
    num_heads = int(get("attention.head_count"))
    config = {"model_type": ARCHITECTURES[arch], "vocab_size": int(vocab),
              "hidden_size": int(get("embedding_length")), "intermediate_size": int(get("feed_forward_length")),
              "num_hidden_layers": int(get("block_count")), "num_attention_heads": num_heads,
              "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
              "max_position_embeddings": int(get("context_length")),
              "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
              "rope_theta": float(get("rope.freq_base", 10000.0)),
              "tie_word_embeddings": "lm_head.weight" not in tensors, "torch_dtype": "float32",
              "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}
    head_dim = get("attention.key_length", None, required=False)
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    factor, kind = get("rope.scaling.factor", None, required=False), get("rope.scaling.type", None, required=False)
    if kind in ("linear",) and factor:
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    elif kind not in (None, "none") and not (arch == "phi3" and kind in ("longrope", "su")):
        raise ConfigError(f"{path}: GGUF rope scaling {kind!r} is not supported; supported: none, linear")
    if arch in ("qwen2", *MOE):
        config["use_sliding_window"] = False
    if tensor_naming(arch, meta) == MIXTRAL:
        config.update(model_type="mixtral", num_local_experts=int(get("expert_count")),
                      num_experts_per_tok=int(get("expert_used_count")), sliding_window=None)
    if arch in MOE:        # llama.cpp renormalises the chosen experts' weights for Qwen3-MoE, not Qwen2-MoE
        config.update(num_experts=int(get("expert_count")), num_experts_per_tok=int(get("expert_used_count")),
                      moe_intermediate_size=int(get("expert_feed_forward_length")),
                      norm_topk_prob=arch == "qwen3moe")
        if arch == "qwen2moe":
            config["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    window = get("attention.sliding_window", None, required=False)
    if arch in NORM_SHIFTED:
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden / heads) in the 27B models
        big = config["num_hidden_layers"] == {"gemma2": 46, "gemma3": 62}[arch]
        config.update(head_dim=head_dim, sliding_window=int(window or 4096), hidden_activation="gelu_pytorch_tanh",
                      query_pre_attn_scalar=config["hidden_size"] // num_heads if big else head_dim)
        if arch == "gemma2":
            config.update(attn_logit_softcapping=get("attn_logit_softcapping", None, required=False),
                          final_logit_softcapping=get("final_logit_softcapping", None, required=False))
        else:             # llama.cpp's Gemma 3: local layers at base 10000, a global one in six
            config.update(rope_local_base_freq=10000.0, sliding_window_pattern=6)
    if arch == "phi3":
        config["sliding_window"] = int(window) if window else None
        rotary = get("rope.dimension_count", None, required=False)
        head_dim = config["hidden_size"] // num_heads
        if rotary and int(rotary) != head_dim:
            config["partial_rotary_factor"] = int(rotary) / head_dim
        factors = {t.name: [float(x) for x in t.data] for t in reader.tensors if t.name.startswith("rope_factors_")}
        if factors:       # Phi-3.5 / Phi-3 128k: longrope, its factors stored as tensors
            config["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
            config["rope_scaling"] = {"rope_type": "longrope", "short_factor": factors["rope_factors_short.weight"],
                                      "long_factor": factors["rope_factors_long.weight"]}
    return config
