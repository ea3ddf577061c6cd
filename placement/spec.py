"""ModelSpec: the exact bytes, FLOPs and KV bytes of a model, per placement item.

Built from a checkpoint directory (config.json plus the safetensors headers: exact per-tensor dtype
and bytes), a GGUF file, a config.json path, a Hugging Face Hub name (its config and headers read over HTTP
when the cache lacks them: no weights downloaded), or a bundled preset name; `load_spec` picks the right one.
The placement items are the decoder layers, the embedding (token table, plus OPT's positions and
project_in), the final norm (plus OPT's project_out) and the LM head (no bytes of its own when tied).
"""
from __future__ import annotations

import dataclasses
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from .architecture import DTYPE_BYTES, Architecture, ConfigError, normalize_dtype
from .headers import SAFETENSORS_DTYPES, TensorInfo, read_checkpoint_headers
from .jsonfile import read_json_object
from .gguf_file import find_gguf, read_gguf
from .hub import HubName, packaged_gguf
from .compressed_tensors import packed_matrices
from .quantization import QUANTIZE_SCHEMES, Quantization, layouts_label
from . import presets


@dataclass(frozen=True)
class ModelSpec:
    """Exact per-tensor bytes of one model in one dtype; derived per-item totals as properties.

    `tensor_bytes` maps every checkpoint tensor the architecture names to its bytes: from the file
    headers when read from a checkpoint (unless `dtype` overrides it), else shape x dtype size.
    """

    name: str
    arch: Architecture
    dtype: str
    tensor_bytes: dict = field(repr=False)
    source: str = "config"            # "checkpoint" | "config" | "preset"
    path: str | None = None
    layouts: dict = field(default_factory=dict, repr=False)   # matrix name -> its packed Quantization

    def __post_init__(self):
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if self.source not in ("checkpoint", "config", "preset"):
            raise ValueError(f"ModelSpec.source must be checkpoint, config or preset, got {self.source!r}")
        names = self.arch.all_tensors()
        missing = [n for n in names if n not in self.tensor_bytes]
        if missing:
            raise ConfigError(f"{self.name}: no byte count for tensor {missing[0]!r}")
        arch = self.arch
        layers = tuple(sum(self.tensor_bytes[n] for n in arch.layer_tensors(i))
                       for i in range(arch.num_layers))
        object.__setattr__(self, "_layer_bytes", layers)
        experts = tuple(sum(self.tensor_bytes[n] for e in range(arch.num_experts) for n in arch.expert_tensors(i, e))
                        for i in range(arch.num_layers))
        object.__setattr__(self, "_expert_bytes", experts)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict, *, name: str, dtype: str | None = None,
                    source: str = "config", path: str | None = None) -> "ModelSpec":
        """Bytes from shapes: numel x the size of `dtype` (default: the config's dtype)."""
        arch = Architecture.from_config(config)
        dtype = normalize_dtype(dtype or arch.dtype)
        size = DTYPE_BYTES[dtype]
        tensor_bytes = {n: _numel(s) * size for n, s in arch.all_tensors().items()}
        return cls(name=name, arch=arch, dtype=dtype, tensor_bytes=tensor_bytes, source=source,
                   path=path)

    @classmethod
    def from_config_file(cls, path: str | Path, *, dtype: str | None = None) -> "ModelSpec":
        """From a config.json path (a checkpoint directory's headers are read by `from_checkpoint`)."""
        path = Path(path)
        return cls.from_config(_read_config(path), name=_name_of(path.parent, path), dtype=dtype,
                               path=str(path))

    @classmethod
    def from_preset(cls, name: str, *, dtype: str | None = None) -> "ModelSpec":
        """From a bundled preset (`placement.presets.names()`)."""
        key = presets.resolve(name)
        return cls.from_config(presets.load(key), name=key, dtype=dtype, source="preset")

    @classmethod
    def from_checkpoint(cls, directory: str | Path, *, dtype: str | None = None) -> "ModelSpec":
        """From a Hugging Face checkpoint directory: config.json plus the safetensors headers.

        Tensors are matched to the architecture by name (a missing leading `model.` is tolerated, as
        some OPT exports have it); shapes must agree. Tensors the architecture does not name (e.g.
        rotary `inv_freq` buffers, a duplicate tied `lm_head.weight`) are ignored. Without safetensors
        files the bytes come from the shapes, as `from_config`.
        """
        directory = Path(directory)
        config_path = directory / "config.json"
        return cls.from_headers(_read_config(config_path), read_checkpoint_headers(directory),
                                name=_name_of(directory, config_path), path=str(directory), dtype=dtype)

    @classmethod
    def from_headers(cls, config: dict, headers: dict[str, TensorInfo], *, name: str, path: str,
                     dtype: str | None = None) -> "ModelSpec":
        """From a config and its checkpoint's safetensors headers (name -> TensorInfo; read from a folder, or
        over HTTP for a Hub name); `path` names the checkpoint in errors."""
        if not headers:
            return cls.from_config(config, name=name, dtype=dtype, path=path)
        arch = Architecture.from_config(config)
        packed = packed_matrices(config, arch.all_tensors(), headers, path)   # compressed-tensors
        found = _match_tensors(arch, headers, path, skip=packed)
        if dtype is None:
            by_dtype: Counter = Counter()
            for info in found.values():
                by_dtype[info.dtype] += info.num_bytes
            dtype = SAFETENSORS_DTYPES[by_dtype.most_common(1)[0][0]][0]
            tensor_bytes = {n: info.num_bytes for n, info in found.items()}
        else:
            size = DTYPE_BYTES[normalize_dtype(dtype)]
            tensor_bytes = {n: _numel(info.shape) * size for n, info in found.items()}
        shapes, quantizable = arch.all_tensors(), arch.quantizable_tensors()
        tensor_bytes.update({n: _numel(shapes[n]) * DTYPE_BYTES[normalize_dtype(dtype)] for n in packed})
        spec = cls(name=name, arch=arch, dtype=dtype, tensor_bytes=tensor_bytes, source="checkpoint", path=path)
        # the layers' packed matrices held as they are; any other (a quantized head) is dequantized
        return spec.with_layouts({n: q for n, q in packed.items() if n in quantizable})

    def quantized(self, quantization: Quantization | str | None) -> "ModelSpec":
        """This model with its decoder layers' matrices quantized into `quantization`'s packed layout (exact
        bytes); itself for None. ConfigError for a group size that does not divide a matrix's inputs, a
        scheme quantize-on-load does not write, or a model already quantized."""
        if quantization is None:
            return self
        if isinstance(quantization, str):
            quantization = Quantization.parse(quantization)
        if quantization.scheme not in QUANTIZE_SCHEMES:
            raise ConfigError(f"cannot quantize to {quantization.label}; use one of {', '.join(QUANTIZE_SCHEMES)}")
        if self.layouts:
            raise ConfigError(f"{self.name} is already quantized ({self.quantization}); load it as it is")
        return self.with_layouts({name: quantization for name in self.arch.quantizable_tensors()})

    def with_layouts(self, layouts: dict) -> "ModelSpec":
        """This model with the named matrices held in the given packed layouts (name -> Quantization)."""
        shapes = self.arch.all_tensors()
        tensor_bytes = dict(self.tensor_bytes)
        for name, quantization in layouts.items():
            tensor_bytes[name] = quantization.num_bytes(name, shapes[name], self.dtype)
        return dataclasses.replace(self, tensor_bytes=tensor_bytes, layouts=dict(layouts))

    @property
    def quantization(self) -> str | None:
        """The name of its packed layouts ("int4-g64", "int4-g32+int8-g16"), None when dense."""
        return layouts_label(self.layouts.values())

    @cached_property
    def layer_layouts(self) -> dict:
        """Of `layouts`, the decoder layers' matrices (the token table and LM head a GGUF file may hold packed
        left out)."""
        quantizable = self.arch.quantizable_tensors()
        return {name: layout for name, layout in self.layouts.items() if name in quantizable}

    @property
    def lm_head_packed(self) -> bool:
        """Whether the LM head multiplies a packed matrix (its own, or the tied token table)."""
        names = self.arch.lm_head_tensors() if not self.arch.tie_word_embeddings else (self.arch.token_table,)
        return any(name in self.layouts for name in names)

    @property
    def quantized_shapes(self) -> list[tuple[int, ...]]:
        """The shapes of its packed matrices (each is dequantized next to its matmul)."""
        shapes = self.arch.all_tensors()
        return [shapes[name] for name in self.layouts]

    # ---- per-item bytes -----------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def num_params(self) -> int:
        return self.arch.num_params

    def layer_weight_bytes(self, layer: int) -> int:
        return self._layer_bytes[layer]

    def layer_expert_bytes(self, layer: int) -> int:
        """Of `layer_weight_bytes`, the routed experts' (all of them; 0 for a dense layer)."""
        return self._expert_bytes[layer]

    def routed_expert_bytes(self, layer: int) -> int:
        """One routed expert's bytes in `layer` (its experts are alike; 0 for a dense layer)."""
        return self._expert_bytes[layer] // self.arch.num_experts if self._expert_bytes[layer] else 0

    def expert_slots(self, num_tokens: int) -> int:
        """How many experts `num_tokens` tokens can route to at most in one layer: min(E, k x tokens)."""
        arch = self.arch
        return min(arch.num_experts, arch.num_experts_per_tok * num_tokens) if arch.moe_layers else 0

    def expert_hit_fraction(self, num_tokens: int) -> float:
        """The expected share of a MoE layer's experts that `num_tokens` tokens route to (each token picks
        num_experts_per_tok of num_experts, taken as uniform): 1 - (1 - k/E)^tokens; 0 for a dense model."""
        arch = self.arch
        if not arch.moe_layers:
            return 0.0
        return 1.0 - (1.0 - arch.num_experts_per_tok / arch.num_experts) ** max(num_tokens, 0)

    @property
    def embedding_bytes(self) -> int:
        """Token table (+ OPT positions and project_in); for tied models the shared table once."""
        return sum(self.tensor_bytes[n] for n in self.arch.embedding_tensors())

    @property
    def token_table_bytes(self) -> int:
        """The token embedding table alone (what a tied LM head reads)."""
        return self.tensor_bytes[self.arch.token_table]

    @property
    def final_norm_bytes(self) -> int:
        return sum(self.tensor_bytes[n] for n in self.arch.final_norm_tensors())

    @property
    def lm_head_bytes(self) -> int:
        """The LM head's own bytes: 0 when tied (the table is counted under the embedding)."""
        return sum(self.tensor_bytes[n] for n in self.arch.lm_head_tensors())

    @property
    def lm_head_read_bytes(self) -> int:
        """Bytes the LM head reads (and streams, when on the CPU): its table, tied or not."""
        return self.token_table_bytes if self.arch.tie_word_embeddings else self.lm_head_bytes

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.tensor_bytes[n] for n in self.arch.all_tensors())

    # ---- KV and FLOPs -------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes of ONE decoder layer for one token, in the model dtype."""
        return self.arch.kv_bytes_per_token(self.dtype)

    def layer_kv_bytes(self, num_tokens: int) -> int:
        """K and V bytes of one decoder layer holding `num_tokens` tokens (batch x length)."""
        return num_tokens * self.kv_bytes_per_token

    @cached_property
    def layer_matmul_params(self) -> int:
        """Parameters of a decoder layer one token multiplies by (2 FLOPs each): every matrix of a dense layer;
        in a MoE layer the shared ones and num_experts_per_tok experts. The largest over the layers."""
        arch = self.arch

        def active(i: int) -> int:
            dense = sum(_numel(s) for s in arch.layer_tensors(i).values() if len(s) == 2)
            if i not in arch.moe_layers:
                return dense
            expert = sum(_numel(s) for s in arch.expert_tensors(i, 0).values())
            return dense - (arch.num_experts - arch.num_experts_per_tok) * expert
        return max(active(i) for i in range(arch.num_layers))

    @cached_property
    def expert_matmul_params(self) -> int:
        """Parameters of one routed expert (2 FLOPs each per token routed to it); 0 for a dense model."""
        arch = self.arch
        return max((sum(_numel(s) for s in arch.expert_tensors(i, 0).values()) for i in arch.moe_layers), default=0)

    @property
    def attention_flops_per_key(self) -> int:
        """FLOPs of one query token against one cached key: QK^T plus PV, all query heads."""
        return 4 * self.arch.num_heads * self.arch.head_dim

    @property
    def lm_head_flops_per_token(self) -> int:
        """Logits of one position (+ OPT's project_out)."""
        extra = sum(_numel(s) for s in self.arch.final_norm_tensors().values() if len(s) == 2)
        return 2 * (self.arch.vocab_size * self.arch.embed_dim + extra)


def load_spec(name_or_path: str | Path, dtype: str | None = None,
              quantization: Quantization | str | None = None) -> ModelSpec:
    """A checkpoint directory, a .gguf file, a config.json path, a Hub name or a preset name -> ModelSpec (its layers' matrices
    in `quantization`'s layout when given: "int4", "int8-g64", a Quantization).

    Raises ConfigError (a ValueError) with one line naming what is wrong and what would work.
    """
    spec = _load_spec(name_or_path, dtype)
    if isinstance(quantization, str):
        quantization = Quantization.parse(quantization)
    if spec.layouts and (quantization is None or quantization.label == spec.quantization):
        return spec                                       # a GGUF file held packed as it is
    return spec.quantized(quantization)


def _load_spec(name_or_path: str | Path, dtype: str | None) -> ModelSpec:
    if dtype is not None:
        dtype = normalize_dtype(dtype)
    text = str(name_or_path)
    path = Path(text).expanduser()
    hub_name = None if path.exists() or isinstance(name_or_path, Path) else HubName.parse(text)
    if hub_name is not None:
        return _hub_spec(hub_name, dtype)
    if not path.exists():
        path = packaged_gguf(text) or path
    gguf_path = find_gguf(path)
    if gguf_path is not None:    # held packed when its layout allows (gguf_file.py), else dequantized
        model = read_gguf(gguf_path)
        spec = ModelSpec.from_config(model.config, name=gguf_path.stem, dtype=dtype, path=str(gguf_path))
        return spec.with_layouts(model.packed_layouts(spec.arch.packable_tensors()))
    if path.is_dir():
        return ModelSpec.from_checkpoint(path, dtype=dtype)
    if path.is_file():
        return ModelSpec.from_config_file(path, dtype=dtype)
    if isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".json") \
            or text.startswith("."):
        raise ConfigError(f"{text}: no such file or directory (expected a checkpoint directory, a "
                          f".gguf file, a config.json, a Hugging Face Hub name (org/name) or a preset name: "
                          f"offload plan --list-presets)")
    return ModelSpec.from_preset(text, dtype=dtype)


def _hub_spec(name: HubName, dtype: str | None) -> "ModelSpec":
    """A Hub name's spec from the cache when it holds the files, else from the Hub's config.json and safetensors
    headers, or its GGUF file's header (no weights downloaded)."""
    cached = name.cached()
    if cached is not None:
        spec = _load_spec(cached, dtype)
    elif (gguf := name.remote_selection().gguf) is not None:
        with tempfile.TemporaryDirectory(prefix="offload-gguf-header-") as folder:
            header = name.remote_gguf_header(gguf, Path(folder))
            spec = _load_spec(header, dtype)
        return dataclasses.replace(spec, path=f"https://huggingface.co/{name.repo_id}/blob/main/{gguf}")
    else:
        config, headers = name.remote_headers()
        spec = ModelSpec.from_headers(config, headers, name=str(name), path=f"https://huggingface.co/{name}",
                                      dtype=dtype)
    return dataclasses.replace(spec, name=str(name)) if cached is not None and cached.is_dir() else spec


def _read_config(path: Path) -> dict:
    return read_json_object(path, ConfigError, missing="not found (a checkpoint directory needs a config.json)")


def _match_tensors(arch: Architecture, headers: dict[str, TensorInfo], where: Path, skip=()) -> dict:
    found = {}
    for name, shape in arch.all_tensors().items():
        if name in skip:
            continue
        info = headers.get(name)
        if info is None and name.startswith("model."):
            info = headers.get(name[len("model."):])
        if info is None:
            raise ConfigError(f"{where}: checkpoint has no tensor {name!r} that its config.json "
                              f"implies ({len(headers)} tensors found)")
        if info.shape != shape:
            raise ConfigError(f"{where}: tensor {name!r} has shape {list(info.shape)} in "
                              f"{info.file}, config.json implies {list(shape)}")
        if SAFETENSORS_DTYPES[info.dtype][0] is None:
            raise ConfigError(f"{where}: tensor {name!r} is stored as {info.dtype}; supported: "
                              f"BF16, F16, F32")
        found[name] = info
    return found


def _name_of(directory: Path, config_path: Path) -> str:
    name = directory.resolve().name
    return name or config_path.stem


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
