"""One chat turn against a session: feed the new tokens, stream the reply as text, survive Ctrl-C."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .conversation import Conversation, TurnInput
from .detokenizer import IncrementalDetokenizer


@dataclass
class TurnResult:
    """What one turn did (the model's own timings are in `model.stats`)."""

    reply: str                      # the reply's text (also when cut short)
    num_generated_tokens: int
    turn: TurnInput                 # what was fed: new, reused and dropped tokens, reset and why
    stop_reason: str                # "stop" (a stop token), "length" (max_new_tokens) or "interrupted"
    requested_max_new_tokens: int   # what the caller asked for (turn.max_new_tokens may be capped)

    def __post_init__(self):
        if self.stop_reason not in ("stop", "length", "interrupted"):
            raise ValueError(f"unknown stop_reason {self.stop_reason!r}")

    @property
    def is_context_exhausted(self) -> bool:
        """The reply stopped because the context had no room left (not the user's max_new_tokens)."""
        return self.stop_reason == "length" and self.num_generated_tokens >= self.turn.max_new_tokens and \
            self.turn.max_new_tokens < self.requested_max_new_tokens


def run_turn(session, conversation: Conversation, user_text: str, *, max_new_tokens: int,
             on_text: Callable[[str], None] = lambda text: None, stop_token_ids=(), **sampling) -> TurnResult:
    """Add `user_text` to the conversation, stream the reply through `on_text` piece by piece, record it.

    `sampling` goes to `session.stream` (temperature, top_k, top_p, seed). Ctrl-C (KeyboardInterrupt)
    while the reply streams ends the turn: the partial reply is kept in the conversation, and the session
    counts exactly the tokens it processed, so the next turn goes on from there. Raises ContextFullError
    or ChatTemplateError before touching the session."""
    turn = conversation.begin_turn(user_text, session.tokens, max_new_tokens)   # Ctrl-C here: no change
    num_before = len(conversation.token_ids)
    detokenizer = IncrementalDetokenizer(conversation.tokenizer, context_ids=conversation.token_ids)
    stream, stop_reason = None, "length"
    try:
        if turn.is_reset:
            session.reset()
        elif turn.num_dropped_tokens:
            session.truncate(turn.num_reused_tokens)   # the template re-rendered the tail differently
        stream = session.stream(turn.token_ids, max_new_tokens=turn.max_new_tokens,
                                stop_token_ids=list(stop_token_ids), **sampling)
        for token_id in stream:
            on_text(detokenizer.push(token_id))
            if token_id in stop_token_ids:
                stop_reason = "stop"
        on_text(detokenizer.flush())
    except KeyboardInterrupt:
        stop_reason = "interrupted"
        if stream is not None:
            stream.close()          # the session records what its cache holds
    except BaseException:
        conversation.abort_turn()   # e.g. the session refused the request: the next turn resyncs
        raise
    session_ids = session.tokens
    reply = conversation.end_turn(session_ids)
    return TurnResult(reply=reply, num_generated_tokens=max(0, len(session_ids) - num_before), turn=turn,
                      stop_reason=stop_reason, requested_max_new_tokens=max_new_tokens)
