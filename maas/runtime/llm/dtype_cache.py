"""``auto``'s choice kept between loads: measured once per model, machine and code.

Choosing measures every candidate at load (the demo model: 4 dtypes, each converted, checked
against float32 and timed, about 12 s of a 22 s load). What it measures depends on the weights,
the CPU, the thread count, torch and maas's own LLM runtime, and on the options that shape the
timing; the choice is kept in ``dtypes/`` of the local cache (local_cache.py) under a name made
from all of them (the model by its files' contents: the same weights imported twice share
it). A later load under the same name takes it from there, with the trials it was chosen by
(the log says so); a change to any of them measures again. A cache that cannot be read or
written is measured around, never an error. Deleting the folder measures again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from maas.registry.manifest import Manifest
from maas.runtime.llm.dtypes import DtypeChoice, Trial
from maas.runtime.local_cache import cache_root

log = logging.getLogger(__name__)

RUNTIME = Path(__file__).parent
"""Sources whose changes can change a measurement (the model, its kernels, the candidates)."""


def model_digest(manifest: Manifest) -> str:
    """What the choice depends on in a version: its files' contents and its chat template
    (the probe question is asked through it); not when or under which name it was imported,
    so the same weights imported twice share a choice."""
    made_from = {
        "files": sorted((entry.path, entry.sha256) for entry in manifest.files),
        "format": manifest.format,
        "config": manifest.config,
        "chat_template": manifest.chat_template,
        "tokenizer": manifest.tokenizer,
    }
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()


def key(model: str, **options: object) -> str:
    """The name of a choice: the model's digest (``model_digest``), this machine and code,
    and ``options`` (candidates, batch, kernels: whatever the timing depends on)."""
    made_from = {
        "model": model,
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tokenizers": [_version(name) for name in ("transformers", "tokenizers")],
        "runtime": _runtime_digest(),
        "options": {name: repr(value) for name, value in sorted(options.items())},
    }
    return hashlib.sha256(json.dumps(made_from, sort_keys=True).encode()).hexdigest()[:32]


def load(name: str) -> DtypeChoice | None:
    """The choice kept under ``name``, or None (none kept, or unreadable: measured again)."""
    try:
        kept = json.loads(_path(name).read_text())
        trials = tuple(Trial(**trial) for trial in kept["trials"])
        return DtypeChoice(kept["dtype"], trials, kept.get("kv_cache", ""))
    except FileNotFoundError:
        return None
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as err:
        # RuntimeError: no home folder to put the cache in (Path.home() without HOME)
        log.warning("ignoring the kept dtype choice %s: %s", name, err)
        return None


def save(name: str, choice: DtypeChoice) -> None:
    """Keep ``choice`` under ``name``, written whole or not at all."""
    temporary = None
    try:
        path = _path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as out:
            temporary = out.name
            json.dump(choice.to_dict(), out)
        os.replace(temporary, path)
    except (OSError, RuntimeError) as err:
        log.warning("the dtype choice is not kept for the next load: %s", err)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)


def _path(name: str) -> Path:
    return cache_root() / "dtypes" / f"{name}.json"


def _cpu() -> str:
    """The CPU's model and feature flags (which decide what is fastest), else the platform."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + " " + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    first = {}
    for line in lines:
        label, _, value = line.partition(":")
        label = label.strip()
        if label in wanted and label not in first:
            first[label] = value.strip()
    return platform.machine() + " " + json.dumps(first, sort_keys=True)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _runtime_digest() -> str:
    digest = hashlib.sha256()
    for source in sorted(RUNTIME.glob("*.py")) + sorted(RUNTIME.glob("*.c*")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()
