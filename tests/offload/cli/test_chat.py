"""`offload chat` as a user runs it: a subprocess with piped stdin, on tiny models made here and the real
SmolLM2."""
import json
import re
import shutil

import pytest

from offload.chat import ChatTokenizer
from tests.examples import templates
from tests.examples.builders import demo_model_dir, hf_greedy
from tests.offload.loading.test_gguf import smollm2_path

from .run import one_error_line, run_offload

STATS = re.compile(r"\[stats: prefill (\d+) tokens \((\d+) new\) in [\d.]+ s, reused (\d+) tokens")


def run_chat(*args, stdin="", timeout=300, script=False):
    return run_offload("chat", *args, stdin=stdin, timeout=timeout, script=script)


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
        "missing folder": ([tmp_path / "nowhere"], "nowhere: no such file or folder, and not a Hugging Face"),
        "no tokenizer.json": ([no_tokenizer], "no tokenizer.json"),
        "unsupported model": ([gpt2], "unsupported model_type 'gpt2'"),
        "system prompt the template refuses": ([mistral, "--system", "Be kind."], "rejects a system message"),
        "no model": ([], "the following arguments are required: MODEL"),
        "missing draft": ([folder, "--draft", tmp_path / "nowhere"], "draft " + str(tmp_path / "nowhere")),
        "draft quantized without a draft": ([folder, "--draft-quantize", "int4"], "give --draft MODEL too"),
        "draft tree without a draft model": ([folder, "--draft", "ngram", "--draft-tree"], "give --draft MODEL too"),
    }


@pytest.mark.parametrize("case", ["missing folder", "no tokenizer.json", "unsupported model",
                                  "system prompt the template refuses", "no model", "missing draft",
                                  "draft quantized without a draft", "draft tree without a draft model"])
def test_bad_input_exits_2_with_one_line(folder, tmp_path, case):
    args, message = bad_folders(folder, tmp_path)[case]
    out = run_chat(*args, stdin="hi\n")
    assert message in one_error_line(out, "offload chat")


def test_budget_too_small(folder):
    out = run_chat(folder, "--gpu-memory", "1KiB", "--cpu-memory", "1KiB", stdin="hi\n")
    assert any(unit in one_error_line(out, "offload chat") for unit in ("KiB", "MiB", "GiB"))


@pytest.mark.parametrize("options", [[], ["--gpu-memory", "400MB", "--cpu-memory", "2GiB"]],
                         ids=["one_device", "offloaded"])
def test_the_chat_command_answers_paris_from_the_gguf_file(options):
    out = run_chat(smollm2_path(), "--temperature", 0, "--max-new-tokens", 20, *options,
                   stdin="What is the capital of France?\n", script=not options)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_the_chat_command_with_a_draft_replies_as_without_it():
    """Greedy replies are the same with speculative decoding, with the n-gram draft or a draft model (here the
    file itself, held resident beside an offloaded copy; proposing chains, or trees with --draft-tree); --stats
    says how many drafted tokens were kept."""
    text = "Repeat exactly, then stop: one two three, one two three, one two three.\n"
    plain = run_chat(smollm2_path(), "--temperature", 0, "--max-new-tokens", 24, stdin=text)
    assert plain.returncode == 0 and "one two three" in plain.stdout, plain.stderr
    model_draft = ["--draft", str(smollm2_path()), "--gpu-memory", "850MB", "--max-seq-len", "512", "--show-plan"]
    for draft in (["--draft", "ngram"], model_draft, [*model_draft, "--draft-tree"]):
        drafted = run_chat(smollm2_path(), "--temperature", 0, "--max-new-tokens", 24, *draft, "--stats", stdin=text)
        assert drafted.returncode == 0, drafted.stderr
        assert drafted.stdout.endswith(plain.stdout) and "verification passes kept" in drafted.stderr
    assert "draft model: " in drafted.stdout and ", proposing token trees" in drafted.stdout
