"""A .gguf file is all the chat script needs: its tokenizer and chat template come from the metadata.
Against transformers' own GGUF tokenizer, and the real SmolLM2-135M answering as a user runs it."""
from __future__ import annotations

import pytest

from offload.chat import ChatSetupError, ChatTemplate
from offload.chat.gguf_tokenizer import tokenizer_from_gguf
from tests.offload.loading.test_gguf import smollm2_path

from .test_chat_script import run_chat

TEXTS = ["What is the capital of France?", "Hello,   world!\n\nNew line 12345 and 3.14",
         "<|im_start|>user\nHi there<|im_end|>\n", "Ünïcödé ☃ emoji 🤖 tab\tend", "don't you'll we've",
         "    indented code():\n\treturn x**2 # comment"]


def test_gguf_tokenizer_and_template_are_transformers(tmp_path):
    from transformers import AutoTokenizer
    path = smollm2_path()
    ours, template_text = tokenizer_from_gguf(path)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    template = ChatTemplate(template_text, ours.special_tokens)
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert template.render(messages, add_generation_prompt=True) == want
    assert ours.stop_token_ids == [reference.convert_tokens_to_ids("<|im_end|>")]
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGUF but not really")
    with pytest.raises(ChatSetupError, match="x.gguf: not a readable GGUF file"):
        tokenizer_from_gguf(not_gguf)


@pytest.mark.parametrize("options", [[], ["--gpu-memory", "400MB", "--cpu-memory", "2GiB"]],
                         ids=["one_device", "offloaded"])
def test_the_chat_script_answers_paris_from_the_gguf_file(options):
    out = run_chat(smollm2_path(), "--temperature", 0, "--max-new-tokens", 20, *options,
                   stdin="What is the capital of France?\n", timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_the_chat_script_with_a_draft_replies_as_without_it():
    """Greedy replies are the same with speculative decoding, with the n-gram draft or a draft model (here the
    file itself, held resident beside an offloaded copy); --stats says how many drafted tokens were kept."""
    text = "Repeat exactly, then stop: one two three, one two three, one two three.\n"
    plain = run_chat(smollm2_path(), "--temperature", 0, "--max-new-tokens", 24, stdin=text, timeout=300)
    assert plain.returncode == 0 and "one two three" in plain.stdout, plain.stderr
    model_draft = ["--draft", str(smollm2_path()), "--gpu-memory", "850MB", "--max-seq-len", "512", "--show-plan"]
    for draft in (["--draft", "ngram"], model_draft):
        drafted = run_chat(smollm2_path(), "--temperature", 0, "--max-new-tokens", 24, *draft, "--stats",
                           stdin=text, timeout=300)
        assert drafted.returncode == 0, drafted.stderr
        assert drafted.stdout.endswith(plain.stdout) and "verification passes kept" in drafted.stderr
    assert "draft model: " in drafted.stdout
