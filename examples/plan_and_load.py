#!/usr/bin/env python
"""Plan with the `placement` API, save the plan, load the model with exactly that plan, generate.

    python examples/plan_and_load.py ./Llama-2-13b-hf --gpu-memory 8GiB --cpu-memory 32GiB \\
        --plan-out plan.json --prompt "The capital of France is"

The same plan file works with `offload.load(path, plan="plan.json")` anywhere, and is what
`offload-plan MODEL --json > plan.json` writes: the plan is the contract the runtime carries out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import offload  # noqa: E402
from offload.chat import open_chat  # noqa: E402
from offload.chat.conversation import in_context_text  # noqa: E402
from placement.hardware import Hardware  # noqa: E402
from placement.search import plan as make_plan  # noqa: E402
from placement.spec import load_spec  # noqa: E402
from placement.workload import Workload  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Hugging Face model folder, a .gguf file, a Hub name or a pip package "
                        "shipping a GGUF file")
    parser.add_argument("--gpu-memory", help="GPU memory budget, e.g. 8GiB (default: what is free)")
    parser.add_argument("--cpu-memory", help="CPU RAM budget, e.g. 32GiB (default: what is free)")
    parser.add_argument("--prompt", default="The library runs large language models", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512, help="longest prompt the plan provisions for")
    parser.add_argument("--plan-out", default="plan.json", help="where to save the plan (default plan.json)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1 or args.prompt_len < 1:
        parser.error("--max-new-tokens and --prompt-len must be >= 1")
    return args


def fail(message: str) -> NoReturn:
    print(f"plan_and_load.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        chat = open_chat(args.model)                  # the local path (a Hub name: from the cache, or downloaded)
        model_dir, tokenizer = chat.path, chat.tokenizer
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
        if len(prompt_ids) > args.prompt_len:
            fail(f"the prompt is {len(prompt_ids)} tokens, more than --prompt-len {args.prompt_len}")
        # 1. Plan: what the model is (sizes from the checkpoint's headers), what the machine has, what the
        #    work is. Pure Python: no torch, no weights read.
        spec = load_spec(model_dir)
        hardware = Hardware.detect(gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory)
        workload = Workload(batch_size=1, prompt_len=args.prompt_len, gen_len=args.max_new_tokens)
        plan = make_plan(spec, hardware, workload)
    except ValueError as error:     # bad path or name, unsupported model, budget too small
        fail(str(error).splitlines()[0])
    print(plan.summary())
    # 2. Save it: a plain JSON file, reviewable and reusable.
    plan.to_json(args.plan_out)
    print(f"plan saved to {args.plan_out}")
    # 3. Load with exactly that plan, and generate.
    try:
        model = offload.load(str(model_dir), plan=args.plan_out)
    except (ValueError, MemoryError) as error:
        fail(str(error).splitlines()[0])
    new_ids = model.generate([prompt_ids], max_new_tokens=args.max_new_tokens,
                             stop_token_ids=tokenizer.stop_token_ids)[0]
    print(args.prompt + in_context_text(tokenizer, prompt_ids, new_ids, skip_special_tokens=True))
    print(model.stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
