"""SentencePiece vocabularies in .gguf files (`tokenizer.ggml.model` "llama": Llama 2, Mistral v0.1, Gemma,
Phi-3): our tokenizer against transformers' own GGUF tokenizer, on small files the gguf package writes as
llama.cpp's converter does (scores, token types, `<0xNN>` byte tokens, no merges)."""
from __future__ import annotations

import json

import pytest

from offload.chat import ChatSetupError
from offload.chat.gguf_tokenizer import tokenizer_from_gguf

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6     # llama.cpp token types
WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had by "
         "word but not what all were we when your can said there use an each which she do how their if will up "
         "other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part hello world over new sound take only little work know place year live "
         "me back give most very after thing our just name good sentence man think say great where help through "
         "much before line right too mean old any same tell boy follow came want show also around form three "
         "small set put end does another well large must big even such because turn here why ask went men read "
         "need land different home us move try kind hand picture again change off play spell air away animal "
         "house point page letter mother answer found study still learn should America world The This What "
         "I").split()
PIECES = ("ing", "ed", "er", "ly", "s", "'t", "▁don", "▁▁", "▁▁▁", "▁▁▁▁", "▁(", ").", "▁\"", "\".", "é")
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"()-:;#*/▁é"
TEXTS = ["Hello world", "the water is good", " leading space", "  two leading spaces", "multiple   spaces   inside",
         "trailing space ", "new\nline\n\nparagraph\n", "tab\tseparated\tvalues", "Ünïcödé ☃ emoji 🤖 and 中文",
         "digits 12345 and 3.14", "don't stop (here).", "<s>the water</s>", "</s>", "<unk> unknown",
         "<|user|>\nhi there<|end|><|endoftext|>", "<bos><start_of_turn>user\nhi<end_of_turn>\n", "", " ", "\n",
         "   \n  x"]


def spm_vocab(gemma: bool, tied: bool = False) -> list[tuple[str, float, int]]:
    """(token, score, type) as llama.cpp writes a SentencePiece vocabulary: special and byte tokens, the
    merged pieces best-first (score -rank, or -length when `tied`), single characters last, then added chat
    tokens."""
    specials = ([("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                 ("<mask>", USER_DEFINED)] if gemma else [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)])
    vocab = [(token, 0.0, kind) for token, kind in specials]
    vocab += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces = []
    for word in WORDS:
        for form in ("▁" + word, word):
            pieces += [form[:i] for i in range(2, len(form) + 1)]
    pieces = sorted(dict.fromkeys(pieces + list(PIECES)), key=len)             # shorter merges first
    pieces += [c for c in CHARS if c not in pieces]
    # Gemma's scores do not follow its merge order (its token order does): make them disagree
    vocab += [(piece, float(rank) if gemma else -float(len(piece) if tied else rank), NORMAL)
              for rank, piece in enumerate(pieces)]
    added = [("<start_of_turn>", USER_DEFINED), ("<end_of_turn>", CONTROL)] if gemma else \
        [("<|user|>", USER_DEFINED), ("<|end|>", CONTROL), ("<|endoftext|>", NORMAL)]
    vocab += [(token, 0.0, kind) for token, kind in added]
    if gemma:                            # Gemma files store multi-space tokens as spaces
        vocab += [("  ", -1e4, NORMAL), ("   ", -1e4, NORMAL)]
    return vocab


def write_spm_gguf(path, architecture: str, model: str = "llama", scores: bool = True, tied: bool = False,
                   eos: str | None = None, **flags):
    """A .gguf holding only tokenizer metadata (all transformers' GGUF tokenizer reads); `flags` are the
    optional add_bos_token / add_eos_token / add_space_prefix booleans."""
    import gguf
    gemma = architecture.startswith("gemma")
    vocab = spm_vocab(gemma, tied)
    tokens = [token for token, _, _ in vocab]
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    if scores:
        writer.add_token_scores([score for _, score, _ in vocab])
    writer.add_token_types([kind for _, _, kind in vocab])
    bos, eos, unk = ("<bos>", eos or "<eos>", "<unk>") if gemma else ("<s>", eos or "</s>", "<unk>")
    writer.add_bos_token_id(tokens.index(bos))
    writer.add_eos_token_id(tokens.index(eos))
    writer.add_unk_token_id(tokens.index(unk))
    if gemma:
        writer.add_pad_token_id(tokens.index("<pad>"))
        writer.add_eot_token_id(tokens.index("<end_of_turn>"))
    for name, value in flags.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def transformers_gguf(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


CASES = {   # name -> (architecture, options): the shapes llama.cpp's converter writes
    "llama2": ("llama", {}),                                            # no flags: BOS and "▁" by default
    "tied_scores": ("llama", {"tied": True}),
    "plain_eos": ("llama", {"eos": "<|endoftext|>", "add_eos_token": True}),   # a named token of type NORMAL
    "mistral": ("llama", {"add_bos_token": True, "add_eos_token": False, "add_space_prefix": True}),
    "no_bos": ("llama", {"add_bos_token": False}),
    "bos_and_eos": ("llama", {"add_bos_token": True, "add_eos_token": True}),
    "gemma2": ("gemma2", {"add_bos_token": True, "add_space_prefix": False}),
    "gemma3": ("gemma3", {"add_bos_token": True, "add_eos_token": False, "add_space_prefix": False}),
    "phi3": ("phi3", {"add_bos_token": False, "add_space_prefix": True}),
}


@pytest.mark.parametrize("case", CASES)
def test_sentencepiece_gguf_tokenizer_is_transformers(tmp_path, case):
    architecture, flags = CASES[case]
    path = write_spm_gguf(tmp_path / f"{case}.gguf", architecture, **flags)
    ours, template = tokenizer_from_gguf(path)
    reference = transformers_gguf(path)
    assert template is None
    assert ours.vocab_size == len(reference)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                reference.decode(ids, skip_special_tokens=skip), text
    named = {name: value for name, value in reference.special_tokens_map.items() if name != "mask_token"}
    assert ours.special_tokens == named
    assert ours.stop_token_ids[0] == reference.eos_token_id


def test_merges_from_scores_and_byte_fallback(tmp_path):
    """Not vacuous: words become one piece through merges recovered from the scores, characters the
    vocabulary lacks become their UTF-8 bytes, and decoding gives the text back."""
    ours, _ = tokenizer_from_gguf(write_spm_gguf(tmp_path / "llama.gguf", "llama"))
    pieces = lambda text: [ours.tokenizer.id_to_token(i) for i in ours.encode(text)]   # noqa: E731
    assert pieces("the water") == ["▁the", "▁water"]
    assert pieces("☃\n") == ["▁", "<0xE2>", "<0x98>", "<0x83>", "<0x0A>"]
    assert pieces("<s>hello") == ["<s>", "hello"]             # no "▁" after a special token
    text = "Hello world, the water: 42 ☃ 🤖\n\tend"
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text


def test_bos_and_continuations(tmp_path):
    """As on the gpt2 path, encode() adds no BOS (chat templates write their own); add_special_tokens=True
    adds the one the file asks for; a continuation gets no "▁" of its own."""
    llama, _ = tokenizer_from_gguf(write_spm_gguf(tmp_path / "llama.gguf", "llama"))
    bos = llama.tokenizer.token_to_id("<s>")
    assert llama.encode("the water")[0] != bos
    assert llama.encode("the water", add_special_tokens=True)[0] == bos
    assert llama.encode("the") + llama.encode_continuation(" water") == llama.encode("the water")
    no_bos, _ = tokenizer_from_gguf(write_spm_gguf(tmp_path / "no_bos.gguf", "llama", add_bos_token=False))
    assert no_bos.encode("the water", add_special_tokens=True) == no_bos.encode("the water")


def test_gpt2_gguf_bos_follows_the_file_as_in_transformers(tmp_path):
    """The byte-level path handles add_bos_token the same way, against transformers."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = list(dict.fromkeys(bytes_to_unicode().values()))
    merges = ["Ġ t", "h e", "Ġt he", "w a", "t e", "wa te", "wate r"]
    tokens = alphabet + ["Ġt", "he", "Ġthe", "wa", "te", "wate", "water", "<|endoftext|>"]
    for add_bos in (True, False):
        path = tmp_path / f"gpt2_{add_bos}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([NORMAL] * (len(tokens) - 1) + [CONTROL])
        writer.add_token_merges(merges)
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
        writer.add_add_bos_token(add_bos)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        ours, _ = tokenizer_from_gguf(path)
        reference = transformers_gguf(path)
        for text in ("the water", " the water\n", "<|endoftext|>water"):
            assert ours.encode(text) == reference.encode(text, add_special_tokens=False), text
            assert ours.encode(text, add_special_tokens=True) == reference.encode(text), text
        assert (ours.encode("water", add_special_tokens=True)[0] == len(tokens) - 1) == add_bos


@pytest.mark.parametrize("architecture", ["llama", "phi3"])
def test_add_space_prefix_false_is_followed(tmp_path, architecture):
    """Where this differs from transformers on purpose: transformers 5 ignores add_space_prefix=false on
    these files and puts a "▁" in front anyway; llama.cpp (and the model's SentencePiece) do not. Compared
    with transformers' tokenizer with its prefix "▁" taken out."""
    from tokenizers import Tokenizer
    path = write_spm_gguf(tmp_path / "no_prefix.gguf", architecture, add_space_prefix=False)
    ours, _ = tokenizer_from_gguf(path)
    data = json.loads(transformers_gguf(path).backend_tokenizer.to_str())
    if data["pre_tokenizer"]:
        data["pre_tokenizer"]["prepend_scheme"] = "never"
    else:
        data["normalizer"]["normalizers"] = [n for n in data["normalizer"]["normalizers"] if n["type"] != "Prepend"]
    data["decoder"]["decoders"] = [d for d in data["decoder"]["decoders"] if d["type"] != "Strip"]
    reference = Tokenizer.from_str(json.dumps(data))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    assert [ours.tokenizer.id_to_token(i) for i in ours.encode("the water")] == ["the", "▁water"]


def test_unsupported_or_incomplete_vocabularies_are_one_clear_line(tmp_path):
    path = write_spm_gguf(tmp_path / "bert.gguf", "llama", model="bert")
    with pytest.raises(ChatSetupError) as error:
        tokenizer_from_gguf(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: GGUF tokenizer model 'bert' is not supported")
    assert "gpt2" in message and "llama" in message
    path = write_spm_gguf(tmp_path / "no_scores.gguf", "llama", scores=False)
    with pytest.raises(ChatSetupError, match=r"no_scores.gguf: .*needs one tokenizer.ggml.scores value per token"):
        tokenizer_from_gguf(path)
