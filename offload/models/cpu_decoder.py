"""Decode steps of a llama-like layer computed on the CPU as one fused Numba call (cpu_kernels'
`decode_layer`) instead of ~40 eager torch ops: a layer's per-token cost on the CPU becomes its weight reads,
not Python dispatch.

Used by the engine for a decode step (one token per row, at most CPU_DECODE_MAX_ROWS rows) or a speculative
decoding pass (a few tokens a row, a chain or one row's token tree, at most MAX_VERIFY_TOKENS in all) of a
layer whose weights, hidden states and KV cache are all in CPU memory: the layers a plan computes on the CPU,
and every layer on the CPU fallback. It covers `DecoderModel` itself (Llama, Mistral, Qwen2: RMSNorm, full-width RoPE, SiLU
MLP, optional biases, sliding windows); other families and everything else take the eager path. It
computes what the eager math computes with HostAttention (rounding to the model dtype at the same points; a
float32 model's 4/8-bit matrices on more than 8 rows, which the eager path multiplies with torch's GEMM on
dequantized chunks, take the packed kernel here: the same float32 values up to summation order);
against TorchAttention in bf16/f16 (the CPU fallback's cache) it attends in float32 where SDPA rounds its
probabilities to the model dtype.
"""
from __future__ import annotations

import numba
import numpy as np
import torch

from cpu_kernels._checks import cache_view
from cpu_kernels._decoder_kernel import BF16, F16, F32, decode_layer
from cpu_kernels._append_kernel import COPY, TO_BF16, TO_F16
from cpu_kernels._attention_kernel import NO_DEPTH, NO_TREE, tile_queries
from cpu_kernels.linear import BLOCKS_PER_THREAD, _run
from offload.attention.device import TorchAttention
from offload.attention.host import HostAttention
from offload.models.decoder import DecoderModel
from offload.weights.quant import QuantizedWeight
from placement.cost import CPU_DECODE_MAX_ROWS
from placement.workspace import MAX_VERIFY_TOKENS

MODES = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16}
APPEND_MODES = {torch.float32: COPY, torch.bfloat16: TO_BF16, torch.float16: TO_F16}
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_UNUSED = np.zeros((1, 1), np.float32)
_NO_BIAS = np.zeros(0, np.float32)


class CpuDecoderSteps:
    """The fused decode step for one model's layers; prepared arrays (numpy views) are made once per layer."""

    def __init__(self, model: DecoderModel, dtype: torch.dtype):
        self.model, self.arch, self.dtype, self.mode = model, model.arch, dtype, MODES[dtype]
        self._layers: dict[int, tuple] = {}        # layer -> (its weight objects, prepared arguments)
        self._caches: dict[int, tuple] = {}        # id(backend) -> (backend, cache views)
        self._step: tuple | None = None            # (ctx, chunk, cos, sin, positions, blocks) of the step
        self._last: tuple | None = None            # (the last step's result, the array it views)

    @staticmethod
    def supports(model, dtype: torch.dtype) -> bool:
        """True for a DecoderModel (not a subclass: those change the math) with SiLU, in a float dtype."""
        return type(model) is DecoderModel and model.arch.hidden_act in ("silu", "swish") and dtype in MODES

    def step(self, layer: int, lw: dict, h: torch.Tensor, ctx, backend, chunk) -> torch.Tensor | None:
        """Layer `layer`'s decode step on the CPU: h [B, T, H] -> [B, T, H] (its KV appended and attended; T = 1,
        or a verification pass's T tokens a row, a tree's in `chunk`), or None when this step is not one the
        fused kernel covers (the caller runs the eager math)."""
        B, T, H = h.shape
        if (B > CPU_DECODE_MAX_ROWS if T == 1 else B * T > MAX_VERIFY_TOKENS) or h.device.type != "cpu" \
                or h.dtype != self.dtype:
            return None
        caches = self._cache_views(backend)
        if caches is None or B > backend.max_batch_size or chunk.num_keys > backend.max_seq_len:
            return None                          # (the kernels index the caches unchecked)
        prepared = self._prepared(layer, lw)
        if prepared is None:
            return None
        cos, sin, positions, tree, depth, blocks = self._step_arrays(ctx, chunk)
        if cos.shape != (B * T, self.arch.head_dim):
            return None                                    # partial rotary: the eager path
        arch = self.arch
        x = self._input_bits(h)
        out = np.empty((B * T, H), np.float32 if self.dtype == torch.float32 else np.uint16)   # the result's bits
        result = torch.from_numpy(out).view(self.dtype).view(B, T, H)
        k_append, v_append, k_cache, v_cache, append_mode, scale, window = caches
        _run(decode_layer, x, *prepared, cos, sin, arch.num_heads, arch.num_kv_heads, arch.head_dim,
             k_append, v_append, append_mode, k_cache, v_cache, positions, T, tree, depth,
             tile_queries(T, arch.num_heads // arch.num_kv_heads), scale, window, self.mode, blocks, out)
        self._last = (result, out)
        return result

    def _input_bits(self, h: torch.Tensor) -> np.ndarray:
        """h [B, T, H] as decode_layer reads it ([B * T, H]: float32, or the bits of bfloat16 as uint16 / float16
        as int16), no copy: the previous step's own array when h is its result (the next layer's input, most
        steps: deriving a view from the tensor again cost ~50 us in a decode, its caches cold)."""
        if self._last is not None and h is self._last[0]:
            bits = self._last[1]
            return bits.view(np.int16) if self.dtype == torch.float16 else bits
        B, T, H = h.shape
        return cache_view(h.reshape(B * T, H).contiguous(), fp16_as_int16=True)

    def close(self) -> None:
        """Drop the prepared views (they keep the weights' and caches' memory alive)."""
        self._layers, self._caches, self._step, self._last = {}, {}, None, None

    def _step_arrays(self, ctx, chunk) -> tuple:
        """(cos, sin [B * T, D] f32, positions [B] int64, tree [T, T] uint8, depth [T] int64 (a chain: [0, 0], [0]),
        blocks) of the current step, made once for all its layers (ctx: its (cos, sin) [B, 1, T, R] in the dtype
        and chunk, one of each per step)."""
        if self._step is None or self._step[0] is not ctx or self._step[1] is not chunk:
            cos, sin = ctx
            tree, depth = NO_TREE, NO_DEPTH
            if chunk.ancestors is not None:
                tree = chunk.ancestors.numpy().astype(np.uint8)
                depth = tree.sum(axis=1).astype(np.int64) - 1
            self._step = (ctx, chunk, cos[:, 0].reshape(-1, cos.shape[-1]).to(torch.float32).cpu().numpy(),
                          sin[:, 0].reshape(-1, sin.shape[-1]).to(torch.float32).cpu().numpy(),
                          np.ascontiguousarray(chunk.start.numpy(), dtype=np.int64),     # a view: start is int64
                          tree, depth, numba.get_num_threads() * BLOCKS_PER_THREAD)
        return self._step[2:]

    def _cache_views(self, backend):
        entry = self._caches.get(id(backend))
        if entry is not None and entry[0] is backend:
            return entry[1]
        views = None
        arch = self.arch
        if isinstance(backend, (HostAttention, TorchAttention)) and backend.softcap is None \
                and all(c.device.type == "cpu" and c.is_contiguous() and c.dtype in APPEND_MODES
                        and c.shape[1] == arch.num_kv_heads and c.shape[3] == arch.head_dim
                        for c in (backend.k_cache, backend.v_cache)):
            k, v = backend.k_cache, backend.v_cache
            scale = backend.scale if backend.scale is not None else self.arch.head_dim ** -0.5
            views = (cache_view(k, fp16_as_int16=False), cache_view(v, fp16_as_int16=False),
                     cache_view(k, fp16_as_int16=True), cache_view(v, fp16_as_int16=True),
                     APPEND_MODES[k.dtype], float(scale), int(backend.sliding_window or 0))
        self._caches[id(backend)] = (backend, views)
        return views

    def _prepared(self, layer: int, lw: dict):
        weights = tuple(lw.get(f"{name}.weight") for name in MATRICES)
        entry = self._layers.get(layer)
        if entry is not None and all(a is b for a, b in zip(entry[0], weights)):
            return entry[1]
        prepared = None
        if all(_on_cpu(w) for w in weights):
            matrices = tuple(_matrix(w, lw.get(f"{name}.bias")) for name, w in zip(MATRICES, weights))
            norms = tuple(lw[name].to(torch.float32).numpy() for name in
                          ("input_layernorm.weight", "post_attention_layernorm.weight"))
            prepared = (*norms, float(self.arch.rms_norm_eps), *matrices)
        self._layers[layer] = (weights, prepared)
        return prepared


def _on_cpu(weight) -> bool:
    if isinstance(weight, QuantizedWeight):
        return weight.qweight.device.type == "cpu"
    return isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.is_contiguous() \
        and weight.dtype in MODES


def _matrix(weight, bias) -> tuple:
    """(codes, scales, mins, min_factor, bias) as decode_layer takes a matrix."""
    bias_np = _NO_BIAS if bias is None else bias.to(torch.float32).numpy()
    if isinstance(weight, QuantizedWeight):
        matrix = weight.cpu_matrix()
        return matrix.codes, matrix.scales, matrix.mins, matrix.min_factor, bias_np
    return cache_view(weight, fp16_as_int16=True), _UNUSED, _UNUSED, 0.0, bias_np
