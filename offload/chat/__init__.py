"""Chat pieces shared by `offload chat`, `offload generate`, examples/chat.py and the tests: a model's tokenizer
and chat template (`open_chat`), incremental detokenisation for streaming, and the multi-turn state that feeds a
session only the new tokens. Uses `tokenizers` and `jinja2`, imported only when used."""
from .conversation import ContextFullError, Conversation, TurnInput
from .detokenizer import IncrementalDetokenizer
from .open import MODEL_KINDS, ChatFiles, open_chat
from .template import ChatTemplate, ChatTemplateError, find_chat_template
from .tokenizer import ChatSetupError, ChatTokenizer
from .turn import TurnResult, run_turn

__all__ = ["ChatFiles", "MODEL_KINDS", "open_chat", "ChatSetupError", "ChatTemplate", "ChatTemplateError", "ChatTokenizer", "ContextFullError",
           "Conversation", "IncrementalDetokenizer", "TurnInput", "TurnResult", "find_chat_template", "run_turn"]
