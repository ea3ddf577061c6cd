#!/usr/bin/env python
"""Chat with a Hugging Face model folder, streaming the replies, keeping the KV cache between turns.

    python examples/chat.py ./Llama-3.1-8B-Instruct --gpu-memory 8GiB --cpu-memory 32GiB
    python examples/chat.py --demo          # a tiny random-weight model made on the spot: no download

Commands: /reset (new conversation), /plan (the plan and memory report), /stats (last turn's timings),
/quit. Ctrl-C stops the current reply (the conversation goes on from what was said), Ctrl-D exits.
When stdin is not a terminal, every line is one user message and each reply is printed on its own line.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from offload.chat import (ChatSetupError, ChatTemplate, ChatTemplateError, ChatTokenizer,  # noqa: E402
                          ContextFullError, Conversation, find_chat_template, run_turn)
from offload.chat.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from placement.gguf_file import find_gguf  # noqa: E402

COMMANDS = "/reset, /plan, /stats, /quit"
DEMO_MAX_NEW_TOKENS = 32


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", nargs="?", help="a .gguf file, or a Hugging Face model folder (config.json, "
                        "*.safetensors, tokenizer.json, tokenizer_config.json)")
    parser.add_argument("--demo", action="store_true", help="chat with a tiny random-weight Llama built in a "
                        "temporary folder (replies are random: it shows the pipeline)")
    parser.add_argument("--gpu-memory", help="GPU memory budget, e.g. 8GiB (default: what is free)")
    parser.add_argument("--cpu-memory", help="CPU RAM budget, e.g. 32GiB (default: what is free)")
    parser.add_argument("--max-seq-len", type=int, help="context length to reserve KV cache for")
    parser.add_argument("--device", help="cuda, cuda:1 or cpu (default: the library's choice)")
    parser.add_argument("--max-new-tokens", type=int, help="longest reply in tokens (default 512; 32 "
                        "with --demo)")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (default 0.9)")
    parser.add_argument("--seed", type=int, help="sampling seed, for repeatable replies")
    parser.add_argument("--draft", metavar="ngram|ngram-tree|MODEL", help="speculative decoding: ngram = prompt "
                        "lookup (no second model; pays off when replies repeat the conversation; ngram-tree: a tree "
                        "of its latest matches), or a small model with the same tokenizer (a folder or .gguf file), "
                        "held on the GPU")
    parser.add_argument("--draft-quantize", choices=["int4", "int8"], help="quantize the draft model as it is "
                        "read (a 4-bit copy of the model itself drafts well when nothing smaller exists)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--show-plan", action="store_true", help="print the plan before chatting")
    parser.add_argument("--stats", action="store_true", help="print each turn's timings (to stderr)")
    args = parser.parse_args(argv)
    if args.demo == bool(args.model_dir):
        parser.error("give a MODEL_DIR or --demo (one of them)")
    if args.max_new_tokens is None:
        args.max_new_tokens = DEMO_MAX_NEW_TOKENS if args.demo else 512
    if args.draft_quantize:
        from offload.generation.drafts import NAMED_DRAFTS      # (torch: imported only when needed)
    if args.draft_quantize and (args.draft is None or args.draft in NAMED_DRAFTS):
        parser.error("--draft-quantize quantizes a draft model: give --draft MODEL too")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    return args


def fail(message: str) -> NoReturn:
    print(f"chat.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def note(message: str) -> None:
    print(f"[{message}]", file=sys.stderr, flush=True)


def setup(args):
    """(tokenizer, template, model) for the folder; one line on stderr and exit 2 for a user mistake."""
    model_dir = Path(args.model_dir)
    if not model_dir.exists():
        fail(f"{model_dir}: no such file or folder (give a Hugging Face model folder, a .gguf file, or --demo)")
    try:
        gguf_path = find_gguf(model_dir)
        if gguf_path is not None:                # tokenizer and chat template from the file's metadata
            tokenizer, template_text = tokenizer_from_gguf(gguf_path)
        else:
            if not model_dir.is_dir():
                fail(f"{model_dir}: not a folder or a .gguf file (give a Hugging Face model folder, a .gguf "
                     "file, or --demo)")
            tokenizer, template_text = ChatTokenizer.from_dir(model_dir), find_chat_template(model_dir)
        template = ChatTemplate(template_text, tokenizer.special_tokens)
    except (ChatSetupError, ValueError) as error:
        fail(str(error))
    if template.is_fallback:
        note("this model has no chat template: using a plain 'User: ... / Assistant: ...' format")
    if args.system:
        try:
            template.render([{"role": "system", "content": args.system}, {"role": "user", "content": "hi"}])
        except ChatTemplateError as error:
            fail(f"--system: this model's chat template rejects a system message ({error})")
    import offload
    options = {k: v for k, v in (("gpu_memory", args.gpu_memory), ("cpu_memory", args.cpu_memory),
                                 ("max_seq_len", args.max_seq_len), ("device", args.device),
                                 ("draft", args.draft), ("draft_quantize", args.draft_quantize)) if v is not None}
    try:
        model = offload.load(str(model_dir), **options)
    except (ValueError, MemoryError) as error:     # bad config, unsupported model, budget too small
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    if tokenizer.vocab_size > model.arch.vocab_size:
        fail(f"{model_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the model only "
             f"{model.arch.vocab_size}: they do not belong together")
    return tokenizer, template, model


def plan_report(model) -> str:
    plan, draft = getattr(model, "plan", None), model.draft_model
    if plan is not None:
        return plan.summary() + ("" if draft is None else f"\ndraft model: {draft.checkpoint.path} "
                                 f"({draft.plan.quantization or draft.plan.dtype}), resident beside the budget above")
    return (f"no offloading plan: all {model.arch.num_layers} layers and the KV cache on {model.device} "
            f"({model.dtype}), context {model.max_seq_len} tokens")


def stats_report(result, model) -> str:
    if result is None:
        return "no turn yet"
    s, turn = model.stats, result.turn
    fed = (f"prefill {s.num_prompt_tokens} tokens ({len(turn.token_ids)} new) in {s.prefill_seconds:.3f} s, "
           f"reused {turn.num_reused_tokens} tokens of the conversation")
    if turn.is_reset:
        fed += f" (session reset: {turn.reason})" if turn.reason else " (new conversation)"
    elif turn.num_dropped_tokens:
        fed += f", dropped the {turn.num_dropped_tokens} after them ({turn.reason})"
    drafted = (f" ({s.num_verify_passes} verification passes kept {s.num_accepted_tokens} of "
               f"{s.num_drafted_tokens} drafted tokens, drafting {s.draft_seconds:.2f} s)" if s.num_verify_passes else "")
    return (f"{fed}; decode {s.num_decode_tokens} tokens at {s.decode_tokens_per_second:.1f} tokens/s{drafted}; "
            f"host->device {s.host_to_device_bytes / 1e9:.2f} GB at {s.achieved_gb_per_second:.2f} GB/s; "
            f"reply {result.num_generated_tokens} tokens, ended by {result.stop_reason}")


def read_messages(is_tty: bool):
    """User lines: prompted from a terminal (Ctrl-C at the prompt is ignored), else one per stdin line."""
    while True:
        try:
            line = input("you> ") if is_tty else sys.stdin.readline()
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /quit exits)")
            continue
        except EOFError:
            return
        if not is_tty and not line:
            return
        line = line.strip()
        if line:
            yield line


def chat(args, tokenizer, template, model) -> None:
    is_tty = sys.stdin.isatty()
    session = model.session()
    conversation = Conversation(tokenizer, template, max_context=model.max_seq_len, system=args.system)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)   # (the draft: the model's)
    if is_tty:
        print(f"Chatting with {args.model_dir}. Commands: {COMMANDS}. Ctrl-C stops a reply, Ctrl-D exits.")
    last = None
    for line in read_messages(is_tty):
        command = line.lower()
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            conversation.reset()
            session.reset()
            print("(new conversation)")
            continue
        if command == "/plan":
            print(plan_report(model))
            continue
        if command == "/stats":
            print(stats_report(last, model))
            continue
        if line.startswith("/") and " " not in line:
            print(f"unknown command {line}; commands: {COMMANDS}")
            continue
        if is_tty:
            print("assistant> ", end="", flush=True)
        try:
            last = run_turn(session, conversation, line, max_new_tokens=args.max_new_tokens,
                            on_text=lambda text: print(text, end="", flush=True),
                            stop_token_ids=tokenizer.stop_token_ids, **sampling)
        except KeyboardInterrupt:                  # before the turn began: nothing was said
            print(" [interrupted]", flush=True)
            continue
        except ContextFullError as error:
            print(f"\n(context full: {error})" if is_tty else f"(context full: {error})", flush=True)
            continue
        except ChatTemplateError as error:
            print(f"\n(the chat template refused this conversation: {error})", flush=True)
            continue
        print(" [interrupted]" if last.stop_reason == "interrupted" else "", flush=True)
        if last.is_context_exhausted:
            print("(the context is full: type /reset to start a new conversation)", flush=True)
        if args.stats:
            note(f"stats: {stats_report(last, model)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="offload-demo-") as scratch:
        if args.demo:
            from offload.chat.demo import build_demo_model
            args.model_dir = str(build_demo_model(Path(scratch) / "tiny-llama"))
            note("demo: a tiny Llama with RANDOM weights and a tokenizer trained on a few lines: the replies "
                 "are random tokens; it shows the pipeline (plan, load, streaming, stats), not a language model")
        tokenizer, template, model = setup(args)
        if args.show_plan:
            print(plan_report(model), flush=True)
        try:
            chat(args, tokenizer, template, model)
        except KeyboardInterrupt:
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
