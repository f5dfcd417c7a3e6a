"""Files maas derives from others and keeps between runs on this machine: built kernels,
converted tokenizers. Each is named by what it was made from, so a stale one is never used,
and written whole under a temporary name first, so a half-written one is never read."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``MAAS_CACHE_DIR``, else ``$XDG_CACHE_HOME/maas`` (``~/.cache/maas``)."""
    configured = os.environ.get("MAAS_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "maas"
