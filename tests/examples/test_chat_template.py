"""Chat templates render and tokenize exactly as transformers' apply_chat_template does."""
import json

import pytest

from offload.chat import ChatSetupError, ChatTemplate, ChatTemplateError, ChatTokenizer, find_chat_template

from . import templates
from .builders import tokenizer_dir, transformers_tokenizer

CONVERSATION = [
    {"role": "user", "content": "Hello! Café, 東京 and 🚀?"},
    {"role": "assistant", "content": "  Fine, thanks.\n"},
    {"role": "user", "content": "Tell me a <b>story</b> about \"quotes\"."},
]
SYSTEM = {"role": "system", "content": "You are terse."}

CASES = [  # (template, tokenizer style, conversations to render)
    ("LLAMA3", "llama3", [CONVERSATION, [SYSTEM] + CONVERSATION, CONVERSATION[:1]]),
    ("QWEN25", "chatml", [CONVERSATION, [SYSTEM] + CONVERSATION]),
    ("MISTRAL", "metaspace", [CONVERSATION, CONVERSATION[:1]]),
    ("LLAMA2", "metaspace", [CONVERSATION, [SYSTEM] + CONVERSATION]),
    ("DATED", "llama3", [CONVERSATION, [SYSTEM] + CONVERSATION]),
]


@pytest.mark.parametrize("name,style,conversations", CASES, ids=[c[0] for c in CASES])
def test_render_and_ids_match_transformers(tmp_path, name, style, conversations):
    source = getattr(templates, name)
    folder = tokenizer_dir(tmp_path, style, source)
    ours = ChatTokenizer.from_dir(folder)
    template = ChatTemplate(find_chat_template(folder), ours.special_tokens)
    theirs = transformers_tokenizer(folder)
    for messages in conversations:
        for add_generation_prompt in (True, False):
            text = template.render(messages, add_generation_prompt=add_generation_prompt)
            expected = theirs.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
            assert text == expected
            expected_ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False,
                                                      add_generation_prompt=add_generation_prompt)
            assert ours.encode(text) == list(expected_ids)
    if ours.bos_token is not None and ours.bos_token in text:
        # The template writes BOS itself: it is in the ids exactly once, not added a second time.
        bos_id = ours.tokenizer.token_to_id(ours.bos_token)
        assert ours.encode(template.render(conversations[0])).count(bos_id) == \
            template.render(conversations[0]).count(ours.bos_token)


@pytest.mark.parametrize("name", ["MISTRAL", "LLAMA2"])
def test_raise_exception_on_role_alternation(tmp_path, name):
    folder = tokenizer_dir(tmp_path, "metaspace", getattr(templates, name))
    template = ChatTemplate(find_chat_template(folder), ChatTokenizer.from_dir(folder).special_tokens)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        template.render(bad)
    with pytest.raises(Exception, match="alternate"):
        transformers_tokenizer(folder).apply_chat_template(bad, tokenize=False)


def test_template_sources_in_transformers_order(tmp_path):
    folder = tokenizer_dir(tmp_path, "llama3", None)
    assert find_chat_template(folder) is None
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"},
                               {"name": "default", "template": templates.LLAMA3}]
    config_path.write_text(json.dumps(config))
    assert find_chat_template(folder) == templates.LLAMA3
    assert transformers_tokenizer(folder).get_chat_template() == templates.LLAMA3
    (folder / "chat_template.jinja").write_text(templates.QWEN25)   # the file wins, as in transformers
    assert find_chat_template(folder) == templates.QWEN25
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    (folder / "chat_template.jinja").unlink()
    config_path.write_text(json.dumps(config))
    with pytest.raises(ChatSetupError, match="no 'default'"):
        find_chat_template(folder)


def test_special_tokens_plain_strings_and_added_token_dicts(tmp_path):
    folder = tokenizer_dir(tmp_path, "metaspace", None)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    assert isinstance(config["bos_token"], dict)
    assert ChatTokenizer.from_dir(folder).special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    config.update(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    config_path.write_text(json.dumps(config))
    tokenizer = ChatTokenizer.from_dir(folder)
    assert tokenizer.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert tokenizer.special_tokens == transformers_tokenizer(folder).special_tokens_map
    assert tokenizer.stop_token_ids == [tokenizer.tokenizer.token_to_id("</s>")]


def test_stop_ids_merge_config_generation_config_and_eos(tmp_path):
    folder = tokenizer_dir(tmp_path, "llama3", templates.LLAMA3)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tokenizer = ChatTokenizer.from_dir(folder)
    assert tokenizer.stop_token_ids == [1, 2, tokenizer.tokenizer.token_to_id("<|eot_id|>")]


def test_plain_format_without_template(tmp_path):
    folder = tokenizer_dir(tmp_path, "metaspace", None)
    tokenizer = ChatTokenizer.from_dir(folder)
    template = ChatTemplate(None, tokenizer.special_tokens)
    assert template.is_fallback
    text = template.render([SYSTEM] + CONVERSATION[:1])
    assert text == "<s>System: You are terse.\n\nUser: Hello! Café, 東京 and 🚀?\n\nAssistant:"
    assert tokenizer.encode(text)[0] == tokenizer.tokenizer.token_to_id("<s>")


def test_missing_tokenizer_and_bad_template(tmp_path):
    with pytest.raises(ChatSetupError, match="no tokenizer.json"):
        ChatTokenizer.from_dir(tmp_path)
    with pytest.raises(ChatSetupError, match="does not compile"):
        ChatTemplate("{% for x in %}")
