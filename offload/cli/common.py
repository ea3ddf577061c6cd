"""What the model-running subcommands share: the MODEL argument and its budget, draft and sampling options;
opening a model with its tokenizer and chat template; the plan report; one-line errors with exit status 2."""
from __future__ import annotations

import sys

from placement.cli import OneLineParser, UsageError



class CommandError(Exception):
    """A user mistake found while running a subcommand: printed as one line, exit status 2."""


def parser(prog: str, description: str) -> OneLineParser:
    return OneLineParser(prog=prog, description=description)


def add_model_options(p: OneLineParser) -> None:
    from offload.chat import MODEL_KINDS
    p.add_argument("model", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("--gpu-memory", metavar="SIZE", help="GPU memory budget, e.g. 8GiB (default: what is free; "
                   "without CUDA the CPU stands in for the GPU)")
    p.add_argument("--cpu-memory", metavar="SIZE", help="CPU RAM budget, e.g. 32GiB (default: what is free)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="context length to reserve KV cache for")
    p.add_argument("--device", help="cuda, cuda:1 or cpu (default: CUDA when there is one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: the "
                   "checkpoint's; float32 for GGUF files)")
    p.add_argument("--quantize", choices=["int4", "int8"], help="quantize the layers' matrices as they are read "
                   "(held and streamed packed)")
    p.add_argument("--cpu-compute", choices=["auto", "on", "off"], default="auto", help="layers whose weights stay "
                   "in RAM decode on the CPU where they lie (on, as llama.cpp does), stream to the GPU (off), or as "
                   "the planner finds fastest (auto, the default)")
    p.add_argument("--draft", metavar="ngram|ngram-tree|MODEL", help="speculative decoding: ngram = prompt "
                   "lookup (no second model; pays off when replies repeat the conversation; ngram-tree: a tree "
                   "of its latest matches), or a small model with the same tokenizer (any MODEL), held on the GPU")
    p.add_argument("--draft-quantize", choices=["int4", "int8"], help="quantize the draft model as it is read "
                   "(a 4-bit copy of the model itself drafts well when nothing smaller exists)")
    p.add_argument("--draft-tree", action="store_true", help="the draft model proposes a tree of its likeliest "
                   "continuations (SpecExec), not a chain (a server's rows verify chains)")
    p.add_argument("--show-plan", action="store_true", help="print the plan (and the draft) before starting")


def add_sampling_options(p: OneLineParser, *, temperature: float, top_p: float | None) -> None:
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="longest reply in tokens")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"nucleus sampling (default {top_p})")
    p.add_argument("--seed", type=int, help="sampling seed, for repeatable output")


def check_options(args) -> None:
    """UsageError for option combinations that cannot work."""
    from offload.generation.drafts import NAMED_DRAFTS
    if args.draft_quantize and (args.draft is None or args.draft in NAMED_DRAFTS):
        raise UsageError("--draft-quantize quantizes a draft model: give --draft MODEL too")
    if args.draft_tree and (args.draft is None or args.draft in NAMED_DRAFTS):
        raise UsageError("--draft-tree makes a draft model propose trees: give --draft MODEL too (the n-gram "
                         "draft's tree is --draft ngram-tree, without --draft-tree)")
    for flag in ("max_new_tokens", "max_seq_len"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")


def note(message: str) -> None:
    print(f"[{message}]", file=sys.stderr, flush=True)


def open_model(args, *, max_batch_size: int | None = None):
    """(tokenizer, template, model) for args.model with args' budgets; CommandError for a user mistake."""
    from offload.chat import open_chat
    try:
        files = open_chat(args.model)
    except ValueError as error:                    # HubError, ChatSetupError, ConfigError: one line each
        raise CommandError(str(error)) from None
    path, tokenizer, template = files.path, files.tokenizer, files.template
    import offload
    options = {k: v for k, v in (("gpu_memory", args.gpu_memory), ("cpu_memory", args.cpu_memory),
                                 ("max_seq_len", args.max_seq_len), ("device", args.device), ("dtype", args.dtype),
                                 ("quantize", args.quantize), ("draft", args.draft),
                                 ("cpu_compute", {"on": True, "off": False}.get(args.cpu_compute)),
                                 ("draft_quantize", args.draft_quantize), ("max_batch_size", max_batch_size),
                                 ("draft_tree", args.draft_tree or None))
               if v is not None}
    try:
        model = offload.load(str(path), **options)
    except (ValueError, MemoryError) as error:     # bad config, unsupported model, budget too small
        raise CommandError(str(error).splitlines()[0] if str(error) else type(error).__name__) from None
    if tokenizer.vocab_size > model.arch.vocab_size:
        model.close()
        raise CommandError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{model.arch.vocab_size}: they do not belong together")
    return tokenizer, template, model


def plan_report(model) -> str:
    plan, draft = getattr(model, "plan", None), model.draft_model
    if plan is not None:
        trees = ", proposing token trees" if getattr(model.default_draft, "tree", False) else ""
        return plan.summary() + ("" if draft is None else f"\ndraft model: {draft.checkpoint.path} "
                                 f"({draft.plan.quantization or draft.plan.dtype}){trees}, resident beside the "
                                 "budget above")
    return (f"no offloading plan: all {model.arch.num_layers} layers and the KV cache on {model.device} "
            f"({model.dtype}), context {model.max_seq_len} tokens")


def run_command(prog: str, body, argv) -> int:
    """Run `body(argv)`; a user mistake (UsageError, CommandError) is one line on stderr and exit status 2."""
    try:
        return body(argv)
    except (UsageError, CommandError) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
