"""`offload generate MODEL --prompt TEXT | --file PROMPTS.txt`: complete prompts, batched, and print the
completions (stdout) and the throughput (stderr).

Each prompt is a user message put through the model's chat template when it has one (--raw: the text as it is,
after the tokenizer's BOS). --file holds one prompt per line (blank lines are skipped).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from .common import (CommandError, UsageError, add_model_options, add_sampling_options, check_options, note,
                     open_model, parser, plan_report, run_command)

PROG = "offload generate"


def parse_args(argv):
    p = parser(PROG, __doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--file", metavar="PROMPTS.txt", help="a text file with one prompt per line")
    p.add_argument("--raw", action="store_true", help="complete the text as it is (no chat template)")
    p.add_argument("--batch-size", type=int, default=4, metavar="N", help="prompts per batch (default 4)")
    add_sampling_options(p, temperature=0.0, top_p=None)
    args = p.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 256
    if (args.prompt is None) == (args.file is None):
        raise UsageError("give --prompt TEXT or --file PROMPTS.txt (one of them)")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_options(args)
    return args


def read_prompts(args) -> list[str]:
    if args.prompt is not None:
        prompts = [p for p in args.prompt if p.strip()]
        if not prompts:
            raise CommandError("--prompt: empty (give the text to complete)")
        return prompts
    path = Path(args.file)
    if not path.is_file():
        raise CommandError(f"{path}: no such file (give a text file with one prompt per line)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"{path}: not a readable UTF-8 text file ({error})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CommandError(f"{path}: no prompts in it (one prompt per line)")
    return prompts


def encode_prompts(tokenizer, template, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt: the chat template writes its own BOS; raw text gets the tokenizer's."""
    if template is None:
        return [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    return [tokenizer.encode(template.render([{"role": "user", "content": p}])) for p in prompts]


def _run(argv) -> int:
    args = parse_args(argv)
    prompts = read_prompts(args)
    batch_size = min(args.batch_size, len(prompts))
    tokenizer, template, model = open_model(args, max_batch_size=batch_size)
    try:
        if args.raw or template.is_fallback:
            template = None
        rows = encode_prompts(tokenizer, template, prompts)
        too_long = [i for i, row in enumerate(rows) if len(row) + 1 > model.max_seq_len]
        if too_long:
            raise CommandError(f"prompt {too_long[0] + 1} has {len(rows[too_long[0]])} tokens, more than the "
                               f"context of {model.max_seq_len}: give --max-seq-len or a shorter prompt")
        if args.show_plan:
            print(plan_report(model), file=sys.stderr, flush=True)
        sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        num_new = num_prompt = 0
        prefill_seconds = decode_seconds = 0.0
        start = time.perf_counter()
        for first in range(0, len(rows), batch_size):
            batch = rows[first:first + batch_size]
            room = model.max_seq_len - max(map(len, batch))
            outputs = model.generate(batch, max_new_tokens=min(args.max_new_tokens, room),
                                     stop_token_ids=tokenizer.stop_token_ids, **sampling)
            stats = model.stats
            prefill_seconds += stats.prefill_seconds
            decode_seconds += stats.decode_seconds
            num_prompt += sum(map(len, batch))
            for i, new_ids in enumerate(outputs):
                num_new += len(new_ids)
                if len(prompts) > 1:
                    print(f"=== prompt {first + i + 1}: {prompts[first + i]}")
                print(tokenizer.decode(new_ids).strip(), flush=True)
            if len(rows) <= batch_size:
                note(f"stats: {stats.summary()}")
        seconds = time.perf_counter() - start
        note(f"{len(rows)} prompt{'s' if len(rows) > 1 else ''} in batches of {batch_size}: {num_prompt} prompt "
             f"tokens, {num_new} new tokens in {seconds:.2f} s = {num_new / seconds:.1f} new tokens/s (prefill "
             f"{num_prompt / max(prefill_seconds, 1e-9):.0f} tokens/s; decode steps {decode_seconds:.2f} s)")
    finally:
        model.close()
    return 0


def main(argv=None) -> int:
    return run_command(PROG, _run, sys.argv[1:] if argv is None else argv)
