"""examples/chat.py as a user runs it: a subprocess with piped stdin, on tiny models made here."""
import json
import re
import shutil
import subprocess
import sys

import pytest

from offload.chat import ChatTokenizer

from . import templates
from .builders import REPO, demo_model_dir, hf_greedy

CHAT = str(REPO / "examples" / "chat.py")
STATS = re.compile(r"\[stats: prefill (\d+) tokens \((\d+) new\) in [\d.]+ s, reused (\d+) tokens")


def run_chat(*args, stdin="", timeout=120):
    return subprocess.run([sys.executable, CHAT, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("chat") / "tiny")


def test_two_piped_messages(folder):
    out = run_chat(folder, "--temperature", 0, "--max-new-tokens", 10, "--stats",
                   stdin="Hello there!\nTell me about café and 東京.\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    # Reply 1 is what transformers' Llama generates greedily from the templated first message.
    from transformers import AutoTokenizer
    hf_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompt = hf_tokenizer.apply_chat_template([{"role": "user", "content": "Hello there!"}],
                                              add_generation_prompt=True, return_dict=False)
    stop_ids = ChatTokenizer.from_dir(folder).stop_token_ids
    reply_ids = hf_greedy(folder, list(prompt), 10, stop_ids)
    first_reply = hf_tokenizer.decode(reply_ids, skip_special_tokens=True)
    assert out.stdout.startswith(first_reply + "\n")
    assert len(out.stdout) > len(first_reply) + 2            # a second reply followed
    turns = [tuple(map(int, m)) for m in STATS.findall(out.stderr)]
    assert len(turns) == 2, out.stderr
    (prefill_1, new_1, reused_1), (prefill_2, new_2, reused_2) = turns
    assert prefill_1 == new_1 == len(prompt) and reused_1 == 0
    # Turn 2 reuses all of turn 1 (prompt and reply) and prefills only its new tokens plus the reply's
    # last token, which was sampled but never fed back.
    assert reused_2 == len(prompt) + len(reply_ids) and prefill_2 == new_2 + 1
    assert "session reset" not in out.stderr


def test_commands_and_fallback_format(folder, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    out = run_chat(plain, "--max-new-tokens", 4, "--seed", 1, stdin="hi\n/stats\n/plan\n/reset\nagain\n/bogus\n/quit\nnot read\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("no chat template") == 1
    assert "reused 0 tokens" in out.stdout                    # /stats after the first turn
    assert "no offloading plan" in out.stdout or "GPU" in out.stdout   # /plan
    assert "(new conversation)" in out.stdout and "unknown command /bogus" in out.stdout


def test_demo_runs():
    out = run_chat("--demo", "--max-new-tokens", 5, "--show-plan", stdin="Hello!\n")
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stderr and "replies are random" in out.stderr
    assert out.stdout.strip()


def bad_folders(folder, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(folder, no_tokenizer)
    (no_tokenizer / "tokenizer.json").unlink()
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(folder, gpt2)
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "vocab_size": 400}))
    mistral = tmp_path / "mistral"
    shutil.copytree(folder, mistral)
    (mistral / "chat_template.jinja").write_text(templates.MISTRAL)
    return {
        "missing folder": ([tmp_path / "nowhere"], "nowhere: no such file or folder"),
        "no tokenizer.json": ([no_tokenizer], "no tokenizer.json"),
        "unsupported model": ([gpt2], "unsupported model_type 'gpt2'"),
        "system prompt the template refuses": ([mistral, "--system", "Be kind."], "rejects a system message"),
        "no model and no --demo": ([], "give a MODEL_DIR or --demo"),
        "missing draft": ([folder, "--draft", tmp_path / "nowhere"], "draft " + str(tmp_path / "nowhere")),
        "draft quantized without a draft": ([folder, "--draft-quantize", "int4"], "give --draft MODEL too"),
    }


@pytest.mark.parametrize("case", ["missing folder", "no tokenizer.json", "unsupported model",
                                  "system prompt the template refuses", "no model and no --demo", "missing draft",
                                  "draft quantized without a draft"])
def test_bad_input_exits_2_with_one_line(folder, tmp_path, case):
    args, message = bad_folders(folder, tmp_path)[case]
    out = run_chat(*args, stdin="hi\n")
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_budget_too_small(folder):
    out = run_chat(folder, "--gpu-memory", "1KiB", "--cpu-memory", "1KiB", stdin="hi\n")
    assert out.returncode == 2 and "Traceback" not in out.stderr and out.stdout == ""
    errors = [line for line in out.stderr.splitlines() if line.startswith("chat.py: error: ")]
    assert len(errors) == 1 and any(unit in errors[0] for unit in ("KiB", "MiB", "GiB"))
