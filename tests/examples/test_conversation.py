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


def test_template_that_rewrites_history_truncates_to_the_common_token_prefix(folder, model):
    tokenizer = ChatTokenizer.from_dir(folder)
    counting = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}" \
               "[{{ messages | length }} messages]{% if add_generation_prompt %}assistant:{% endif %}"
    conversation = Conversation(tokenizer, ChatTemplate(counting, tokenizer.special_tokens),
                                max_context=model.max_seq_len)
    session = model.session()
    turn(session, conversation, tokenizer, "one")
    held = session.tokens
    second, _ = turn(session, conversation, tokenizer, "two")
    full = tokenizer.encode(conversation.template.render(conversation.messages[:-1]))
    common = 0
    while common < min(len(held), len(full)) and held[common] == full[common]:
        common += 1
    assert 0 < common < len(held)                         # the count moved: the tail is re-rendered
    assert not second.turn.is_reset and "differently" in second.turn.reason and "truncated" in second.turn.reason
    assert second.turn.num_reused_tokens == common and second.turn.num_dropped_tokens == len(held) - common
    assert second.turn.token_ids == full[common:]
    assert session.tokens[:len(full)] == full
    assert model.stats.num_prompt_tokens == len(full) - common   # only the tokens after the common prefix
    check_reply_against_transformers(folder, tokenizer, session, second)
    third, _ = turn(session, conversation, tokenizer, "three")   # and again, from the truncated session
    assert not third.turn.is_reset and third.turn.num_reused_tokens > 0
    check_reply_against_transformers(folder, tokenizer, session, third)


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


@pytest.mark.parametrize("where", ["prefill", "decode step 1", "decode step 5", "printing"])
def test_ctrl_c_at_any_moment_keeps_session_and_conversation_consistent(folder, model, chat, monkeypatch,
                                                                         where):
    """A real SIGINT (the default handler raising KeyboardInterrupt), delivered at a chosen moment of the
    turn: inside the session's prefill, inside a decode step, or while the reply is being printed."""
    import signal

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    tokenizer, conversation, session = chat
    turn(session, conversation, tokenizer, "hello")                  # a conversation to interrupt
    engine, calls = model.engine, []

    def interrupting(method, after_calls):
        def wrapper(*args, **kwargs):
            calls.append(method.__name__)
            if len(calls) == after_calls:
                signal.raise_signal(signal.SIGINT)                   # lands inside this engine call
            return method(*args, **kwargs)
        return wrapper

    on_text = None
    if where == "prefill":
        monkeypatch.setattr(engine, "prefill", interrupting(engine.prefill, 1))
    elif where.startswith("decode"):
        monkeypatch.setattr(engine, "decode", interrupting(engine.decode, int(where.split()[-1])))
    else:
        on_text = interrupting(lambda text: None, 3)
    kwargs = {"on_text": on_text} if on_text else {}
    result, printed = turn(session, conversation, tokenizer, "message", max_new_tokens=150, **kwargs)
    monkeypatch.undo()
    assert calls and result.stop_reason == "interrupted"
    assert printed in result.reply
    assert conversation.token_ids == session.tokens
    assert conversation.messages[-1]["content"] == result.reply.lstrip()
    last, _ = turn(session, conversation, tokenizer, "and now?")
    assert last.stop_reason != "interrupted"
    check_reply_against_transformers(folder, tokenizer, session, last)
