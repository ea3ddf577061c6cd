"""examples/generate.py and examples/plan_and_load.py run as a user runs them, on a tiny model."""
import subprocess
import sys

import pytest

from offload.chat import ChatTokenizer

from .builders import REPO, demo_model_dir, hf_greedy

PROMPTS = ["Hello there", "Tell me a story about the sea", "Café?"]


def run_example(name, *args, timeout=120):
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("examples") / "tiny")


def test_generate_batches_prompts_and_prints_throughput(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n", encoding="utf-8")
    out = run_example("generate.py", folder, prompts, "--batch-size", 2, "--max-new-tokens", 6)
    assert out.returncode == 0, out.stderr
    tokenizer = ChatTokenizer.from_dir(folder)
    blocks = out.stdout.split("=== prompt ")[1:]
    assert len(blocks) == 3
    for i, (prompt, block) in enumerate(zip(PROMPTS, blocks)):
        header, completion = block.split("\n", 1)
        assert header == f"{i + 1}: {prompt}"
        # Each completion is transformers' greedy continuation of the prompt alone (batching, ragged
        # lengths included, changes nothing).
        ids = hf_greedy(folder, tokenizer.encode(prompt, add_special_tokens=True), 6, tokenizer.stop_token_ids)
        assert completion.startswith(tokenizer.decode(ids).strip())
    assert "--- 3 prompts in batches of 2:" in out.stdout and "new tokens/s" in out.stdout


def test_generate_bad_prompts_file(folder, tmp_path):
    out = run_example("generate.py", folder, tmp_path / "missing.txt")
    assert out.returncode == 2 and "missing.txt: no such file" in out.stderr and "Traceback" not in out.stderr


def test_plan_and_load(folder, tmp_path):
    plan_path = tmp_path / "plan.json"
    out = run_example("plan_and_load.py", folder, "--gpu-memory", "1GiB", "--cpu-memory", "1GiB",
                      "--plan-out", plan_path, "--prompt", "Hello there", "--max-new-tokens", 5,
                      "--prompt-len", 32)
    assert out.returncode == 0, out.stderr
    from placement.plans import Plan
    plan = Plan.from_json(plan_path)
    assert plan.workload.prompt_len == 32 and plan.workload.gen_len == 5
    assert out.stdout.startswith(plan.summary())
    tokenizer = ChatTokenizer.from_dir(folder)
    prompt_ids = tokenizer.encode("Hello there", add_special_tokens=True)
    ids = hf_greedy(folder, prompt_ids, 5, tokenizer.stop_token_ids)
    assert ("Hello there" + tokenizer.decode(prompt_ids[-8:] + ids)[len(tokenizer.decode(prompt_ids[-8:])):]) \
        in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--prompt", "Hello there", "--prompt-len", 1], "more than --prompt-len 1"),
    (["--max-new-tokens", 0], "--max-new-tokens and --prompt-len must be >= 1"),
])
def test_plan_and_load_bad_input_exits_2_with_one_line(folder, tmp_path, args, message):
    plan_path = tmp_path / "plan.json"
    out = run_example("plan_and_load.py", folder, "--plan-out", plan_path, *args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not plan_path.exists()
