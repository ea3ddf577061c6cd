"""Multi-turn chat over a real session: only new tokens are prefilled, the replies are what transformers'
Llama generates from the whole conversation, Ctrl-C keeps the partial reply and a consistent cache."""
import pytest

import offload
from offload.chat import (ChatTemplate, ChatTokenizer, ContextFullError, Conversation, find_chat_template,
                          run_turn)

from .builders import demo_model_dir, hf_greedy

MAX_NEW = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return demo_model_dir(tmp_path_factory.mktemp("demo") / "tiny")


@pytest.fixture(scope="module")
def model(folder):
    return offload.load(str(folder), max_seq_len=256, progress=False)


@pytest.fixture
def chat(folder, model):
    tokenizer = ChatTokenizer.from_dir(folder)
    template = ChatTemplate(find_chat_template(folder), tokenizer.special_tokens)
    conversation = Conversation(tokenizer, template, max_context=model.max_seq_len, system="Be brief.")
    return tokenizer, conversation, model.session()


def turn(session, conversation, tokenizer, text, **kwargs):
    pieces = []
    result = run_turn(session, conversation, text, max_new_tokens=kwargs.pop("max_new_tokens", MAX_NEW),
                      on_text=kwargs.pop("on_text", pieces.append), stop_token_ids=tokenizer.stop_token_ids,
                      temperature=0, **kwargs)
    return result, "".join(pieces)


def check_reply_against_transformers(folder, tokenizer, session, result):
    """The reply equals transformers' greedy continuation of everything before it."""
    ids = session.tokens
    reply_ids = ids[len(ids) - result.num_generated_tokens:]
    prompt_ids = ids[:len(ids) - result.num_generated_tokens]
    assert reply_ids == hf_greedy(folder, prompt_ids, len(reply_ids), tokenizer.stop_token_ids)


def test_second_turn_prefills_only_new_tokens(folder, model, chat):
    tokenizer, conversation, session = chat
    first, printed = turn(session, conversation, tokenizer, "Hello there!")
    assert first.turn.is_reset is False and first.turn.num_reused_tokens == 0
    assert first.turn.token_ids == tokenizer.encode(conversation.template.render(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]))
    assert printed == first.reply and first.num_generated_tokens > 0
    check_reply_against_transformers(folder, tokenizer, session, first)
    held = session.tokens

    second, _ = turn(session, conversation, tokenizer, "Tell me about café and 東京.")
    assert not second.turn.is_reset and second.turn.num_reused_tokens == len(held)
    assert session.tokens[:len(held)] == held
    # The prefill is this turn's new tokens plus the previous reply's last token (sampled, never fed back
    # through the model); nothing of the earlier conversation is recomputed.
    assert model.stats.num_prompt_tokens == len(second.turn.token_ids) + 1
    check_reply_against_transformers(folder, tokenizer, session, second)
    # The new tokens are the rendering of the whole conversation past what the session held.
    assert conversation.text.startswith(conversation.template.render(conversation.messages[:-1]))
    assert [m["role"] for m in conversation.messages] == ["system", "user", "assistant", "user", "assistant"]


def test_interrupted_reply_is_kept_and_the_conversation_goes_on(folder, model, chat):
    tokenizer, conversation, session = chat
    seen = []

    def interrupt_after_three(text):
        seen.append(text)
        if len(seen) == 3:
            raise KeyboardInterrupt

    result, _ = turn(session, conversation, tokenizer, "Hello!", on_text=interrupt_after_three,
                     max_new_tokens=40)
    assert result.stop_reason == "interrupted"
    assert 3 <= result.num_generated_tokens < 40
    assert conversation.messages[-1] == {"role": "assistant", "content": result.reply.lstrip()}
    assert conversation.token_ids == session.tokens
    second, _ = turn(session, conversation, tokenizer, "Go on.")
    assert not second.turn.is_reset and second.turn.num_reused_tokens > 0
    check_reply_against_transformers(folder, tokenizer, session, second)


def test_template_that_rewrites_history_falls_back_to_full_prefill(folder, model):
    tokenizer = ChatTokenizer.from_dir(folder)
    counting = "[{{ messages | length }} messages]{% for m in messages %}{{ m.role }}: {{ m.content }}\n" \
               "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    conversation = Conversation(tokenizer, ChatTemplate(counting, tokenizer.special_tokens),
                                max_context=model.max_seq_len)
    session = model.session()
    turn(session, conversation, tokenizer, "one")
    second, _ = turn(session, conversation, tokenizer, "two")
    assert second.turn.is_reset and "differently" in second.turn.reason
    assert second.turn.token_ids == tokenizer.encode(conversation.template.render(conversation.messages[:-1]))
    assert model.stats.num_prompt_tokens == len(second.turn.token_ids)
    check_reply_against_transformers(folder, tokenizer, session, second)


def test_context_full_leaves_the_conversation_unchanged(folder):
    small = offload.load(str(folder), max_seq_len=64, progress=False)
    tokenizer = ChatTokenizer.from_dir(folder)
    conversation = Conversation(tokenizer, ChatTemplate(find_chat_template(folder), tokenizer.special_tokens),
                                max_context=small.max_seq_len)
    session = small.session()
    first, _ = turn(session, conversation, tokenizer, "Hello", max_new_tokens=100)
    assert len(session.tokens) <= 64 and first.is_context_exhausted
    before = (list(conversation.messages), list(conversation.token_ids))
    with pytest.raises(ContextFullError, match="/reset"):
        turn(session, conversation, tokenizer, "and now a much longer message " * 3)
    assert (conversation.messages, conversation.token_ids) == before
    conversation.reset()
    session.reset()
    again, _ = turn(session, conversation, tokenizer, "Hello", max_new_tokens=100)
    assert again.reply == first.reply


def test_ctrl_c_at_any_moment_keeps_session_and_conversation_consistent(folder, model, chat):
    """A real SIGINT, landing wherever it lands (prefill, a decode step inside the session, printing)."""
    import signal
    import threading

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    tokenizer, conversation, session = chat
    for i, delay in enumerate((0.0005, 0.01, 0.04)):
        before = (list(conversation.messages), list(conversation.token_ids))
        timer = threading.Timer(delay, signal.raise_signal, (signal.SIGINT,))
        timer.start()
        try:
            result, printed = turn(session, conversation, tokenizer, f"message {i}", max_new_tokens=150)
        except KeyboardInterrupt:   # landed before the turn began: nothing changed
            assert (conversation.messages, conversation.token_ids) == before
            continue
        finally:
            timer.join()
        assert result.stop_reason == "interrupted" and printed in result.reply
        assert conversation.token_ids == session.tokens
        assert conversation.messages[-1]["content"] == result.reply.lstrip()
    last, _ = turn(session, conversation, tokenizer, "and now?")
    assert last.stop_reason != "interrupted"
    check_reply_against_transformers(folder, tokenizer, session, last)
