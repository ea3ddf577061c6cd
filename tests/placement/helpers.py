"""Shared helpers for the placement tests: reference configs and tiny configs."""
import json
import re
from pathlib import Path

REFERENCE_CONFIGS = Path(__file__).resolve().parents[1] / "reference_configs"


def reference_counts() -> dict[str, int]:
    """name -> parameter count from tests/reference_configs/README.md (what transformers counts)."""
    text = (REFERENCE_CONFIGS / "README.md").read_text()
    return {m.group(1): int(m.group(2).replace(",", ""))
            for m in re.finditer(r"^\|\s*([\w.\-]+)\s*\|\s*([\d,]+)\s*\|", text, re.M)}


def reference_config(name: str) -> dict:
    return json.loads((REFERENCE_CONFIGS / f"{name}.json").read_text())


def tiny_llama_config(**overrides) -> dict:
    config = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 256, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "rms_norm_eps": 1e-5}
    config.update(overrides)
    return config
