"""`offload generate` as a user runs it, on a tiny model made here (the real SmolLM2 answering under a small
budget: the Quickstart's main job, tests/test_readme.py)."""
import pytest

from offload.chat import ChatTokenizer
from tests.examples.builders import demo_model_dir, hf_greedy

from .run import one_error_line, run_offload

PROMPTS = ["Hello there", "Tell me a story about the sea", "Café?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("generate") / "tiny")


def test_generate_batches_prompts_and_prints_throughput(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n", encoding="utf-8")
    out = run_offload("generate", folder, "--file", prompts, "--raw", "--batch-size", 2, "--max-new-tokens", 6)
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
    assert "[3 prompts in batches of 2:" in out.stderr and "new tokens/s" in out.stderr


def test_generate_puts_a_prompt_through_the_chat_template(folder):
    out = run_offload("generate", folder, "--prompt", PROMPTS[0], "--max-new-tokens", 6)
    assert out.returncode == 0, out.stderr
    from transformers import AutoTokenizer
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                              add_generation_prompt=True, return_dict=False)
    ids = hf_greedy(folder, list(prompt), 6, ChatTokenizer.from_dir(folder).stop_token_ids)
    assert out.stdout == hf_tokenizer.decode(ids, skip_special_tokens=True).strip() + "\n"
    assert "[stats: prefill" in out.stderr


def test_cpu_compute_says_where_layers_in_ram_decode(folder):
    """--cpu-compute on: the layers kept in RAM decode on the CPU where they lie (as llama.cpp's); off: they
    stream to the "GPU"; the text is the same (the tiny model at a budget too small for its layers)."""
    texts, plans = {}, {}
    for mode in ("on", "off"):
        out = run_offload("generate", folder, "--prompt", PROMPTS[0], "--max-new-tokens", 6, "--gpu-memory", "64.8MiB",
                          "--cpu-compute", mode, "--show-plan")
        assert out.returncode == 0, out.stderr
        texts[mode] = out.stdout
        rows = out.stderr.split("decode on", 1)[1].split("\n\n", 1)[0].splitlines()[1:]     # the layer rows
        plans[mode] = [row.split()[2:6] for row in rows]                       # weights, kv, attention, decode on
    assert plans["on"] == [["cpu", "cpu", "cpu", "cpu"]]
    assert ["cpu", "cpu", "cpu", "gpu"] in plans["off"] and not any(row[3] == "cpu" for row in plans["off"])
    assert texts["on"] == texts["off"] != ""


@pytest.mark.parametrize("args, message", [
    (["--file", "missing.txt"], "missing.txt: no such file"),
    ([], "give --prompt TEXT or --file PROMPTS.txt"),
    (["--prompt", "hi", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--prompt", "hi", "--gpu-memory", "lots"], "lots"),
    (["--prompt", "hi", "--temperature", "warm"], "argument --temperature: invalid float value: 'warm'"),
    (["--prompt", "hi", "--cpu-compute", "maybe"], "argument --cpu-compute: invalid choice: 'maybe'"),
])
def test_generate_bad_input_exits_2_with_one_line(folder, args, message):
    assert message in one_error_line(run_offload("generate", folder, *args), "offload generate")
