"""Chat templates: found in a model folder and rendered with jinja2 the way transformers renders them.

transformers compiles a template in an `ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True)` with the `loopcontrols` extension, a `tojson` filter that does not escape HTML,
and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`; it passes `messages`,
`add_generation_prompt` and the named special tokens (`bos_token`, `eos_token`, ...), and tokenizes the
result with `add_special_tokens=False`. Templates from the Hub are untrusted code: the sandbox is why.
`jinja2` is the `chat` extra: imported when a template is compiled.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from .tokenizer import ChatSetupError, read_json

CHAT_TEMPLATE_FILE = "chat_template.jinja"      # transformers >= 4.50 saves the default template here


class ChatTemplateError(ValueError):
    """A template raised (`raise_exception`) or failed to render; the message is the template's."""


def find_chat_template(model_dir: str | Path) -> str | None:
    """The folder's default chat template, or None. `chat_template.jinja` wins over the
    `chat_template` entry of tokenizer_config.json (a string, or a list of {name, template})."""
    model_dir = Path(model_dir)
    path = model_dir / CHAT_TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if "default" in named:
            return named["default"]
        raise ChatSetupError(f"{model_dir / 'tokenizer_config.json'}: chat_template lists "
                             f"{sorted(map(str, named))} but no 'default' template")
    raise ChatSetupError(f"{model_dir / 'tokenizer_config.json'}: chat_template must be a string or a list "
                         f"of {{name, template}}, got {type(value).__name__}")


@lru_cache(maxsize=16)
def compile_template(source: str):
    """A jinja2 Template compiled in transformers' sandboxed environment."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatSetupError("chat templates need the `jinja2` package: pip install -e '.[chat]'") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = dict
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise ChatSetupError(f"the chat template does not compile: {error}") from None


class ChatTemplate:
    """Renders a conversation (a list of {"role", "content"} dicts) to the prompt text."""

    def __init__(self, source: str | None, special_tokens: dict[str, str] | None = None):
        self.source = source                        # None: the plain "User:/Assistant:" format
        self.special_tokens = dict(special_tokens or {})
        if source is not None:
            compile_template(source)                # fail now, not at the first message

    @property
    def is_fallback(self) -> bool:
        return self.source is None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`; keys whose value is None are dropped (as transformers does)."""
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        if self.source is None:
            return render_plain(messages, add_generation_prompt, self.special_tokens.get("bos_token"),
                                self.special_tokens.get("eos_token"))
        import jinja2
        try:
            return compile_template(self.source).render(messages=messages,
                                                        add_generation_prompt=add_generation_prompt,
                                                        **self.special_tokens)
        except jinja2.exceptions.TemplateError as error:
            raise ChatTemplateError(str(error)) from None


PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_plain(messages: list[dict], add_generation_prompt: bool, bos_token: str | None,
                 eos_token: str | None = None) -> str:
    """The format for models without a template: "System: ...", "User: ...", "Assistant: ..." turns,
    a blank line between them, starting with the BOS token when the tokenizer has one. An assistant turn
    ends with the EOS token (what the model produces to end its reply), so the text of a finished reply
    stays a prefix of the next rendering."""
    turns = [f"{PLAIN_ROLES.get(m['role'], m['role'].capitalize())}: {m.get('content', '')}"
             + ((eos_token or "") if m["role"] == "assistant" else "") for m in messages]
    text = (bos_token or "") + "\n\n".join(turns)
    if add_generation_prompt:
        text += ("\n\n" if turns else "") + "Assistant:"
    return text
