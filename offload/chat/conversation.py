"""Multi-turn chat state: which tokens to feed a session so that each turn prefills only what is new.

Each turn the whole conversation is rendered with the chat template (that is the only text the template
defines), and compared, as TEXT, with the text of the tokens the session has already processed: the
rendered prompts it was fed plus the reply tokens it generated, decoded in context. When the rendering
starts with that text, only the rest is tokenized and fed; the reply keeps the exact tokens the model
produced (re-tokenizing it would rarely give the same ids). When it does not (templates are not always
prefix-stable: some strip or rewrite earlier turns), the session is reset and the whole conversation
prefilled, and the turn says why.

Tokens sampled but not yet processed (the last token of a reply, the stop token) are not in the KV
cache: their text is re-tokenized with the next turn's new text. The session's `num_tokens` says how
many were processed, which also makes an interrupted reply (Ctrl-C) continue correctly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .template import ChatTemplate
from .tokenizer import ChatTokenizer


class ContextFullError(ValueError):
    """The conversation no longer fits the model's context; the message offers /reset."""


@dataclass
class TurnInput:
    """What one turn feeds the session."""

    token_ids: list[int]            # to pass to session.stream (after session.reset() if is_reset)
    is_reset: bool                  # the session's cache must be dropped first
    num_reused_tokens: int          # tokens of the session's cache kept as they are
    max_new_tokens: int             # the reply's budget, capped by the room left in the context
    context_ids: list[int]          # the tokens just before the reply (to detokenize it in context)
    reason: str | None = None       # why the cache was not reused (for --stats / debug output)

    def __post_init__(self):
        if not self.token_ids:
            raise ValueError("a turn must feed at least one token")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class _Segment:
    """A run of the conversation's tokens and the exact text they stand for."""

    token_ids: list[int]
    text: str
    context_ids: list[int] = field(default_factory=list)   # set for generated runs: text is in context


def in_context_text(tokenizer: ChatTokenizer, context_ids: list[int], ids: list[int]) -> str:
    """The text `ids` add after `context_ids` (special tokens written out), e.g. " world" not "world"."""
    before = tokenizer.decode(context_ids, skip_special_tokens=False)
    after = tokenizer.decode(list(context_ids) + list(ids), skip_special_tokens=False)
    return after[len(before):] if after.startswith(before) else tokenizer.decode(ids, skip_special_tokens=False)


class Conversation:
    """Messages plus the token history a session holds for them.

    Per turn: `begin_turn(user_text, num_processed)` -> TurnInput; stream the reply; then
    `end_turn(reply_ids, reply_text, num_processed)` with whatever was received (also after Ctrl-C).
    `num_processed` is always the session's `num_tokens` at that moment."""

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
        self.segments: list[_Segment] = []
        self._pending: TurnInput | None = None

    @property
    def token_ids(self) -> list[int]:
        """Every token of the conversation so far: fed prompts and generated replies, in order."""
        return [t for s in self.segments for t in s.token_ids]

    def _processed_text(self, num_processed: int) -> tuple[list[int], str] | None:
        """(ids, text) of the first `num_processed` tokens, or None when that text is not known."""
        ids, text, left = [], "", num_processed
        for segment in self.segments:
            take = min(left, len(segment.token_ids))
            if take < len(segment.token_ids) and not segment.context_ids and take:
                return None                   # the session stopped inside a fed prompt
            part = segment.text if take == len(segment.token_ids) else \
                in_context_text(self.tokenizer, segment.context_ids, segment.token_ids[:take])
            ids += segment.token_ids[:take]
            text += part
            left -= take
            if left == 0:
                break
        return (ids, text) if left == 0 else None

    def begin_turn(self, user_text: str, num_processed: int, max_new_tokens: int) -> TurnInput:
        """Add the user's message and say what to feed. Raises ContextFullError (the conversation is
        left as it was) or ChatTemplateError (e.g. a template that insists on role alternation)."""
        messages = self.messages + [{"role": "user", "content": user_text}]
        rendered = self.template.render(messages, add_generation_prompt=True)
        known = self._processed_text(num_processed) if num_processed else ([], "")
        reason = None
        if known is None:
            reason = "the session stopped inside a prompt"
        elif known[1] and not rendered.startswith(known[1]):
            reason = "the template re-rendered earlier turns differently"
        if reason is None:
            kept_ids, kept_text = known
            new_text = rendered[len(kept_text):]
            new_ids = self.tokenizer.encode_continuation(new_text) if kept_ids else self.tokenizer.encode(new_text)
        else:
            kept_ids, kept_text, new_text = [], "", rendered
            new_ids = self.tokenizer.encode(rendered)
        total = len(kept_ids) + len(new_ids)
        if total >= self.max_context or not new_ids:
            raise ContextFullError(f"the conversation would take {total} tokens, the context holds "
                                   f"{self.max_context}: type /reset to start a new conversation")
        turn = TurnInput(token_ids=new_ids, is_reset=reason is not None,
                         num_reused_tokens=len(kept_ids),
                         max_new_tokens=min(max_new_tokens, self.max_context - total),
                         context_ids=(kept_ids + new_ids)[-8:], reason=reason)
        self._undo = (self.messages, self.segments)
        self.messages = messages
        self.segments = ([_Segment(list(kept_ids), kept_text)] if kept_ids else []) + [_Segment(new_ids, new_text)]
        self._pending = turn
        return turn

    def end_turn(self, reply_ids: list[int], reply_text: str) -> None:
        """Record the reply as received (complete, or cut short by Ctrl-C): its text joins the messages,
        its tokens the history. Stop tokens are kept in the history (the template writes its own)."""
        turn, self._pending = self._pending, None
        if turn is None:
            raise RuntimeError("end_turn without begin_turn")
        self.messages.append({"role": "assistant", "content": reply_text.strip()})
        if reply_ids:
            text = in_context_text(self.tokenizer, turn.context_ids, reply_ids)
            self.segments.append(_Segment(list(reply_ids), text, context_ids=list(turn.context_ids)))

    def abort_turn(self) -> None:
        """Forget the user message of a turn whose prefill never started (e.g. an error before it)."""
        if self._pending is not None:
            self._pending = None
            self.messages, self.segments = self._undo
