"""A .gguf file is all a chat needs: its tokenizer and chat template come from the metadata, as transformers' own
GGUF tokenizer reads them (the real SmolLM2-135M answering is in tests/offload/cli/test_chat.py)."""
from __future__ import annotations

import pytest

from offload.chat import ChatSetupError, ChatTemplate
from offload.chat.gguf_tokenizer import tokenizer_from_gguf
from tests.offload.loading.test_gguf import smollm2_path

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
