"""Mixture-of-experts math: Mixtral, Qwen2-MoE and Qwen3-MoE (their tensor tables: placement/families/moe.py).

Attention is their dense siblings' (Mistral's, Qwen2's, Qwen3's); the MLP of a MoE layer routes each token to
`num_experts_per_tok` experts, exactly as transformers does: router logits in the model dtype (F.linear, as
transformers computes them), softmax in float32, top-k, the chosen weights renormalised when the family does
(Mixtral always, Qwen when `norm_topk_prob`); each hit expert (ascending) computes its tokens' gated MLP,
scaled by their weights (float32 for Mixtral, rounded to the model dtype first for Qwen) and added into the
output (experts streamed on demand are copied to the device once routed: ROUTED_EXPERTS; experts the CPU computes
for a GPU take the routed rows through pinned staging, HOST_STAGING). Qwen2-MoE adds a shared expert scaled by
sigmoid(shared_expert_gate(x)), on the GPU while the CPU computes the routed experts. A layer without a router
(Qwen's `mlp_only_layers`, `decoder_sparse_step`) is a plain gated MLP.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cpu_kernels import gated_experts
from offload.models.decoder import DecoderModel
from offload.models.layers import gated_mlp, linear
from offload.models.qwen3 import Qwen3Model
from offload.weights.quant import QuantizedWeight
from offload.weights.source import HOST_STAGING, ROUTED_EXPERTS
from placement.cost import CPU_DECODE_MAX_ROWS


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, E] (model dtype) -> (weights [N, k] float32, experts [N, k] int64), transformers' order of
    operations: softmax in float32, top-k (ties as torch.topk breaks them), optional renormalisation."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def routed_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, lw: dict, prefix: str,
                   names: tuple[str, str, str], act) -> torch.Tensor:
    """sum over each token's chosen experts of weight * expert(x): x [N, H], weights [N, k] (float32 or the
    model dtype), experts [N, k] -> [N, H] in x's dtype, on x's device. Expert e's gated MLP is
    `{prefix}{e}.{name}` in lw; the experts are computed where their weights lie (experts kept on the CPU:
    only the N rows, their weights and choices cross, and the result comes back)."""
    assert x.dim() == 2 and weights.shape == experts.shape and experts.shape[0] == x.shape[0], \
        (x.shape, weights.shape, experts.shape)
    home = next(value for key, value in lw.items() if key.startswith(prefix)).device   # (no sync on the routing)
    if home != x.device:
        out = routed_experts(x.to(home), weights.to(home), experts.to(home), lw, prefix, names, act)
        return out.to(x.device)
    if x.device.type == "cpu" and x.shape[0] <= CPU_DECODE_MAX_ROWS:
        out = _cpu_experts(x, weights, experts, lw, prefix, names, act)
        if out is not None:
            return out
    hit = torch.unique(experts)
    out = torch.zeros_like(x)
    for expert in hit.tolist():                                # ascending, as transformers adds them
        token, slot = torch.where(experts == expert)          # token: [n] rows routed to `expert`
        y = gated_mlp(x[token], lw, f"{prefix}{expert}.", act, names)   # [n, H]
        out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
    return out


def _cpu_experts(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, lw: dict, prefix: str,
                 names: tuple[str, str, str], act) -> torch.Tensor | None:
    """routed_experts for a few rows on the CPU in one call (cpu_kernels.gated_experts: every hit expert's gate
    and up in one parallel loop, the matrices read once whatever the rows, then each one's down projection of
    its own rows, rows not routed to it weighing 0, and the weighted sum). The same roundings as the
    expert-by-expert path (each product rounded to the model dtype where `linear` rounds it, the experts added
    in ascending order). None when the activation is not SiLU or the experts are not all packed alike per
    projection or all dense in x's dtype (the kernel's ValueError). Plain Python on the few routing values:
    a decode step calls it once per MoE layer, and torch ops on tensors this small cost more than the lists."""
    if act is not F.silu:
        return None
    chosen, scales = experts.tolist(), weights.float().tolist()                        # [N][k] each
    hit = sorted({e for row in chosen for e in row})                                   # ascending
    matrices = [lw[f"{prefix}{e}.{name}.weight"] for e in hit for name in names]       # [3h]
    if isinstance(matrices[0], QuantizedWeight):
        if not all(type(m) is QuantizedWeight for m in matrices):     # (on the CPU: routed_experts' home)
            return None
        matrices = [m.cpu_matrix() for m in matrices]
    elif getattr(matrices[0], "dtype", None) != x.dtype or f"{prefix}{hit[0]}.{names[0]}.bias" in lw:
        return None
    # each row's weight for each hit expert (0: not routed to it), in float32 (the values of `weights`' dtype)
    slot = {e: j for j, e in enumerate(hit)}
    share = torch.zeros((len(hit), x.shape[0]), dtype=torch.float32)                  # [h, N]
    table = share.numpy()
    for n, (row, row_scales) in enumerate(zip(chosen, scales)):
        for e, w in zip(row, row_scales):
            table[slot[e], n] = w
    trios = [tuple(matrices[3 * j:3 * j + 3]) for j in range(len(hit))]
    try:   # as `linear` multiplies packed matrices: a 16-bit model's activations as integers
        out = gated_experts(x.float(), trios, share, x.dtype, integer=x.dtype != torch.float32)
    except ValueError:                                      # not one layout per projection, or not x's dtype
        return None
    return out.to(x.dtype)                                  # [N, H]


class MoeMlp:
    """The MLP of a MoE family: routed experts where the layer has a router, a gated MLP where it is dense.
    Subclasses set the names of their sparse block and experts."""

    block = "mlp."                                       # the sparse block's prefix in a layer
    expert_names = ("gate_proj", "up_proj", "down_proj")
    weights_in_float32 = False                           # Mixtral scales by float32 weights, Qwen rounds them first

    def mlp(self, lw: dict, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H] (normed) -> [B, T, H], before the residual."""
        router = lw.get(f"{self.block}gate.weight")
        if router is None:
            return gated_mlp(x, lw, "mlp.", self.act)
        B, T, H = x.shape
        x2 = x.reshape(B * T, H)
        a = self.arch
        weights, experts = route(F.linear(x2, router), a.num_experts_per_tok, a.options["norm_topk_prob"])
        if not self.weights_in_float32:
            weights = weights.to(x.dtype)
        fetch = lw.get(ROUTED_EXPERTS)
        if fetch is not None:                       # streamed on demand: copy the routed experts now
            lw = {**lw, **fetch(torch.unique(experts).tolist())}
        prefix = f"{self.block}experts."
        staging = lw.get(HOST_STAGING)
        if staging is not None and x2.device.type != "cpu":
            # computed on the host: the routed rows cross through pinned staging, and the GPU computes the
            # shared expert while the CPU computes the routed ones (its kernels are queued before the host waits)
            sent, copied = staging.send({"experts.x": (x2, x2.dtype), "experts.weights": (weights, weights.dtype),
                                         "experts.chosen": (experts, experts.dtype)})
            shared = self._shared_expert(lw, x2)
            staging.wait(copied)
            out = routed_experts(sent["experts.x"], sent["experts.weights"], sent["experts.chosen"], lw, prefix,
                                 self.expert_names, self.act)
            out = staging.to_device(out, x2.dtype)                                          # [N, H]
        else:
            out = routed_experts(x2, weights, experts, lw, prefix, self.expert_names, self.act)
            shared = self._shared_expert(lw, x2)
        return (out if shared is None else out + shared).view(B, T, H)

    def _shared_expert(self, lw: dict, x2: torch.Tensor) -> torch.Tensor | None:
        """Qwen2-MoE's shared expert scaled by its sigmoid gate, x2 [N, H] -> [N, H]; None without one."""
        if not self.arch.options["shared_expert_size"]:
            return None
        shared = gated_mlp(x2, lw, f"{self.block}shared_expert.", self.act)                  # [N, H]
        return torch.sigmoid(linear(x2, lw[f"{self.block}shared_expert_gate.weight"])) * shared


class MixtralModel(MoeMlp, DecoderModel):
    """Mixtral: Mistral's attention, eight experts w1/w3/w2 under block_sparse_moe."""

    block = "block_sparse_moe."
    expert_names = ("w1", "w3", "w2")
    weights_in_float32 = True


class Qwen2MoeModel(MoeMlp, DecoderModel):
    """Qwen2-MoE: Qwen2's attention (q/k/v biases), routed experts plus a gated shared expert."""


class Qwen3MoeModel(MoeMlp, Qwen3Model):
    """Qwen3-MoE: Qwen3's attention (q/k norms), routed experts."""
