"""Model folders for the tests, built with tests/examples/demo.py (tiny random-weight Llamas with real tokenizers)."""
import functools
from pathlib import Path

from . import demo

REPO = Path(__file__).resolve().parents[2]
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


def demo_model_dir(path: Path, **config_overrides) -> Path:
    """A tiny model folder (byte-level BPE, Llama-3 template, random 2-layer Llama)."""
    return demo.build_demo_model(path, **config_overrides)


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int, stop_ids) -> list[int]:
    """Greedy continuation by transformers' own Llama (full forward each step: nothing of ours)."""
    import torch
    model = _hf_model(str(model_dir))
    ids, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(next_id)
            out.append(next_id)
            if next_id in stop_ids:
                break
    return out


@functools.lru_cache(maxsize=4)
def _hf_model(model_dir: str):
    import torch
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
