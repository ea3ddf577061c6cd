"""Chat pieces shared by examples/chat.py and the tests: a model folder's tokenizer and chat template,
incremental detokenisation for streaming, and the multi-turn state that feeds a session only the new
tokens. Needs the `chat` extra (`tokenizers`, `jinja2`), imported only when used."""
from .conversation import ContextFullError, Conversation, TurnInput
from .detokenizer import IncrementalDetokenizer
from .template import ChatTemplate, ChatTemplateError, find_chat_template
from .tokenizer import ChatSetupError, ChatTokenizer
from .turn import TurnResult, run_turn

__all__ = ["ChatSetupError", "ChatTemplate", "ChatTemplateError", "ChatTokenizer", "ContextFullError",
           "Conversation", "IncrementalDetokenizer", "TurnInput", "TurnResult", "find_chat_template", "run_turn"]
