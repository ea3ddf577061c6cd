"""compressed-tensors `pack-quantized` checkpoints (what llm-compressor writes and vLLM serves): which matrices
they hold packed and in which of our layouts (placement/quantization.py). Torch-free: config.json's
`quantization_config` and the safetensors headers.

A quantized Linear "X" is stored as the `compressed-tensors` package packs it:

    X.weight_packed      int32 [out, in * bits / 32]   32 / bits codes a word, code j of a row at bit j * bits
                                                        (little-endian), stored + 2^(bits-1)
    X.weight_scale       float [out, groups]            w = (q - zp) * scale, q in -2^(bits-1) .. 2^(bits-1) - 1
    X.weight_zero_point  int32 [out * bits / 32, groups]   asymmetric only; zp packed the same way along out
    X.weight_shape       int   [2]

4 and 8 bits, group or channel strategy (channel: one group of `in`), symmetric or not, weights only. They
convert code for code into our layouts (offload/loading/compressed_checkpoint.py): 4-bit -> int4 (the
packed words viewed as bytes are our qweight, code q + 8; min = -(8 + zp) * scale), 8-bit -> int8 (code q;
asymmetric: int8-asym, min = -zp * scale). code * scale + min is (q - zp) * scale rounded twice instead of
once: exact for 16-bit scales in a float32 model, else within a unit in the last place of the model dtype.
"""
from __future__ import annotations

from .config_fields import ConfigError
from .quantization import Quantization

METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
PACKED, SCALE, ZERO_POINT, SHAPE = "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"
BITS = (4, 8)
STRATEGIES = ("group", "channel")


def quantization_config(config: dict) -> dict | None:
    """config.json's compressed-tensors `quantization_config`, or None for any other checkpoint."""
    qc = config.get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == METHOD else None


def check_config(qc: dict, where) -> None:
    """ConfigError naming `where` for a compressed-tensors config this library does not run."""
    groups = qc.get("config_groups") or {}
    formats = {qc.get("format")} | {g.get("format") for g in groups.values() if g.get("format")}
    if formats - {FORMAT}:
        raise ConfigError(f"{where}: compressed-tensors format {sorted(formats - {FORMAT}, key=str)[0]!r} is not "
                          f"supported; supported: {FORMAT} (4/8-bit integer weights)")
    for name, group in groups.items():
        weights = group.get("weights") or {}
        problem = (f"{weights.get('type')} weights" if weights.get("type") != "int" else
                   f"{weights.get('num_bits')}-bit weights" if weights.get("num_bits") not in BITS else
                   f"strategy {weights.get('strategy')!r}" if weights.get("strategy") not in STRATEGIES else
                   f"activation ordering {weights.get('actorder')!r}" if weights.get("actorder") in (True, "group") else
                   "quantized activations" if group.get("input_activations") else None)
        if problem:
            raise ConfigError(f"{where}: compressed-tensors group {name!r} has {problem}; supported: int "
                              f"weights of {' or '.join(map(str, BITS))} bits, strategy {' or '.join(STRATEGIES)}, "
                              "no quantized activations")


def packed_matrices(config: dict, shapes: dict, headers: dict, where) -> dict[str, Quantization]:
    """Every tensor of `shapes` (name -> shape) that the checkpoint stores packed -> our layout for it, from
    the headers (name -> TensorInfo); {} for a checkpoint that is not compressed-tensors. ConfigError naming
    `where` for an unsupported config or inconsistent shapes."""
    qc = quantization_config(config)
    if qc is None:
        return {}
    check_config(qc, where)
    weights = [group.get("weights") or {} for group in (qc.get("config_groups") or {}).values()]
    group_sizes = {w.get("group_size") for w in weights if w.get("strategy") == "group"}
    per_channel = any(w.get("strategy") == "channel" for w in weights)
    configured_bits = {w.get("num_bits") for w in weights} & set(BITS)
    layouts = {}
    for name, shape in shapes.items():
        base = name[:-len("weight")] if name.endswith(".weight") else None
        packed = headers.get(f"{base}{PACKED}") if base and name not in headers else None
        if packed is None:
            continue
        out, inputs = shape
        scale = headers.get(f"{base}{SCALE}")
        fitting = [b for b in sorted(configured_bits or BITS) if packed.shape == (out, -(-inputs * b // 32))]
        if packed.dtype != "I32" or not fitting:
            raise ConfigError(f"{where}: {base}{PACKED} has shape {list(packed.shape)} ({packed.dtype}), not "
                              f"the int32 [{out}, {inputs} * bits / 32] of a 4- or 8-bit {list(shape)} matrix")
        bits = fitting[0]
        if f"{base}weight_g_idx" in headers:
            raise ConfigError(f"{where}: {base}weight_g_idx: activation-ordered (g_idx) weights are not supported")
        if scale is None or len(scale.shape) != 2 or scale.shape[0] != out or inputs % scale.shape[1]:
            raise ConfigError(f"{where}: {base}{SCALE} has shape {list(scale.shape) if scale else 'none'}; "
                              f"expected [{out}, groups] with groups dividing {inputs}")
        group = inputs // scale.shape[1]
        zero_point = headers.get(f"{base}{ZERO_POINT}")
        if zero_point is not None and (zero_point.dtype != "I32" or
                                       zero_point.shape != (-(-out * bits // 32), scale.shape[1])):
            raise ConfigError(f"{where}: {base}{ZERO_POINT} has shape {list(zero_point.shape)} ({zero_point.dtype}); "
                              f"expected int32 [{-(-out * bits // 32)}, {scale.shape[1]}] (packed along the outputs)")
        if group not in group_sizes and not (per_channel and group == inputs):
            raise ConfigError(f"{where}: {base}{SCALE} has shape {list(scale.shape)} (groups of {group} inputs); "
                              f"its quantization_config says {'channel' if per_channel else ''}"
                              f"{' or ' if per_channel and group_sizes else ''}"
                              f"{'group_size ' + ', '.join(map(str, sorted(group_sizes))) if group_sizes else ''}")
        asymmetric = zero_point is not None
        scheme = ("int4" if asymmetric else "int4-sym") if bits == 4 else "int8-asym" if asymmetric else "int8"
        layouts[name] = Quantization(scheme=scheme, group_size=group)
    return layouts
