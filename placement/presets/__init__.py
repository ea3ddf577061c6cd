"""Bundled config.json files of popular llama/mistral/qwen2/opt checkpoints: plan with no download.

Each `NAME.json` here is the published config of the base checkpoint of that name (the fields that
matter for inference). Names are lower case; lookups ignore case and an `org/` prefix.
"""
from __future__ import annotations

import difflib
import json
from functools import lru_cache
from pathlib import Path

from ..architecture import ConfigError

_DIR = Path(__file__).resolve().parent


@lru_cache(maxsize=1)
def names() -> tuple[str, ...]:
    """All preset names, sorted."""
    return tuple(sorted(p.stem for p in _DIR.glob("*.json")))


def resolve(name: str) -> str:
    """The preset name for `name` ('Llama-3.1-8B', 'meta-llama/llama-3.1-8b' -> 'llama-3.1-8b').

    Raises ConfigError naming the closest presets when there is none.
    """
    key = str(name).strip().lower().rsplit("/", 1)[-1]
    if key in names():
        return key
    close = difflib.get_close_matches(key, names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ConfigError(f"unknown model {name!r}: not a file, directory or preset; {hint}"
                      f"see offload-plan --list-presets")


def load(name: str) -> dict:
    """The config.json dict of a preset (a fresh copy)."""
    key = resolve(name)
    return json.loads((_DIR / f"{key}.json").read_text(encoding="utf-8"))
