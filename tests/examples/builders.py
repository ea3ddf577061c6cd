"""Model folders for the example tests, built with offload.chat.demo (the builder --demo uses)."""
from pathlib import Path

from offload.chat import demo

CHATML_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tokenizer_dir(path: Path, style: str, chat_template: str | None) -> Path:
    """A folder with tokenizer.json + tokenizer_config.json only: 'llama3', 'chatml' (byte-level BPE) or
    'metaspace' (Llama-2/Mistral style)."""
    if style == "llama3":
        tok, bos, eos = demo.train_byte_level_bpe(), "<|begin_of_text|>", "<|eot_id|>"
    elif style == "chatml":
        tok, bos, eos = demo.train_byte_level_bpe(special_tokens=CHATML_SPECIAL_TOKENS), None, "<|im_end|>"
    elif style == "metaspace":
        tok, bos, eos = demo.train_metaspace_bpe(), "<s>", "</s>"
    else:
        raise ValueError(style)
    demo.write_tokenizer(path, tok, bos_token=bos, eos_token=eos, chat_template=chat_template)
    return path


def transformers_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path))
