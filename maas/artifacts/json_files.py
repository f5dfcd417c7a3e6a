"""JSON files that come with a model (configs, indexes, templates), read from outside."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MAX_JSON_BYTES = 16 * 1024 * 1024
"""Largest JSON file of a model that is parsed (configs, indexes, templates): real ones are a
few kB to a few MB."""


def load_json(path: Path) -> Any:
    """A JSON file from outside, parsed in bounded memory and depth; ``ValueError`` says why
    not (over ``MAX_JSON_BYTES``, not UTF-8, not JSON, or nested past Python's recursion limit,
    which ``json`` would otherwise raise as a RecursionError)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ValueError(f"it is over {MAX_JSON_BYTES // 2**20} MiB")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deep)") from None
