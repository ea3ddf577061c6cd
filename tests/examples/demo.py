"""A tiny model folder made on the spot: a BPE tokenizer trained on a built-in text, a chat template and
a random-weight Llama checkpoint. The tests build their models with it; the replies of such a model are random
(what a test compares with transformers), not a language model's.
"""
from __future__ import annotations

import json
from pathlib import Path

TRAINING_TEXT = """\
The library runs large language models on a graphics card that is too small for them.
A planner decides which layers live on the GPU and which stay in CPU memory; the runtime streams the
rest over the PCIe link ahead of use, and attention runs where the key-value cache lives.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Tell me a story about a small robot who learned to paint the sea, the sky and the mountains.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # %
Café, naïve, façade, über, señor, déjà vu. 東京は日本の首都です。 你好，世界。 Привет, мир!
Emoji: 🙂 🚀 🎉 👍🏽 — and a last line so that the merges see some repetition: the the the and and.
"""

# Llama-3 style: the template writes the BOS token itself, a turn ends with <|eot_id|>.
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_byte_level_bpe(vocab_size: int = 400, special_tokens=LLAMA3_SPECIAL_TOKENS):
    """A GPT-2/Llama-3 style byte-level BPE (every byte is a token: any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    return tokenizer


def train_metaspace_bpe(vocab_size: int = 400):
    """A Llama-2/Mistral style tokenizer: "▁" metaspace, BPE with byte fallback (<0xNN> tokens),
    special tokens <unk> <s> </s>, a decoder that turns "▁" into spaces and strips the first one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + 256, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens)
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(), trainer=trainer)
    # The byte tokens belong to the model's vocabulary, not to the added (special) tokens: decoding with
    # skip_special_tokens must keep them, as in the real Llama-2 tokenizer.json.
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in set(byte_tokens)]
    return Tokenizer.from_str(json.dumps(data))


def write_tokenizer(model_dir: str | Path, tokenizer, bos_token: str | None, eos_token: str | None,
                    chat_template: str | None) -> None:
    """tokenizer.json plus a tokenizer_config.json as transformers writes it (AddedToken dicts)."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(model_dir / "tokenizer.json"))
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for name, content in (("bos_token", bos_token), ("eos_token", eos_token)):
        if content is not None:
            config[name] = {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def tiny_llama_config(vocab_size: int, bos_token_id: int | None, eos_token_id: int | list | None,
                      **overrides) -> dict:
    """A config.json for a 2-layer Llama with GQA, small enough to run anywhere in milliseconds."""
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab_size,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
                  rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, torch_dtype="float32")
    config.update(overrides)
    return config


def write_random_llama(model_dir: str | Path, config: dict, seed: int = 0) -> None:
    """config.json and model.safetensors with random weights for every tensor the architecture names
    (normal(0, 0.02) matrices, unit norms, zero biases: transformers' own initialisation)."""
    import torch
    from safetensors.torch import save_file

    from placement.architecture import Architecture
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    arch = Architecture.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in arch.all_tensors().items():
        if "norm" in name:
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=generator) * 0.02
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build_demo_model(model_dir: str | Path, seed: int = 0, chat_template: str | None = LLAMA3_TEMPLATE,
                     **config_overrides) -> Path:
    """A complete tiny model folder (tokenizer, template, config, random weights); returns its path."""
    model_dir = Path(model_dir)
    tokenizer = train_byte_level_bpe()
    bos, eos = "<|begin_of_text|>", "<|eot_id|>"
    write_tokenizer(model_dir, tokenizer, bos_token=bos, eos_token=eos, chat_template=chat_template)
    config = tiny_llama_config(tokenizer.get_vocab_size(), bos_token_id=tokenizer.token_to_id(bos),
                               eos_token_id=[tokenizer.token_to_id("<|end_of_text|>"),
                                             tokenizer.token_to_id(eos)], **config_overrides)
    write_random_llama(model_dir, config, seed=seed)
    return model_dir
