"""Incremental detokenisation: text to print as token ids arrive one by one.

Decoding each token alone is wrong twice over: a byte-level BPE token can hold half of a multi-byte
UTF-8 character (decoded alone it is U+FFFD), and SentencePiece-style decoders strip the leading "▁"
space of the first token they see (decoded alone, " world" loses its space). So the growing id list is
decoded over a window that starts a few tokens back (`prefix_offset`), and only the text past what the
window already produced is emitted; while that text ends in U+FFFD the character is still incomplete
and is held back. The window restarts behind each emitted piece, so the cost per token stays constant.
"""
from __future__ import annotations

from os.path import commonprefix

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """`push(token_id) -> str` gives the new stable text; `flush() -> str` what was held back.

    `context_ids` are tokens already in front of the first pushed one (e.g. the end of the prompt); they
    are never emitted, but they make the first pushed token decode as it does mid-text (with its space)."""

    def __init__(self, tokenizer, context_ids: list[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer                     # anything with decode(ids, skip_special_tokens=)
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context_ids)[-6:]   # a few tokens of context are enough for any decoder
        self.num_context = len(self.ids)
        self.prefix_offset = 0                         # window start
        self.read_offset = len(self.ids)               # end of the text already emitted
        self.text = ""                                 # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes ('' while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        if not window_text.startswith(prefix_text):   # a decoder that rewrote earlier text: resync
            new_text = window_text[len(commonprefix([prefix_text, window_text])):]
        else:
            new_text = window_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += new_text
        return new_text

    def flush(self) -> str:
        """The text still held back (an incomplete character at the end decodes as U+FFFD, as in a
        full decode); afterwards `text` equals the decode of all pushed ids in context."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        new_text = window_text[len(commonprefix([prefix_text, window_text])):]
        self.prefix_offset = self.read_offset = len(self.ids)
        self.text += new_text
        return new_text

    @property
    def token_ids(self) -> list[int]:
        """The pushed ids (without the context)."""
        return self.ids[self.num_context:]

