"""Reading a JSON object from a file with one-line errors that name the file (shared by the planner,
the checkpoint reader, plan files and the chat tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path


def read_json_object(path: Path | str, error: type[Exception] = ValueError, *,
                     missing: str = "not found") -> dict:
    """The JSON object in `path`. Raises `error("<path>: <what is wrong>")` when the file is missing
    (`missing` says what would work), unreadable, not JSON, or not a JSON object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    return parse_json_object(text, str(path), error)


def parse_json_object(text: str, where: str, error: type[Exception] = ValueError) -> dict:
    """The JSON object in `text`; `error("<where>: <what is wrong>")` when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{where}: malformed JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(value, dict):
        raise error(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value
