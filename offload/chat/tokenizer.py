"""A model folder's tokenizer: `tokenizer.json` through the `tokenizers` library, special tokens from
`tokenizer_config.json`, stop tokens from `config.json` / `generation_config.json`.

`tokenizers` is the `chat` extra: it is imported when a tokenizer is loaded, not when this module is.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from placement.jsonfile import read_json_object

# The named special tokens transformers passes to a chat template (`special_tokens_map`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                       "mask_token")


class ChatSetupError(ValueError):
    """A model folder the chat pieces cannot use; the message names the file and what would work."""


def read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist; ChatSetupError when unreadable."""
    return read_json_object(path, ChatSetupError) if path.is_file() else {}


def token_content(value: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a plain string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ChatSetupError(f"special token {value!r}: expected a string or an AddedToken dict with 'content'")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class ChatTokenizer:
    """Text <-> token ids for one model folder, with its named special tokens and stop ids."""

    def __init__(self, tokenizer, special_tokens: dict[str, str], stop_token_ids: list[int]):
        self.tokenizer = tokenizer                    # a tokenizers.Tokenizer
        self.special_tokens = dict(special_tokens)    # {"bos_token": "<s>", ...}, strings only
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids))

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ChatTokenizer":
        """Load `tokenizer.json` (required), `tokenizer_config.json`, `special_tokens_map.json`,
        `config.json` and `generation_config.json` (all optional) from a model folder."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ChatSetupError(f"{model_dir}: no tokenizer.json (a chat needs the fast-tokenizer "
                                 "file that Hugging Face model folders ship)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ChatSetupError("the chat pieces need the `tokenizers` package: pip install -e '.[chat]'") \
                from None
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the Rust side raises plain Exception subclasses
            raise ChatSetupError(f"{path}: cannot be read by the tokenizers library ({error})") from None
        config = read_json(model_dir / "tokenizer_config.json")
        legacy_map = read_json(model_dir / "special_tokens_map.json")
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = token_content(config.get(name, legacy_map.get(name)))
            if content is not None:
                special_tokens[name] = content
        stop_ids = []
        for source in (read_json(model_dir / "config.json"), read_json(model_dir / "generation_config.json")):
            stop_ids += _ids(source.get("eos_token_id"))
        eos = special_tokens.get("eos_token")
        if eos is not None and tokenizer.token_to_id(eos) is not None:
            stop_ids.append(tokenizer.token_to_id(eos))
        return cls(tokenizer, special_tokens, stop_ids)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Chat templates write their own BOS, so the default adds nothing
        (what transformers' apply_chat_template does)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_continuation(self, text: str) -> list[int]:
        """Token ids of `text` as it would be tokenized in the middle of a longer text.

        SentencePiece-style tokenizers prepend a "▁" to the start of the input; a continuation must not
        get one. Encoding behind a special token (which always splits) and dropping that token gives the
        ids the whole-text encoding would have after it."""
        anchor = self.bos_token or self.eos_token
        anchor_id = self.tokenizer.token_to_id(anchor) if anchor is not None else None
        if anchor_id is None:
            return self.encode(text)
        ids = self.encode(anchor + text)
        if not ids or ids[0] != anchor_id:
            return self.encode(text)
        return ids[1:]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

