"""Files maas derives from others and keeps between runs on this machine: built kernels,
converted tokenizers, measured dtype choices (and inductor's compiled code, which inductor
names and writes itself). Each is named by what it was made from, so a stale one is never
used, and written whole under a temporary name first, so a half-written one is never read."""

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


def keep_compiled_code() -> None:
    """Inductor (``torch.compile``) keeps what it compiles in ``inductor/`` of this cache, as
    vLLM keeps its own in ``~/.cache/vllm``, not in its default ``/tmp/torchinductor_<user>``,
    which many systems empty at each boot: the demo's first load compiles its steps for 35 to
    75 s on two cores, a load from the cache in about 7. A ``TORCHINDUCTOR_CACHE_DIR`` of the
    user's wins. The ``maas`` command sets it at its start, so the processes it starts
    inherit it: torch reads it when Dynamo is first imported, too late to set it there."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
