"""Mixture-of-experts decode, side by side in one run, on a scaled-down Qwen3-30B-A3B shape with random weights
(its expert shape and routing, 128 experts top-8, head_dim 128; fewer layers and a narrower model): decode
tokens/s with the routed experts computed on the CPU (experts="cpu"), streamed on demand (experts="streamed": the
routed ones copied each step), streamed with their layers (every layer through the ring), all on one device, and
transformers on the same checkpoint; the planner's prediction for
each against the measurement; and the CPU expert computation's GB/s against the measured memory read
bandwidth (what it reads: the 8 routed experts' matrices of one token), as the model runs it and, for the
kernel alone, at Qwen3-30B-A3B's own (twice as wide) expert shape.

    python benchmarks/moe_decode.py            # bf16 and int4
    python benchmarks/moe_decode.py --quick    # a tiny model, 4 tokens: that it runs

Without CUDA the "gpu" tier is the CPU (the script says so): the rows then compare the paths' overheads on one
memory, not PCIe against RAM. Decode tokens/s: greedy, batch 1, N - 1 tokens over the time from the first new
token to the N-th (prefill left out), the fastest of the repeats, ours and transformers interleaved.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_decode import decode_parser, decode_rates, ours, transformers_peer  # noqa: E402
from random_checkpoint import build_random_checkpoint, read_config  # noqa: E402

from cpu_kernels.speed import read_bandwidth  # noqa: E402
from offload.models.moe import routed_experts  # noqa: E402
from offload.models.layers import ACTIVATIONS  # noqa: E402

# Qwen3-30B-A3B's experts (128 of hidden x 768, top-8, renormalised) and attention (32 q / 4 kv heads of 128) at
# half the width, 8 of its 48 layers: 1.4B parameters, 0.13B active per token
SCALED = dict(read_config("qwen3-30b-a3b"), hidden_size=1024, moe_intermediate_size=384, intermediate_size=3072,
              num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=2, vocab_size=32000,
              max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
QUICK = dict(SCALED, hidden_size=128, moe_intermediate_size=64, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=16, num_experts_per_tok=4,
             vocab_size=512)
BUDGET = dict(gpu_memory="64GiB", cpu_memory="64GiB")     # the planner on the CPU stand-in: it predicts


def expert_rate(model, repeats: int) -> tuple[float, int]:
    """(GB/s, bytes) of the CPU computing one token's routed experts as the model holds them, k at a time:
    experts 0..k-1 of layer 0, then k..2k-1, ... round every expert of every layer (so that they come from RAM,
    not from the 100s of MB of L3 a server CPU may have)."""
    arch = model.arch
    layers = [model.engine.weights.host_tensors(("experts", i)) for i in arch.moe_layers]
    x = torch.randn(1, arch.hidden_size).to(model.engine.dtype)
    act = ACTIVATIONS[arch.hidden_act]
    names = ("gate_proj", "up_proj", "down_proj")
    k, E = arch.num_experts_per_tok, arch.num_experts
    sets = [torch.tensor([[(k * r + j) % E for j in range(k)]]) for r in range(max(1, E // k))]
    weights = torch.full((1, k), 1.0 / k).to(x.dtype)
    num_bytes = sum(_bytes(layers[0][f"mlp.experts.{e}.{n}.weight"]) for e in range(k) for n in names)
    calls = [(lw, experts) for lw in layers for experts in sets]
    for lw, experts in calls[:len(sets)]:                                                    # warm-up
        routed_experts(x, weights, experts, lw, "mlp.experts.", names, act)
    best = float("inf")
    for r in range(repeats * len(calls)):
        lw, experts = calls[r % len(calls)]
        start = time.perf_counter()
        routed_experts(x, weights, experts, lw, "mlp.experts.", names, act)
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9, num_bytes


def kernel_rate(scheme: str, hidden: int, inner: int, top_k: int, working_set: int, repeats: int) -> float:
    """GB/s of cpu_kernels.gated_experts alone on one bf16 token's `top_k` experts of shape hidden x inner (gate,
    up [inner, hidden], down [hidden, inner]; random values, bf16 or int4 with group 128 as quantize="int4"
    holds them), k at a time round enough distinct experts to fill `working_set` bytes (read from RAM)."""
    from cpu_kernels import PackedMatrix, gated_experts

    def matrix(rows, cols):
        if scheme == "bf16":
            return torch.randn(rows, cols).to(torch.bfloat16)
        scales = (torch.rand(rows, cols // 128) * 0.01).to(torch.bfloat16)
        return PackedMatrix.of(torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8), scales, -8 * scales)

    def size(m) -> int:
        return m.numel() * 2 if scheme == "bf16" else m.codes.nbytes + m.scales.nbytes + m.mins.nbytes

    first = (matrix(inner, hidden), matrix(inner, hidden), matrix(hidden, inner))
    per_expert = sum(map(size, first))
    experts = [first] + [(matrix(inner, hidden), matrix(inner, hidden), matrix(hidden, inner))
                         for _ in range(max(top_k, working_set // per_expert) - 1)]
    calls = [experts[i:i + top_k] for i in range(0, len(experts) - top_k + 1, top_k)]
    x, share = torch.randn(1, hidden).bfloat16().float(), torch.full((top_k, 1), 1.0 / top_k)
    gated_experts(x, calls[0], share, torch.bfloat16, integer=True)                       # compile, warm up
    best = float("inf")
    for r in range(repeats * len(calls)):
        start = time.perf_counter()
        gated_experts(x, calls[r % len(calls)], share, torch.bfloat16, integer=True)
        best = min(best, time.perf_counter() - start)
    return top_k * per_expert / best / 1e9


def _bytes(weight) -> int:
    parts = [weight] if isinstance(weight, torch.Tensor) else [weight.qweight, weight.scales] + \
        ([weight.mins] if weight.mins is not None else [])
    return sum(p.numel() * p.element_size() for p in parts)


def main(argv=None) -> None:
    args = decode_parser(__doc__, "a tiny model, 4 new tokens, 1 repeat, bf16 only", 24).parse_args(argv)
    config = QUICK if args.quick else SCALED
    if args.quick:
        args.new_tokens, args.repeats = 4, 1
    threads = torch.get_num_threads()
    bandwidth = read_bandwidth(threads, num_bytes=(64 << 20) if args.quick else (1 << 30))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = build_random_checkpoint(config, "bfloat16", args.workdir, label="qwen3-moe-scaled", log=lambda *_: None)
    print(f"moe_decode: {path.name}: {config['num_hidden_layers']} layers, {config['num_experts']} experts top-"
          f"{config['num_experts_per_tok']}, hidden {config['hidden_size']}, expert {config['moe_intermediate_size']}; "
          f"batch 1, {args.new_tokens} new tokens, best of {args.repeats}; torch {torch.__version__}, {threads} "
          f"threads; memory read bandwidth {bandwidth:.1f} GB/s (measured)")
    if device == "cpu":
        print("no CUDA: the 'gpu' tier is the CPU (a stand-in); rows compare the paths on one memory, not PCIe")
    header = f"{'weights':<9}{'experts':<34}{'ours tok/s':>11}{'predicted':>11}{'meas/pred':>10}{'transformers':>14}"
    print(header + "\n" + "-" * len(header))
    prompt = list(range(10, 42))
    schemes = ["bf16"] if args.quick else ["bf16", "int4"]
    rates_at = {}
    for scheme in schemes:
        quantize = {} if scheme == "bf16" else {"quantize": scheme}
        rows = [("on the CPU (experts='cpu')", dict(experts="cpu", **BUDGET)),
                ("streamed on demand ('streamed')", dict(experts="streamed", **BUDGET)),
                ("streamed with layers (all streamed)", dict(experts="gpu", gpu_layers=0, **BUDGET)),
                ("all on one device", dict(experts="gpu", **BUDGET))]
        for label, kwargs in rows:
            model, timer = ours(path, dtype="bfloat16", **quantize, **kwargs)
            timers = {"ours": timer}
            hf = None
            if scheme == "bf16" and kwargs.get("gpu_layers") is None and kwargs["experts"] == "gpu":
                hf, timers["transformers"] = transformers_peer(path, torch.bfloat16)
            rates = decode_rates(timers, prompt, args.new_tokens, args.repeats)
            predicted = model.plan.predicted.decode_tokens_per_s
            print(f"{scheme:<9}{label:<34}{rates['ours']:>11.2f}{predicted:>11.2f}"
                  f"{rates['ours'] / predicted:>10.2f}"
                  f"{rates.get('transformers', float('nan')):>14.2f}")
            if kwargs["experts"] == "cpu":
                rates_at[scheme] = expert_rate(model, args.repeats)
            del model, hf
    print("predicted: the cost model's decode tokens/s for this plan on this machine (its default CPU speeds); "
          "transformers: the same checkpoint, bf16, its own generate")
    print(f"\nCPU experts of one token ({config['num_experts_per_tok']} experts at a time round all "
          f"{config['num_experts']} of every layer, as held): GB/s and share of the measured read bandwidth")
    for scheme, (rate, num_bytes) in rates_at.items():
        print(f"  {scheme:<6}{num_bytes / 1e6:>8.2f} MB  {rate:>7.2f} GB/s  {rate / bandwidth:>5.0%} of {bandwidth:.1f}")
    hidden, inner = (256, 128) if args.quick else (2048, 768)                 # Qwen3-30B-A3B's own expert
    k = config["num_experts_per_tok"]
    print(f"\nthe expert kernel alone (cpu_kernels.gated_experts) at {'a tiny' if args.quick else 'Qwen3-30B-A3B'}'s "
          f"expert shape, hidden {hidden} x "
          f"expert {inner}, {k} experts a call round {'64 MB' if args.quick else '1 GB'} of them (from RAM):")
    for scheme in schemes:
        rate = kernel_rate(scheme, hidden, inner, k, (64 << 20) if args.quick else (1 << 30), args.repeats)
        print(f"  {scheme:<6}{rate:>7.2f} GB/s  {rate / bandwidth:>5.0%} of {bandwidth:.1f}")


if __name__ == "__main__":
    main()
