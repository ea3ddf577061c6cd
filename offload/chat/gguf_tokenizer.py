"""A .gguf file's tokenizer and chat template, from its metadata: what `offload chat model.gguf` needs.

Built as transformers' own GGUF tokenizer is (`AutoTokenizer.from_pretrained(folder, gguf_file=name)`):

- byte-level BPE vocabularies (`tokenizer.ggml.model` "gpt2": Llama 3, Qwen, SmolLM, ...) become a
  `tokenizers` BPE with the pre-tokenizer llama.cpp uses for the file's `tokenizer.ggml.pre`; control and
  user-defined tokens are special tokens.
- SentencePiece vocabularies ("llama": Llama 2, Mistral v0.1, Gemma, Phi-3) become a BPE with byte
  fallback (the `<0xNN>` tokens) whose merges come from the file or, as llama.cpp's files carry none, from
  the scores: every split of a piece into two pieces, best score first. Spaces are "▁"; a "▁" is put in
  front of the text, as SentencePiece does, unless the file says `tokenizer.ggml.add_space_prefix` false
  (transformers ignores that flag; llama.cpp honours it). Gemma files never get one, and rank merges by
  token order; Phi-3 files put it in front of every piece of text between special tokens. Control tokens
  are special, user-defined ones are added tokens that decoding keeps.

`encode(text, add_special_tokens=True)` adds the BOS (EOS) that `tokenizer.ggml.add_bos_token`
(`add_eos_token`) asks for; SentencePiece files without the flag get a BOS, as in llama.cpp.
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
SUPPORTED = ("gpt2 (the byte-level BPE of Llama 3, Qwen, SmolLM), "
             "llama (the SentencePiece vocabulary of Llama 2, Mistral v0.1, Gemma, Phi-3)")
SPACE = "\u2581"                      # "▁", SentencePiece's space
GEMMA = ("gemma", "gemma2", "gemma3")
# the special tokens transformers' LlamaTokenizer / GemmaTokenizer mark special whenever the vocabulary has them
SPM_DEFAULT_SPECIALS = ("<unk>", "<s>", "</s>")
GEMMA_DEFAULT_SPECIALS = ("<unk>", "<bos>", "<eos>", "<pad>", "<mask>")
NAMED_TOKENS = (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                ("pad_token", "padding_token_id"))


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def tokenizer_from_gguf(path) -> tuple[ChatTokenizer, str | None]:
    """(the ChatTokenizer, the chat template or None) of the .gguf file at `path`."""
    from placement.gguf_file import gguf_reader
    path = Path(path)
    try:
        reader = gguf_reader(path)
    except Exception as error:                        # noqa: BLE001
        raise ChatSetupError(f"{path}: not a readable GGUF file ({error})") from None
    kind = _field(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise ChatSetupError(f"{path}: GGUF tokenizer model {kind!r} is not supported by the chat pieces "
                             f"(supported: {SUPPORTED})")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ChatSetupError(f"{path}: GGUF tokenizer model {kind!r} without tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    special = {}
    for name, key in NAMED_TOKENS:
        index = _field(reader, f"tokenizer.ggml.{key}")
        if index is not None and 0 <= int(index) < len(tokens):
            special[name] = tokens[int(index)]
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(path, reader, tokens, types)
    else:
        tokenizer = _sentencepiece_bpe(path, reader, tokens, types, special)
    _add_bos_eos(tokenizer, reader, special, default_bos=kind == "llama")
    stop = [int(i) for i in (_field(reader, f"tokenizer.ggml.{key}") for key in ("eos_token_id", "eot_token_id"))
            if i is not None]
    return ChatTokenizer(tokenizer, special, stop), _field(reader, "tokenizer.chat_template")


def _byte_level_bpe(path: Path, reader, tokens: list[str], types: list[int]):
    """The tokenizers.Tokenizer of a "gpt2" vocabulary: the file's merges, llama.cpp's pre-tokenizer regex."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    pre = _field(reader, "tokenizer.ggml.pre") or "default"
    if pre not in PRE_TOKENIZERS:
        raise ChatSetupError(f"{path}: GGUF pre-tokenizer {pre!r} is not known; known: {', '.join(PRE_TOKENIZERS)}")
    merges = [tuple(m.split(" ", 1)) for m in (_field(reader, "tokenizer.ggml.merges") or [])]
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
    return tokenizer


def _sentencepiece_bpe(path: Path, reader, tokens: list[str], types: list[int], named: dict[str, str]):
    """The tokenizers.Tokenizer of a "llama" (SentencePiece) vocabulary, as transformers builds it for the
    file's architecture: Gemma, Phi-3, or the Llama one every other architecture gets."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
    architecture = _field(reader, "general.architecture")
    prefix = _field(reader, "tokenizer.ggml.add_space_prefix") is not False
    if architecture in GEMMA:
        # multi-space tokens are stored as spaces but looked up as "▁"s; merges rank by token order
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        rank = {t: -i for i, t in enumerate(tokens)}
        defaults, prefix = GEMMA_DEFAULT_SPECIALS, False
    else:
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ChatSetupError(f"{path}: GGUF tokenizer model 'llama' needs one tokenizer.ggml.scores value per "
                                 f"token ({len(tokens)}), found {'none' if scores is None else len(scores)}")
        rank = dict(zip(tokens, scores))
        defaults = SPM_DEFAULT_SPECIALS
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _field(reader, "tokenizer.ggml.merges")
    merges = [tuple(m.split(" ", 1)) for m in merges] if merges else _merges_from_ranks(vocab, rank)
    unk = "<unk>" if architecture in GEMMA and "<unk>" in vocab else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    if architecture in GEMMA:
        tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    elif architecture == "phi3":                    # the "▁" in front of every piece between special tokens
        steps = [normalizers.Prepend(SPACE)] if prefix else []
        tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    else:                                           # the "▁" in front of the text only
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, split=False,
                                                           prepend_scheme="first" if prefix else "never")
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    # transformers' order: its class's defaults and control tokens special, user-defined ones not, then
    # the file's named tokens special unless already added
    added = {t: True for t in defaults if t in vocab}
    added.update({t: kind == CONTROL for t, kind in zip(tokens, types) if kind in (CONTROL, USER_DEFINED)})
    for token in named.values():
        added.setdefault(token, True)
    tokenizer.add_tokens([AddedToken(t, special=is_special, normalized=False) for t, is_special in added.items()])
    return tokenizer


def _merges_from_ranks(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """The merges a vocabulary without any implies (transformers' generate_merges): each way to cut a piece
    into two pieces of the vocabulary, by the piece's rank (highest first), then longer left, longer right
    part; equal keys keep the token order."""
    found = [(value, piece[:i], piece[i:]) for piece, value in rank.items() for i in range(1, len(piece))
             if piece[:i] in vocab and piece[i:] in vocab]
    found.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(left, right) for _, left, right in found]


def _add_bos_eos(tokenizer, reader, special: dict[str, str], default_bos: bool) -> None:
    """The post-processor that adds the BOS / EOS the file asks for when encoding with special tokens."""
    from tokenizers import processors

    def wanted(flag: str, name: str, default: bool) -> list[str]:
        value = _field(reader, f"tokenizer.ggml.{flag}")
        return [special[name]] if (default if value is None else value) and name in special else []
    bos, eos = wanted("add_bos_token", "bos_token", default_bos), wanted("add_eos_token", "eos_token", False)
    if not bos + eos:
        return
    single = " ".join([f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos])
    pair = " ".join([single] + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(bos + eos)])
