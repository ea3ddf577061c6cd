"""`offload chat MODEL`: chat with a model, streaming the replies, keeping the KV cache between turns.

Commands: /reset (new conversation), /plan (the plan), /stats (last turn's timings), /quit. Ctrl-C stops the
current reply (the conversation goes on from what was said), Ctrl-D exits. When stdin is not a terminal, every
line is one user message and each reply is printed on its own line.
"""
from __future__ import annotations

import sys

from .common import (CommandError, add_model_options, add_sampling_options, check_options, note,
                     open_model, parser, plan_report, run_command)

PROG = "offload chat"
COMMANDS = "/reset, /plan, /stats, /quit"


def parse_args(argv):
    p = parser(PROG, __doc__.split("\n\n")[0] + f" Commands: {COMMANDS}.")
    add_model_options(p)
    add_sampling_options(p, temperature=0.7, top_p=0.9)
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--stats", action="store_true", help="print each turn's timings (to stderr)")
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 512
    check_options(args)
    return args


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
    from offload.chat import ChatTemplateError, ContextFullError, Conversation, run_turn
    is_tty = sys.stdin.isatty()
    session = model.session()
    conversation = Conversation(tokenizer, template, max_context=model.max_seq_len, system=args.system)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)   # (the draft: the model's)
    if is_tty:
        print(f"Chatting with {args.model}. Commands: {COMMANDS}. Ctrl-C stops a reply, Ctrl-D exits.")
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


def _run(argv) -> int:
    args = parse_args(argv)
    tokenizer, template, model = open_model(args)
    try:
        if template.is_fallback:
            note("this model has no chat template: using a plain 'User: ... / Assistant: ...' format")
        if args.system:
            from offload.chat import ChatTemplateError
            try:
                template.render([{"role": "system", "content": args.system}, {"role": "user", "content": "hi"}])
            except ChatTemplateError as error:
                raise CommandError(f"--system: this model's chat template rejects a system message ({error})") from None
        if args.show_plan:
            print(plan_report(model), flush=True)
        try:
            chat(args, tokenizer, template, model)
        except KeyboardInterrupt:
            print()
    finally:
        model.close()
    return 0


def main(argv=None) -> int:
    return run_command(PROG, _run, sys.argv[1:] if argv is None else argv)
