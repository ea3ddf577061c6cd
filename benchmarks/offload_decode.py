"""Decode tokens/s of the offloading runtime under a GPU budget that forces streaming, measured in one run
side by side with the PCIe bound, transformers + accelerate at the same budget, and the planner's prediction.

    python benchmarks/offload_decode.py                  # CUDA: llama-3.1-8b, 8 GiB GPU budget
    python benchmarks/offload_decode.py --config tests/reference_configs/mistral-7b-v0.1.json --gpu-memory 6GiB
    python benchmarks/offload_decode.py --quick          # a toy model in seconds (what the tests run)

A random-weight checkpoint of the config (a path or a placement preset) is built once under --workdir and
reused. Per batch size (default 1 and 16) one row, tokens/s summed over the batch:
  ours       offload.load(gpu_memory=, cpu_memory=, max_batch_size=B): decode tokens/s from model.stats
             (greedy, prompt --prompt-len, --new-tokens new tokens, after a warm-up), median over --repeats
  GB/step    host->device bytes per decode step of the plan that ran: streamed layer weights, the LM head if
             streamed, and the cached KV of layers attended on the GPU from a CPU cache
  bound      the PCIe bound: B / (GB/step / measured pinned host->device GB/s); %bound = ours / bound
  peer       transformers + accelerate, device_map="auto", max_memory={0: gpu, "cpu": cpu}, same checkpoint:
             (N - 1) * B / (t(N new tokens) - t(1 new token)), min over repeats; ours/peer uses ours timed
             the same way (column "ours(t)")
  predicted  the planner's decode tokens/s for the plan that ran; meas/pred = ours / predicted
Without CUDA the CPU stands in for the GPU (the runtime's fallback): the "gpu" budget defaults to what half
of the layers' weights streamed needs, "PCIe" is a host memcpy, the peer runs all in RAM (nothing to
offload to): NOT a GPU result, and the output says so.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))        # sibling helper modules
from accelerate_peer import decode_rate, load_peer                # noqa: E402
from random_checkpoint import build_random_checkpoint, read_config  # noqa: E402

import placement                                                   # noqa: E402
from placement.hardware import detect_cpu_bytes                    # noqa: E402

QUICK_CONFIG = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=2048, hidden_size=256,
                    intermediate_size=688, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
                    max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32")
DEFAULT_WORKDIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "offload" / "bench"


@dataclass
class OursResult:
    batch_size: int
    gpu_budget: int
    plan: object = None                     # placement.Plan that ran
    error: str = ""                         # why this row could not run
    rates: list = field(default_factory=list)          # decode tok/s from model.stats, one per repeat
    rate_timed: float = 0.0                 # (N-1)B / (t(N) - t(1)), as the peer is timed
    bytes_per_step: float = 0.0             # measured: (h2d bytes(N) - h2d bytes(1)) / (N - 1)
    wait_seconds: float = 0.0               # stats.transfer_wait_seconds of the last N-token call
    achieved_gbps: float = 0.0
    peak_gpu_bytes: int | None = None       # torch.cuda.max_memory_allocated during the row
    tokens: list = field(default_factory=list)          # row 0 of the last N-token call

    @property
    def rate(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0


def plan_bytes_per_step(plan) -> int:
    """Host->device bytes one decode step of `plan` copies: streamed weights, a streamed LM head, and the
    whole preallocated KV cache of each layer whose CPU cache is attended on the GPU."""
    head = plan.lm_head.read_bytes if plan.lm_head.weights == "cpu" else 0
    return head + sum(layer.streamed_bytes for layer in plan.layers)    # a layer's ring slot: what it streams


def half_streamed_budget(checkpoint: Path, batch_size: int, prompt_len: int, new_tokens: int,
                         cpu_budget: int) -> int:
    """The "gpu" budget of a manual plan with the first half of the layers resident, the rest streamed,
    plus the CUDA reserve the runtime subtracts from a budget (none on the CPU, where the CPU stands in)."""
    from offload.loading.planning import planning_hardware
    spec = placement.load_spec(checkpoint)
    workload = placement.Workload(batch_size=batch_size, prompt_len=prompt_len, gen_len=new_tokens)
    total = placement.manual_plan(spec, workload, gpu_layers=spec.num_layers // 2).memory.gpu.total
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return total + planning_hardware(device, total, cpu_budget).cuda_reserve_bytes


def run_ours(checkpoint: Path, args, batch_size: int, gpu_budget: int, prompts) -> OursResult:
    import offload
    result = OursResult(batch_size=batch_size, gpu_budget=gpu_budget)
    kwargs = dict(gpu_memory=gpu_budget, cpu_memory=args.cpu_budget, max_batch_size=batch_size,
                  max_seq_len=args.prompt_len + args.new_tokens, dtype=args.dtype, progress=False)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        model = offload.load(checkpoint, **kwargs)
    except (ValueError, MemoryError) as e:                # PlanError, MemoryBudgetError: budget too small
        result.error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        return result
    result.plan = model.plan
    model.generate(prompts, max_new_tokens=min(4, args.new_tokens))                     # warm-up
    t_one, t_all = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.generate(prompts, max_new_tokens=1)
        t_one.append(time.perf_counter() - t0)
        bytes_one = model.stats.host_to_device_bytes
        t0 = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=args.new_tokens)
        t_all.append(time.perf_counter() - t0)
        stats = model.stats
        result.rates.append(stats.decode_tokens_per_second)
        result.bytes_per_step = (stats.host_to_device_bytes - bytes_one) / (args.new_tokens - 1)
        result.wait_seconds, result.achieved_gbps = stats.transfer_wait_seconds, stats.achieved_gb_per_second
        result.tokens = out[0]
    result.rate_timed = (args.new_tokens - 1) * batch_size / max(min(t_all) - min(t_one), 1e-9)
    if torch.cuda.is_available():
        result.peak_gpu_bytes = torch.cuda.max_memory_allocated()
    release(model)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def release(model) -> None:
    """Free the model's device memory and stop its copy thread before the next row loads its own.
    Model has no close() (yet): close its weight source, which frees the ring and resident weights."""
    close = getattr(model, "close", None) or getattr(getattr(model.engine, "weights", None), "close", None)
    if close is not None:
        close()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config.json path or placement preset (default: llama-3.1-8b with "
                        "CUDA, opt-125m without; --quick: a 6-layer toy llama)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and compute (default: the config's with CUDA, float32 without)")
    parser.add_argument("--gpu-memory", help="GPU budget, e.g. 8GiB (default: 8GiB with CUDA; without, "
                        "per batch size what a plan with half of the layers streamed needs)")
    parser.add_argument("--cpu-memory", help="CPU budget (default: 90%% of the RAM available now)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-len", type=int, help="prompt tokens per row (default 128; --quick 16)")
    parser.add_argument("--new-tokens", type=int, help="new tokens per row, >= 2 (default 32; --quick 8)")
    parser.add_argument("--repeats", type=int, help="timed calls of ours (median; default 3, --quick 1)")
    parser.add_argument("--peer-repeats", type=int, default=1, help="timed calls of the peer (min; default 1)")
    parser.add_argument("--no-peer", action="store_true", help="skip transformers + accelerate")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where random checkpoints are built and reused (default {DEFAULT_WORKDIR})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="toy model, short prompt, one repeat")
    args = parser.parse_args(argv)
    is_cuda = torch.cuda.is_available()
    if args.prompt_len is None:
        args.prompt_len = 16 if args.quick else 128
    if args.new_tokens is None:
        args.new_tokens = 8 if args.quick else 32
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.new_tokens < 2 or min(args.batch_sizes + [args.prompt_len, args.repeats, args.peer_repeats]) < 1:
        parser.error("--new-tokens must be >= 2; batch sizes, --prompt-len and repeats >= 1")
    try:
        if args.config is None and args.quick:
            args.config_name, args.config_dict = "toy-llama", dict(QUICK_CONFIG)
        else:
            args.config_name = args.config or ("llama-3.1-8b" if is_cuda else "opt-125m")
            args.config_dict = read_config(args.config_name)
            args.config_name = Path(args.config_name).stem if args.config_name.endswith(".json") else \
                Path(args.config_name).name
        config_dtype = placement.Architecture.from_config(args.config_dict).dtype
        args.dtype = placement.normalize_dtype(args.dtype or (config_dtype if is_cuda else "float32"))
        args.gpu_budget = placement.parse_size(args.gpu_memory, what="--gpu-memory") if args.gpu_memory \
            else (8 << 30 if is_cuda else None)
        args.cpu_budget = placement.parse_size(args.cpu_memory, what="--cpu-memory") if args.cpu_memory \
            else detect_cpu_bytes()
    except ValueError as e:                                # ConfigError, SizeError
        parser.error(str(e))
    return args


def machine_line() -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        return (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), torch {torch.__version__}; {cpu}")
    return f"no CUDA GPU; torch {torch.__version__}; {cpu}"


def gib(num_bytes) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def plan_line(plan) -> str:
    layers = plan.layers
    resident = sum(l.weights == "gpu" for l in layers)
    kv_gpu = sum(l.kv == "gpu" for l in layers)
    attn_cpu = sum(l.attention == "cpu" for l in layers)
    kv_ring = sum(l.kv == "cpu" and l.attention == "gpu" for l in layers)
    ring = f"ring {plan.prefetch_depth} x {plan.slot_bytes / 2**20:.1f} MiB" if plan.slot_bytes else "no ring"
    return (f"weights of {resident}/{len(layers)} layers resident, {len(layers) - resident} streamed, {ring}; KV "
            f"on gpu {kv_gpu}/{len(layers)}, on cpu attended there {attn_cpu}, streamed through the ring "
            f"{kv_ring}; embedding {plan.embedding.weights}, lm_head "
            f"{plan.lm_head.weights}; gpu total {gib(plan.memory.gpu.total)}; predicted bottleneck "
            f"{plan.predicted.bottleneck} with the speeds of: {plan.hardware or 'unknown hardware'}")


def fmt(value, spec: str, width: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}{spec}}"


def ratio(numerator: float, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}x" if denominator else "n/a"


def first_difference(a: list, b: list) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> None:
    args = parse_args(argv)
    is_cuda = torch.cuda.is_available()
    from bandwidth import measure_host_to_device_bandwidth
    print("offload_decode: decode tokens/s under a GPU budget that forces streaming")
    print(f"machine: {machine_line()}")
    if not is_cuda:
        print("*** NOT A GPU RESULT: no CUDA here. The CPU stands in for the GPU, 'PCIe' is a host memcpy and the "
              "peer runs all in RAM. ***")
    path = build_random_checkpoint(args.config_dict, args.dtype, args.workdir, label=args.config_name,
                                   seed=args.seed)
    if is_cuda:
        torch.cuda.empty_cache()                          # the generator's blocks: not ours to count
    spec = placement.load_spec(path)
    print(f"model: {args.config_name} (random weights), {spec.arch.num_params / 1e9:.3f}B parameters, {args.dtype}, "
          f"{gib(spec.arch.num_params * placement.DTYPE_BYTES[args.dtype])} of weights; checkpoint {path}")
    bandwidth = measure_host_to_device_bandwidth(num_bytes=(32 if args.quick else 256) << 20,
                                                 num_repeats=3 if args.quick else 5)
    print(f"host->device bandwidth: {bandwidth}")
    print(f"workload: prompt {args.prompt_len} tokens per row, {args.new_tokens} new tokens (greedy), "
          f"ours median of {args.repeats}, peer min of {args.peer_repeats}; cpu budget {gib(args.cpu_budget)}")

    generator = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(0, spec.arch.vocab_size, (b, args.prompt_len), generator=generator).tolist()
               for b in args.batch_sizes}
    ours = {}
    for b in args.batch_sizes:
        budget = args.gpu_budget or half_streamed_budget(path, b, args.prompt_len, args.new_tokens, args.cpu_budget)
        ours[b] = run_ours(path, args, b, budget, prompts[b])

    peer_rates, peer_tokens, peer_note = {}, {}, "skipped (--no-peer)"
    if not args.no_peer:
        max_memory = {0: args.gpu_budget, "cpu": args.cpu_budget} if is_cuda else {"cpu": args.cpu_budget}
        peer = load_peer(path, getattr(torch, args.dtype), max_memory, args.workdir / "accelerate-offload")
        if isinstance(peer, str):
            peer_note = peer
        else:
            peer_note = f"{peer.description}: {peer.placement_counts()}"
            if not is_cuda:
                peer_note += (" -- no GPU, so nothing is offloaded and every weight stays in RAM: the closest "
                              "honest equivalent, a plain CPU baseline, not an offloading peer")
            for b in (b for b in args.batch_sizes if not ours[b].error):
                try:
                    peer_rates[b], out = decode_rate(peer.generate, prompts[b], args.new_tokens, args.peer_repeats)
                    peer_tokens[b] = out[0]
                except Exception as e:  # noqa: BLE001 - e.g. CUDA out of memory at B=16: n/a, with the reason
                    peer_note += f"\n      B={b}: n/a, generate failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            del peer
            gc.collect()

    header = (f"{'B':>3} {'gpu budget':>10} {'ours tok/s':>10} {'ours(t)':>8} {'GB/step':>8} {'bound':>8} "
              f"{'%bound':>6} {'peer tok/s':>10} {'ours/peer':>9} {'predicted':>9} {'meas/pred':>9}")
    print()
    print(header)
    print("-" * len(header))
    notes = []
    for b in args.batch_sizes:
        r = ours[b]
        if r.error:
            print(f"{b:>3} {gib(r.gpu_budget):>10}  n/a: {r.error}")
            continue
        step_bytes = plan_bytes_per_step(r.plan)
        bound = b / bandwidth.seconds_for(step_bytes) if step_bytes else None
        peer_rate = peer_rates.get(b)
        predicted = r.plan.predicted.decode_tokens_per_s
        print(f"{b:>3} {gib(r.gpu_budget):>10} {r.rate:>10.2f} {r.rate_timed:>8.2f} {step_bytes / 1e9:>8.3f} "
              f"{fmt(bound, '.2f', 8)} {fmt(r.rate / bound * 100 if bound else None, '.0f', 5)}% "
              f"{fmt(peer_rate, '.2f', 10)} {ratio(r.rate_timed, peer_rate):>9} "
              f"{predicted:>9.2f} {r.rate / predicted if predicted else 0:>9.2f}")
        notes.append(f"B={b}: plan: {plan_line(r.plan)}")
        peak = ""
        if r.peak_gpu_bytes is not None:
            over = " OVER THE PLAN" if r.peak_gpu_bytes > r.plan.memory.gpu.total else ""
            peak = f"; peak GPU allocated {gib(r.peak_gpu_bytes)} (plan gpu total {gib(r.plan.memory.gpu.total)}){over}"
        mismatch = f" ({r.bytes_per_step / step_bytes - 1:+.0%} vs the plan)" \
            if step_bytes and abs(r.bytes_per_step / step_bytes - 1) > 0.02 else ""
        notes.append(f"      measured {r.bytes_per_step / 1e9:.3f} GB/step host->device{mismatch}, transfer wait "
                     f"{r.wait_seconds:.3f} s in the {args.new_tokens}-token call, achieved {r.achieved_gbps:.2f} GB/s{peak}")
        if not step_bytes:
            notes.append(f"      WARNING: nothing is streamed at B={b}: the budget does not force streaming; "
                         "lower --gpu-memory")
        if b in peer_tokens:
            diff = first_difference(r.tokens, peer_tokens[b])
            notes.append("      greedy tokens of row 0 equal the peer's" if diff is None else
                         f"      greedy tokens of row 0 differ from the peer's from token {diff} "
                         f"({args.dtype} rounding on random weights)")
    print("tok/s summed over the batch. ours: model.stats decode rate; ours(t) and peer: (N-1)*B / (t(N) - t(1)); "
          "GB/step: host->device bytes of one decode step of the plan that ran; bound: B / (GB/step / measured "
          "bandwidth); predicted: the planner's decode tok/s for that plan")
    print()
    print(f"peer: {peer_note}")
    print("\n".join(notes))
    if not is_cuda:
        print("*** NOT A GPU RESULT (CPU fallback): run on a CUDA machine for PCIe numbers. ***")
    failed = [b for b in args.batch_sizes if ours[b].error]
    if failed:
        print(f"offload_decode.py: batch size(s) {', '.join(map(str, failed))} did not load (see the table): raise "
              "--gpu-memory/--cpu-memory or lower --prompt-len/--new-tokens/--batch-sizes", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
