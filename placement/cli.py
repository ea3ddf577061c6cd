"""`offload plan MODEL ...` (also `offload-plan`, `python -m placement ...`): plan memory for a model and print it.

Bad input gets one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys

from .architecture import ConfigError
from .hardware import (GPU_PRESETS, Hardware, HardwareError, gpu_preset, machine_gpu_bytes,
                       machine_ram_bytes)
from .manual import manual_plan
from .plans import PlanError
from .search import plan as make_plan
from .sizes import SizeError, format_size, parse_size
from .spec import ModelSpec, load_spec
from .workload import Workload
from . import presets

PROG = "offload-plan"


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage mistake raised as UsageError (one line) rather than printed with the usage."""

    def error(self, message):          # argparse would print the usage too: keep it to one line
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


CPU_COMPUTE = {"on": True, "off": False, "auto": None}
EXPERTS = {"gpu": "gpu", "cpu": "cpu", "streamed": "streamed", "auto": None}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Plan where the weights and KV cache of an LLM live (GPU memory "
                "or CPU RAM) and predict prefill time and decode speed.",
                epilog="Sizes: 8GiB, 7.5GB, 512MiB (GiB/MiB binary, GB/MB decimal). Without --gpu-memory "
                "or --gpu the GPU is detected (this imports torch); without CUDA the CPU stands in for "
                "the GPU.")
    p.add_argument("model", nargs="?", help="preset name (--list-presets), checkpoint folder, .gguf file, "
                   "config.json path, Hugging Face Hub name (org/name: config and safetensors headers read "
                   "without downloading the weights; org/name:Q4_K_M: that GGUF file), or a pip package "
                   "shipping a GGUF file")
    p.add_argument("--gpu-memory", metavar="SIZE", help="GPU budget, including the CUDA context")
    p.add_argument("--cpu-memory", metavar="SIZE", help="CPU RAM budget (default: 90%% of what is "
                   "available now)")
    p.add_argument("--gpu", metavar="NAME", help=f"plan for a GPU you may not own: {', '.join(GPU_PRESETS)}")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N")
    p.add_argument("--prompt-len", type=_positive_int, default=2048, metavar="N")
    p.add_argument("--gen-len", type=_positive_int, default=512, metavar="N")
    p.add_argument("--dtype", help="run in this dtype (float16, bfloat16, float32; default: the "
                   "checkpoint's)")
    p.add_argument("--quantize", metavar="SCHEME", help="plan the layers' matrices packed: int4 or int8, "
                   "optionally with a group size (int4-g64); the runtime quantizes as it loads")
    p.add_argument("--profile", action="store_true", help="measure this machine's speeds (a few "
                   "seconds; cached and reused by later runs)")
    p.add_argument("--gpu-layers", type=_non_negative_int, metavar="N", help="manual plan: the first N "
                   "layers' weights on the GPU, the rest streamed (llama.cpp -ngl)")
    p.add_argument("--kv-gpu-layers", type=_non_negative_int, metavar="M", help="manual plan: the KV "
                   "cache of the first M layers on the GPU, the rest on the CPU (0 is llama.cpp -nkvo)")
    p.add_argument("--cpu-compute", choices=CPU_COMPUTE, default="auto", help="decode the layers whose weights, "
                   "KV and attention are on the CPU there, where their weights lie: on, off, or auto (where the "
                   "cost model predicts it faster; default)")
    p.add_argument("--experts", choices=EXPERTS, default="auto", help="mixture-of-experts models: every "
                   "layer's routed experts with the layer (gpu: resident or streamed with it), in RAM computed by "
                   "the CPU in decode (cpu, as llama.cpp --cpu-moe), in RAM with the routed ones copied to the GPU "
                   "each decode step (streamed), or the fastest of those, also with the first layers' experts kept "
                   "on the GPU while they fit (auto; default; manual plans: gpu)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON (for offload.load(plan=...))")
    p.add_argument("--list-presets", action="store_true", help="list the bundled model presets and exit")
    return p


def _list_presets() -> str:
    rows = []
    for name in presets.names():
        spec = ModelSpec.from_preset(name)
        int4 = spec.quantized("int4").total_weight_bytes
        rows.append(f"  {name:<18} {spec.arch.model_type:<11} {spec.num_params / 1e9:>7.2f}B  "
                    f"{spec.num_layers:>3} layers  {spec.dtype:<9} {format_size(spec.total_weight_bytes):>11}"
                    f"  {format_size(int4):>11}")
    return "presets (name, family, parameters, layers, dtype, weight bytes, with --quantize int4):\n" + \
        "\n".join(rows)


def _hardware(args, prog: str) -> Hardware:
    if args.gpu:
        if args.profile:
            raise UsageError("--profile measures this machine; it cannot be combined with --gpu")
        hw = Hardware.from_gpu_preset(args.gpu, cpu_memory=args.cpu_memory, gpu_memory=args.gpu_memory)
    else:
        hw = Hardware.detect(gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory)
    if args.profile:
        from .profile import load_profile, measure, store_profile
        measured = load_profile()
        if measured is None:
            print(f"{prog}: profiling this machine (a few seconds) ...", file=sys.stderr)
            measured = measure()
            path = store_profile(measured)
            print(f"{prog}: measurements cached in {path}", file=sys.stderr)
        hw = measured.apply(hw)
    return hw


def _warn_budgets(args, hw: Hardware, prog: str) -> None:
    """Explicit budgets are taken as given (people plan for other machines): warn when they exceed
    this one."""
    if args.cpu_memory is not None:
        ram = machine_ram_bytes()
        if hw.cpu_bytes > ram:
            print(f"{prog}: warning: --cpu-memory {format_size(hw.cpu_bytes)} exceeds this machine's "
                  f"{format_size(ram)} of RAM; planning for the budget as given", file=sys.stderr)
    if args.gpu_memory is not None:
        if args.gpu:
            card = gpu_preset(args.gpu).memory_bytes      # a known name: _hardware() built from it
            if hw.gpu_bytes > card:
                print(f"{prog}: warning: --gpu-memory {format_size(hw.gpu_bytes)} exceeds the "
                      f"{format_size(card)} of a {args.gpu}", file=sys.stderr)
            return
        have = machine_gpu_bytes()
        if have is None or hw.gpu_bytes > have:
            mine = "no NVIDIA GPU" if have is None else f"a {format_size(have)} GPU"
            print(f"{prog}: warning: --gpu-memory {format_size(hw.gpu_bytes)} exceeds this machine "
                  f"({mine}); planning for the budget as given", file=sys.stderr)


def run(argv: list[str] | None = None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.list_presets:
        print(_list_presets())
        return 0
    if not args.model:
        raise UsageError("a MODEL is required: a preset name (--list-presets), a checkpoint directory "
                         "or a config.json")
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory)):
        if value is not None:
            parse_size(value, what=flag)
    spec = load_spec(args.model, dtype=args.dtype, quantization=args.quantize)
    workload = Workload(batch_size=args.batch_size, prompt_len=args.prompt_len, gen_len=args.gen_len)
    if args.experts != "auto" and not spec.arch.moe_layers:
        raise UsageError(f"--experts {args.experts} places routed experts; {spec.name} ({spec.arch.model_type}) has "
                         "none: leave --experts out")
    hw = _hardware(args, prog)
    _warn_budgets(args, hw, prog)
    if args.gpu_layers is not None or args.kv_gpu_layers is not None:
        result = manual_plan(spec, workload, hw, gpu_layers=args.gpu_layers,
                             kv_gpu_layers=args.kv_gpu_layers, cpu_compute=CPU_COMPUTE[args.cpu_compute],
                             experts=EXPERTS[args.experts] or "gpu")
    else:
        result = make_plan(spec, hw, workload, cpu_compute=CPU_COMPUTE[args.cpu_compute],
                           experts=EXPERTS[args.experts])
    print(result.to_json() if args.json else result.summary())
    return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Console entry point: 0 on success, 2 with one line on stderr for any user mistake."""
    try:
        return run(argv, prog)
    except (UsageError, ConfigError, SizeError, HardwareError, PlanError, ValueError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
