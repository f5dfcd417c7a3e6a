"""The load policy: which model files maas accepts. Every importer calls ``check_load_policy``.

Refused, because loading them can run code chosen by whoever made the file:

* pickle-based weights (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt``, ``.joblib``):
  unpickling calls arbitrary functions;
* Hugging Face configs with ``auto_map``: ``transformers`` would import Python files shipped
  with the model;
* symbolic links inside a version: a version must hold its own bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from maas.artifacts.json_files import load_json
from maas.errors import RefusedArtifact

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})

CONVERT_HINT = (
    "Convert it to safetensors on a machine where you trust the file, for example "
    'python -c "import torch, safetensors.torch as st; '
    "st.save_file(torch.load('pytorch_model.bin', weights_only=True), 'model.safetensors')\", "
    "then import the folder without the pickle file (see docs/registry.md)."
)


MAX_NAME_BYTES = 255
"""Longest file or folder name (one path component) on common file systems."""
MAX_PATH_BYTES = 4096


def check_path_text(relpath: str, what: str = "file name", *, param: str | None = None) -> None:
    """Refuse a name from outside that the file system would choke on (a NUL or control
    character, a component over 255 bytes, a path over 4096 bytes, text that is not UTF-8),
    before it reaches ``open``."""
    if any(ord(char) < 32 or ord(char) == 127 for char in relpath):
        raise RefusedArtifact(f"{what} {relpath!r} has a NUL or control character", param=param)
    try:
        encoded = relpath.encode("utf-8")
    except UnicodeEncodeError:
        raise RefusedArtifact(f"{what} {relpath!r} is not valid UTF-8", param=param) from None
    if len(encoded) > MAX_PATH_BYTES:
        raise RefusedArtifact(f"{what} is longer than {MAX_PATH_BYTES} bytes", param=param)
    if any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in relpath.split("/")):
        raise RefusedArtifact(f"{what} has a part longer than {MAX_NAME_BYTES} bytes", param=param)


def check_file_names(relpaths: Iterable[str]) -> None:
    """Refuse by name alone; cheap enough to run before anything is copied."""
    for relpath in relpaths:
        check_path_text(relpath)
        suffix = PurePosixPath(relpath).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise RefusedArtifact(
                f"refusing {relpath!r}: pickle-based weights can run code when loaded. "
                + CONVERT_HINT
            )


def check_load_policy(folder: Path) -> None:
    """Refuse a folder of model files that could run code or reach outside itself."""
    for path in sorted(folder.rglob("*")):
        relpath = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise RefusedArtifact(
                f"refusing {relpath!r}: symbolic links are not allowed in a version"
            )
        if path.is_dir():
            continue
        check_file_names([relpath])
        if path.name.endswith("config.json"):
            _check_config(path, relpath)


def _check_config(path: Path, relpath: str) -> None:
    try:
        config = load_json(path)
    except ValueError as err:
        raise RefusedArtifact(f"refusing {relpath!r}: {err}") from None
    if isinstance(config, dict) and "auto_map" in config:
        raise RefusedArtifact(
            f"refusing {relpath!r}: it has 'auto_map', so loading it would run Python code "
            "shipped with the model. maas never runs remote code; use a model whose "
            "architecture transformers supports natively."
        )
