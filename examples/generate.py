#!/usr/bin/env python
"""Batch generation with the Python API: complete every prompt of a file, print the completions and the
throughput.

    python examples/generate.py ./Llama-2-7b-hf prompts.txt --batch-size 4 --max-new-tokens 64
    python examples/generate.py ./Qwen2.5-7B-Instruct questions.txt --chat --gpu-memory 8GiB

prompts.txt holds one prompt per line (blank lines are skipped). With --chat each line is a user message
put through the model's chat template; without it the line is the raw prompt text.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import offload  # noqa: E402
from offload.chat import ChatSetupError, ChatTemplate, ChatTokenizer, find_chat_template  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", help="a Hugging Face model folder")
    parser.add_argument("prompts", help="a text file with one prompt per line")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per generate call (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    parser.add_argument("--gpu-memory", help="GPU memory budget, e.g. 8GiB")
    parser.add_argument("--cpu-memory", help="CPU RAM budget, e.g. 32GiB")
    parser.add_argument("--device", help="cuda, cpu, ... (default: the library's choice)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def fail(message: str) -> NoReturn:
    print(f"generate.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def read_prompts(path: Path) -> list[str]:
    if not path.is_file():
        fail(f"{path}: no such file (give a text file with one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        fail(f"{path}: no prompts in it (one prompt per line)")
    return prompts


def encode_prompts(tokenizer: ChatTokenizer, prompts: list[str], template: ChatTemplate | None) -> list[list[int]]:
    """Token ids per prompt: the chat template writes its own BOS; raw text gets the tokenizer's."""
    if template is None:
        return [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    return [tokenizer.encode(template.render([{"role": "user", "content": p}])) for p in prompts]


def main(argv=None) -> int:
    args = parse_args(argv)
    model_dir = Path(args.model_dir)
    if not model_dir.is_dir():
        fail(f"{model_dir}: no such folder (give a Hugging Face model folder)")
    prompts = read_prompts(Path(args.prompts))
    try:
        tokenizer = ChatTokenizer.from_dir(model_dir)
        template = ChatTemplate(find_chat_template(model_dir), tokenizer.special_tokens) if args.chat else None
    except ChatSetupError as error:
        fail(str(error))
    options = {k: v for k, v in (("gpu_memory", args.gpu_memory), ("cpu_memory", args.cpu_memory),
                                 ("device", args.device)) if v is not None}
    try:
        model = offload.load(str(model_dir), max_batch_size=min(args.batch_size, len(prompts)), **options)
    except (ValueError, MemoryError) as error:
        fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    rows = encode_prompts(tokenizer, prompts, template)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    num_new = num_prompt = 0
    prefill_seconds = decode_seconds = 0.0
    start = time.perf_counter()
    for first in range(0, len(rows), args.batch_size):
        batch = rows[first:first + args.batch_size]
        outputs = model.generate(batch, max_new_tokens=args.max_new_tokens,
                                 stop_token_ids=tokenizer.stop_token_ids, **sampling)
        stats = model.stats
        prefill_seconds += stats.prefill_seconds
        decode_seconds += stats.decode_seconds
        num_prompt += sum(map(len, batch))
        for i, new_ids in enumerate(outputs):
            num_new += len(new_ids)
            print(f"=== prompt {first + i + 1}: {prompts[first + i]}")
            print(tokenizer.decode(new_ids).strip())
    seconds = time.perf_counter() - start
    print(f"--- {len(rows)} prompts in batches of {args.batch_size}: {num_prompt} prompt tokens, {num_new} new "
          f"tokens in {seconds:.2f} s = {num_new / seconds:.1f} new tokens/s "
          f"(prefill {num_prompt / max(prefill_seconds, 1e-9):.0f} tokens/s, decode steps "
          f"{decode_seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
