"""Streaming detokenisation gives exactly tokenizer.decode(all ids), piece by piece, never a broken
character, for byte-level BPE (characters split across tokens) and metaspace ("▁") tokenizers."""
import pytest

from offload.chat import ChatTokenizer, IncrementalDetokenizer
from offload.chat.detokenizer import REPLACEMENT_CHAR

from .builders import tokenizer_dir

TEXTS = [
    "Hello world, how are you?",
    "Café naïve déjà vu — señor über façade.",
    "東京は日本の首都です。你好，世界。 Привет, мир!",
    "Emoji 🙂🚀 and 👍🏽 with skin tone, 🇫🇷 flag, and ZWJ 👩‍💻 family.",
    "  leading spaces,\ttabs\nand new lines\n\n  indented",
    "ⅷ ∮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 never seen in training ✓",
]


@pytest.fixture(scope="module", params=["llama3", "metaspace"])
def tokenizer(request, tmp_path_factory):
    return ChatTokenizer.from_dir(tokenizer_dir(tmp_path_factory.mktemp(request.param), request.param, None))


@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == detok.text
    assert not any(REPLACEMENT_CHAR in p for p in pieces)
    assert detok.token_ids == ids


def test_characters_really_are_split_across_tokens(tokenizer):
    # The test above would prove little if every character were one token.
    ids = tokenizer.encode(TEXTS[5])
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS[:4])
def test_in_context_keeps_the_leading_space(tokenizer, text):
    prompt = "User: say something.\nAssistant:"
    prompt_ids = tokenizer.encode(prompt)
    reply_ids = tokenizer.encode_continuation(" " + text)
    assert tokenizer.decode(reply_ids) in (text, " " + text)      # alone, a metaspace decoder drops it
    detok = IncrementalDetokenizer(tokenizer, context_ids=prompt_ids)
    streamed = "".join(detok.push(i) for i in reply_ids) + detok.flush()
    assert streamed == " " + text
    assert tokenizer.decode(prompt_ids + reply_ids) == tokenizer.decode(prompt_ids) + streamed


def test_incomplete_character_is_held_then_flushed(tokenizer):
    ids = tokenizer.encode("a🛸")                       # not in the training text: split into bytes
    assert len(ids) > 2 and REPLACEMENT_CHAR in tokenizer.decode(ids[:-1])
    detok = IncrementalDetokenizer(tokenizer)
    out = [detok.push(i) for i in ids[:-1]]
    assert REPLACEMENT_CHAR not in "".join(out)
    assert "".join(out) + detok.flush() == tokenizer.decode(ids[:-1])   # a cut character stays U+FFFD


def test_special_tokens_are_not_printed(tokenizer):
    eos_id = tokenizer.stop_token_ids[0]
    ids = tokenizer.encode("fine") + [eos_id]
    detok = IncrementalDetokenizer(tokenizer)
    assert "".join(detok.push(i) for i in ids) + detok.flush() == "fine"
