"""Multi-turn chat state: which tokens to give a session so that each turn prefills only what is new.

Each turn the whole conversation is rendered with the chat template (that is the only text the template
defines) and compared, as TEXT, with the text of the tokens the session already holds: the rendered
prompts it was given plus the reply tokens it generated, decoded in context (stop tokens written out).
When the rendering starts with that text, only the rest is tokenized and given; the replies keep the
exact tokens the model produced (re-tokenizing a reply would rarely give the same ids). When it does not
(templates are not always prefix-stable: some strip or rewrite earlier turns, some put a space before
the end-of-turn token the model produced), the whole rendering is tokenized and compared, as TOKEN ids,
with what the session holds: the session is truncated to the longest common prefix (its cache for those
positions is exactly what a fresh prefill of them would give) and only the rest is prefilled; the turn
says why (a reset when nothing is in common).

The session's `tokens` are the authority on what it holds (also after Ctrl-C cut a reply short: what
was generated up to then is the reply), so a turn is `begin_turn(text, session.tokens)`, stream,
`end_turn(session.tokens)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from os.path import commonprefix

from .template import ChatTemplate
from .tokenizer import ChatTokenizer

CONTEXT_WINDOW_TOKENS = 8   # tokens of context decoded with a reply so it decodes as it does mid-text


class ContextFullError(ValueError):
    """The conversation no longer fits the model's context; the message offers /reset."""


@dataclass
class TurnInput:
    """What one turn gives the session."""

    token_ids: list[int]            # for session.stream, after session.truncate(num_reused_tokens)
    is_reset: bool                  # the session's conversation is dropped entirely first
    num_reused_tokens: int          # leading tokens of the session's conversation kept as they are
    max_new_tokens: int             # the reply's budget, capped by the room left in the context
    reason: str | None = None       # why the session was reset or truncated (for --stats / debug output)
    num_dropped_tokens: int = 0     # trailing tokens of the session's conversation dropped first

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("a turn must give at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_reused_tokens < 0 or self.num_dropped_tokens < 0:
            raise ValueError(f"token counts must be >= 0, got num_reused_tokens={self.num_reused_tokens}, "
                             f"num_dropped_tokens={self.num_dropped_tokens}")
        if self.is_reset and self.num_reused_tokens:
            raise ValueError(f"a reset turn reuses no tokens, got num_reused_tokens={self.num_reused_tokens}")


def in_context_text(tokenizer: ChatTokenizer, context_ids: list[int], ids: list[int],
                    skip_special_tokens: bool = False) -> str:
    """The text `ids` add after `context_ids`, e.g. " world" where decoding alone gives "world"."""
    context_ids = list(context_ids)[-CONTEXT_WINDOW_TOKENS:]
    before = tokenizer.decode(context_ids, skip_special_tokens=skip_special_tokens)
    after = tokenizer.decode(context_ids + list(ids), skip_special_tokens=skip_special_tokens)
    if after.startswith(before):
        return after[len(before):]
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class Conversation:
    """The messages of one chat and the exact text of the token ids its session holds."""

    def __init__(self, tokenizer: ChatTokenizer, template: ChatTemplate, max_context: int,
                 system: str | None = None):
        if max_context < 2:
            raise ValueError(f"max_context must be >= 2, got {max_context}")
        self.tokenizer = tokenizer
        self.template = template
        self.max_context = max_context
        self.system = system
        self.reset()

    def reset(self) -> None:
        """A new conversation (the caller resets its session too)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.token_ids: list[int] = []   # what the session holds, as far as this conversation knows
        self.text = ""                   # the exact text of token_ids
        self._turn: tuple | None = None  # (messages, token_ids, text) before the open turn

    def begin_turn(self, user_text: str, session_ids: list[int], max_new_tokens: int) -> TurnInput:
        """Add the user's message; say what to give the session. Raises ContextFullError or
        ChatTemplateError (e.g. a template that insists on alternating roles), changing nothing."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        rendered = self.template.render(messages, add_generation_prompt=True)
        session_ids, reason = list(session_ids), None
        if session_ids != self.token_ids:
            reason = "the session holds other tokens than this conversation"
        elif not rendered.startswith(self.text):
            reason = "the chat template renders the earlier turns differently now"
        if reason is None:
            kept_ids = self.token_ids
            new_ids = self.tokenizer.encode_continuation(rendered[len(self.text):]) if kept_ids else \
                self.tokenizer.encode(rendered)
        else:
            # Keep the longest common token prefix (at least one token is left to feed).
            full_ids = self.tokenizer.encode(rendered)
            num_common = len(commonprefix([session_ids, full_ids[:-1]]))
            kept_ids, new_ids = full_ids[:num_common], full_ids[num_common:]
            if num_common:
                reason += f"; truncated the session to the {num_common} leading tokens in common"
        total = len(kept_ids) + len(new_ids)
        if total >= self.max_context or not new_ids:
            raise ContextFullError(f"the conversation would need {total} tokens and the context holds "
                                   f"{self.max_context}: type /reset to start a new conversation")
        is_reset = reason is not None and not kept_ids
        turn = TurnInput(token_ids=new_ids, is_reset=is_reset, num_reused_tokens=len(kept_ids),
                         max_new_tokens=min(max_new_tokens, self.max_context - total), reason=reason,
                         num_dropped_tokens=len(session_ids) - len(kept_ids))
        self._turn = (self.messages, self.token_ids, self.text)
        self.messages, self.token_ids, self.text = messages, kept_ids + new_ids, rendered
        return turn

    def end_turn(self, session_ids: list[int]) -> str:
        """Record the reply from the session's tokens (complete, or cut short by Ctrl-C); return its text.
        The reply's stop token, if any, stays in the history: templates write the same token there."""
        if self._turn is None:
            raise RuntimeError("end_turn without begin_turn")
        self._turn = None
        session_ids = list(session_ids)
        if session_ids[:len(self.token_ids)] != self.token_ids:
            # Nothing of this turn reached the session (e.g. it failed before prefill): start afresh next
            # turn, keeping the messages.
            self.token_ids, self.text = [], ""
            reply_ids = []
        else:
            reply_ids = session_ids[len(self.token_ids):]
        reply = in_context_text(self.tokenizer, self.token_ids, reply_ids, skip_special_tokens=True)
        if self.token_ids:
            self.text += in_context_text(self.tokenizer, self.token_ids, reply_ids)
            self.token_ids = self.token_ids + reply_ids
        # Leading whitespace is the token boundary's (" Hello" after "[/INST]"); trailing whitespace is kept
        # as generated, so templates that do not trim render exactly what the session holds.
        self.messages = self.messages + [{"role": "assistant", "content": reply.lstrip()}]
        return reply

    def abort_turn(self) -> None:
        """Forget the open turn (its user message included): for an error before the session ran."""
        if self._turn is not None:
            self.messages, self.token_ids, self.text = self._turn
            self._turn = None
