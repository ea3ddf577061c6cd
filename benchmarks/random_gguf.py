"""A random-weight Llama as a GGUF file, written by the `gguf` package as llama.cpp's converter writes one:
what llama.cpp and we both load in benchmarks/cpu_decode.py.

    from random_gguf import build_random_gguf
    path = build_random_gguf(hf_folder, "Q4_0", tokenizer_gguf, workdir)

From a random Hugging Face checkpoint (benchmarks/random_checkpoint.py): the layer matrices in `ggml_type`
(Q4_0, Q8_0, F16, BF16; quantized by the gguf package), q/k rows permuted as llama.cpp's converter does,
norms in F32, the token embedding and the output matrix in F16 (as `llama-quantize --leave-output-tensor`
keeps them; both runtimes then read the same bytes for them). The tokenizer (metadata only) is copied from
`tokenizer_gguf`, whose vocabulary size the config must have. Reused when its `.complete` marker matches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from placement.architecture import Architecture

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.offload.gguf_builders import gguf_name, permute  # noqa: E402  (llama.cpp's converter names, q/k permute)

GGML_TYPES = ("Q4_0", "Q8_0", "F16", "BF16")


def _copy_tokenizer(writer, source: Path, vocab_size: int) -> None:
    import gguf
    reader = gguf.GGUFReader(str(source))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    if len(tokens) != vocab_size:
        raise ValueError(f"{source}: {len(tokens)} tokens, the model has a vocabulary of {vocab_size}")
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)


def build_random_gguf(hf_folder: Path, ggml_type: str, tokenizer_gguf: Path, workdir: str | Path,
                      log=print) -> Path:
    """The GGUF file of the random checkpoint in `hf_folder` with layer matrices in `ggml_type`."""
    import gguf
    if ggml_type not in GGML_TYPES:
        raise ValueError(f"ggml_type must be one of {GGML_TYPES}, got {ggml_type!r}")
    hf_folder = Path(hf_folder)
    path = Path(workdir).expanduser() / f"{hf_folder.name}-{ggml_type}.gguf"
    marker = path.with_suffix(".complete")
    stamp = json.dumps({"source": hf_folder.name, "type": ggml_type, "tokenizer": Path(tokenizer_gguf).name})
    if path.is_file() and marker.is_file() and marker.read_text() == stamp:
        return path
    config = json.loads((hf_folder / "config.json").read_text())
    arch = Architecture.from_config(config)
    log(f"writing {path.name} ({ggml_type}) ...")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(arch.num_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(arch.hidden_size)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(arch.num_heads)
    writer.add_head_count_kv(arch.num_kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_key_length(arch.head_dim)
    writer.add_value_length(arch.head_dim)
    writer.add_rope_dimension_count(arch.head_dim)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_file_type({"Q4_0": 2, "Q8_0": 7, "F16": 1, "BF16": 32}[ggml_type])
    _copy_tokenizer(writer, Path(tokenizer_gguf), arch.vocab_size)
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type)
    for shard in sorted(hf_folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                data = f.get_tensor(name).float().numpy()
                if name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = arch.num_heads if name.endswith("q_proj.weight") else arch.num_kv_heads
                    data = permute(data, heads)
                if data.ndim == 1:
                    writer.add_tensor(gguf_name(name), data.astype(np.float32))
                elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                    writer.add_tensor(gguf_name(name), data.astype(np.float16))
                else:
                    writer.add_tensor(gguf_name(name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    marker.write_text(stamp)
    return path
