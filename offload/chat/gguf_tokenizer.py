"""A .gguf file's tokenizer and chat template, from its metadata: what `examples/chat.py model.gguf` needs.

Byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2": Llama 3, Qwen, SmolLM, ...) become a
`tokenizers` BPE with the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`; control and
user-defined tokens are special tokens. SentencePiece vocabularies ("llama": Llama 2, Mistral v0.1) are not
read yet: a clear ChatSetupError says so.
"""
from __future__ import annotations

from pathlib import Path

from offload.chat.tokenizer import ChatSetupError, ChatTokenizer

GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
               r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> (split digits one by one first, the regex), as llama.cpp's llama-vocab.cpp has them
PRE_TOKENIZERS = {"default": (False, GPT2_REGEX), "gpt2": (False, GPT2_REGEX), "smollm": (True, GPT2_REGEX),
                  "llama-bpe": (False, LLAMA3_REGEX), "llama3": (False, LLAMA3_REGEX), "qwen2": (False, QWEN2_REGEX)}
CONTROL, USER_DEFINED = 3, 4          # llama.cpp token types that are special


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tokenizer_from_gguf(path) -> tuple[ChatTokenizer, str | None]:
    """(the ChatTokenizer, the chat template or None) of the .gguf file at `path`."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as error:                        # noqa: BLE001
        raise ChatSetupError(f"{path}: not a readable GGUF file ({error})") from None
    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre") or "default"
    if kind != "gpt2":
        raise ChatSetupError(f"{path}: GGUF tokenizer model {kind!r} is not supported by the chat pieces yet "
                             "(supported: gpt2, the byte-level BPE of Llama 3, Qwen, SmolLM)")
    if pre not in PRE_TOKENIZERS:
        raise ChatSetupError(f"{path}: GGUF pre-tokenizer {pre!r} is not known; known: {', '.join(PRE_TOKENIZERS)}")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                     ignore_merges=pre in ("llama-bpe", "llama3")))
    split_digits, regex = PRE_TOKENIZERS[pre]
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    steps += [pre_tokenizers.Split(Regex(regex), behavior="isolated"),
              pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind_ in zip(tokens, types) if kind_ in (CONTROL, USER_DEFINED)])
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        index = _field(reader, f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            special[name] = tokens[int(index)]
    stop = [int(i) for i in (_field(reader, f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id"))
            if i is not None]
    return ChatTokenizer(tokenizer, special, stop), _field(reader, "tokenizer.chat_template")
