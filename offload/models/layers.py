"""Building blocks shared by every family: norms, linear layers, activations, MLPs.

Each one reproduces the numerics of the corresponding transformers module (same order of operations and
the same float32 upcasts), so that float32 logits match to rounding and bf16 behaves the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpu_kernels import DENSE_MAX_ROWS, PACKED_MAX_ROWS, dense_linear_rows, native_half_gemm, wide_linear
from offload.weights.quant import QuantizedWeight
from placement.cost import CPU_DECODE_MAX_ROWS
from placement.workspace import dequant_rows

ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
               "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [..., in], weight: [out, in] (dense, or packed: dequantized here, next to its matmul) -> [..., out]
    rows = x.numel() // max(x.shape[-1], 1)
    on_cpu = x.device.type == "cpu" and weight.device.type == "cpu"
    if isinstance(weight, QuantizedWeight):
        if on_cpu:
            # a few rows: the packed codes read once (cpu_kernels), a 16-bit model's activations as integers
            # there; more (prefill): torch's float32 GEMM on chunks dequantized to float32
            integer = x.dtype != torch.float32
            x2 = x.reshape(rows, -1).to(torch.float32)
            matrix = weight.cpu_matrix()
            out = matrix(x2, integer) if rows <= PACKED_MAX_ROWS[integer] else wide_linear(x2, matrix)
            out = out.to(x.dtype).view(*x.shape[:-1], -1)
            return out if bias is None else out + bias
        rows_at_a_time = dequant_rows(weight.shape)
        if rows_at_a_time < weight.shape[0]:
            return dequantized_linear(x, weight, bias, rows_at_a_time)
        weight = weight.dequantize(x.dtype)
    elif on_cpu and weight.dtype == x.dtype and weight.is_contiguous():
        # dense: a dot per output summed in float32, rounded once with the bias (as torch's addmm): faster
        # than torch's GEMV on a few rows, and on more of them in 16 bits where torch's 16-bit GEMM is an
        # emulation (AVX2), which widening to float32 for its float32 GEMM also beats past those
        half = x.dtype != torch.float32 and not native_half_gemm(x.dtype)
        if rows <= CPU_DECODE_MAX_ROWS or half:
            x2 = x.reshape(rows, -1).to(torch.float32)
            out = dense_linear_rows(x2, weight) if rows <= DENSE_MAX_ROWS else wide_linear(x2, weight)
            out = out if bias is None else out + bias.to(torch.float32)
            return out.to(x.dtype).view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


def dequantized_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None,
                       rows_at_a_time: int) -> torch.Tensor:
    # x: [..., in] -> [..., out]: the packed matrix dequantized `rows_at_a_time` rows at a time next to their
    # matmul, each chunk's product written into the output (what the plan's workspace holds of a large one)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for r in range(0, weight.shape[0], rows_at_a_time):
        rows = slice(r, r + rows_at_a_time)
        out[..., rows] = F.linear(x, weight.rows(rows).dequantize(x.dtype), None if bias is None else bias[rows])
    return out


def embedding(input_ids: torch.Tensor, table: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    # input_ids: [B, T] -> [B, T, E]: rows of the table (a packed one gathered packed, only they dequantized)
    if isinstance(table, QuantizedWeight):
        return table.rows(input_ids.reshape(-1)).dequantize().view(*input_ids.shape, -1)
    return F.embedding(input_ids, table)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm: normalise in float32, cast back, then scale (in that order, as transformers)."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm: normalise and scale by (1 + weight) in float32, then cast back (transformers' order)."""
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (1.0 + weight.to(torch.float32))).to(x.dtype)


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's logit soft-capping); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


GATED_NAMES = ("gate_proj", "up_proj", "down_proj")


def gated_mlp(x: torch.Tensor, w: dict, prefix: str, act, names: tuple[str, str, str] = GATED_NAMES) -> torch.Tensor:
    """SwiGLU: down(act(gate(x)) * up(x)); biases when the checkpoint has them (llama mlp_bias). `names`: the
    gate, up and down matrices under `prefix` (Mixtral's experts: w1, w3, w2)."""
    gate, up, down = (f"{prefix}{name}" for name in names)
    g = linear(x, w[f"{gate}.weight"], w.get(f"{gate}.bias"))
    u = linear(x, w[f"{up}.weight"], w.get(f"{up}.bias"))
    return linear(act(g) * u, w[f"{down}.weight"], w.get(f"{down}.bias"))


def plain_mlp(x: torch.Tensor, w: dict, act) -> torch.Tensor:
    """OPT: fc2(act(fc1(x)))."""
    return linear(act(linear(x, w["fc1.weight"], w.get("fc1.bias"))), w["fc2.weight"], w.get("fc2.bias"))


def split_heads(x: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    # x: [B, T, Hx*D] -> [B, Hx, T, D] (Hx: the q or the kv heads)
    B, T, _ = x.shape
    return x.view(B, T, num_heads, head_dim).transpose(1, 2)


def qkv_heads(x: torch.Tensor, lw: dict, num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """The q, k, v projections (biases when the checkpoint has them), split into heads:
    x [B, T, H] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]."""
    return tuple(split_heads(linear(x, lw[f"self_attn.{name}_proj.weight"], lw.get(f"self_attn.{name}_proj.bias")),
                             heads, head_dim)
                 for name, heads in (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads)))


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    # x: [B, Hq, T, D] -> [B, T, Hq*D]
    B, Hq, T, D = x.shape
    return x.transpose(1, 2).reshape(B, T, Hq * D)
