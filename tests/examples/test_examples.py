"""examples/plan_and_load.py and examples/chat.py run as a user runs them, on a tiny model and the real SmolLM2."""
import subprocess
import sys

import pytest

from offload.chat import ChatTokenizer
from tests.offload.loading.test_gguf import smollm2_path

from .builders import REPO, demo_model_dir, hf_greedy


def run_example(name, *args, stdin="", timeout=300):
    return subprocess.run([sys.executable, str(REPO / "examples" / name), *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("examples") / "tiny")


def test_the_chat_example_answers_paris():
    out = run_example("chat.py", smollm2_path(), "--gpu-memory", "400MB",
                      stdin="What is the capital of France?\nAnd of Italy?\n")
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.split("assistant> ")[1:3]
    assert "Paris" in first and "Rome" in second


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
