"""A GGUF file's tokenizer, converted once per vocabulary into Hugging Face files in the
local cache.

``transformers`` converts a GGUF vocabulary (``AutoTokenizer.from_pretrained(...,
gguf_file=...)``) only with its GGUF reader, which imports torch: a few hundred MB that the
server would then hold for a tokenizer. So the conversion runs once per vocabulary in a child
process (``python -m maas.runtime.llm.gguf_tokenizer GGUF FOLDER``), its result is kept in
``tokenizers/`` of the local cache under a digest of the file's metadata (``vocabulary_key``)
and the ``transformers`` version, and every process, the server included, loads the saved
files with ``transformers``' fast tokenizer class, without torch.

The key is the metadata's, not the file's: the conversion reads nothing else, and a model's
quantized versions (maas's ``export gguf``, llama.cpp's ``quantize``) carry the same metadata
with other weights. Converting SmolLM2-135M's vocabulary takes 15 to 25 s on two cores; a
version exported from it no longer pays that again at its first load.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from maas.errors import UnsupportedFormat
from maas.registry.formats.gguf_header import HeaderError, read_header
from maas.runtime.local_cache import cache_root

CONVERT_SECONDS = 600

WEIGHT_KEYS = frozenset({"general.file_type", "general.quantization_version"})
"""Metadata that tells how the weights are stored, not what the vocabulary is."""
WEIGHT_PREFIXES = ("quantize.",)
"""llama.cpp's ``quantize`` records its importance matrix under these."""


def vocabulary_key(gguf: Path) -> str:
    """The sha256 of ``gguf``'s metadata, every key with its value's bytes as the file holds
    them, in key order, leaving out the keys about the weights' storage: equal for files
    that differ only in how their weights are stored."""
    try:
        header = read_header(gguf)
    except HeaderError as err:
        raise UnsupportedFormat(f"the GGUF file's tokenizer could not be read: {err}") from None
    digest = hashlib.sha256()
    with gguf.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        digest.update(data[:8])  # the magic, then the version in the file's byte order
        for key in sorted(header.value_spans):
            if key in WEIGHT_KEYS or key.startswith(WEIGHT_PREFIXES):
                continue
            start, end = header.value_spans[key]
            name = key.encode()
            digest.update(len(name).to_bytes(8, "little") + name)
            digest.update((end - start).to_bytes(8, "little"))
            digest.update(data[start:end])
    return digest.hexdigest()


def converted(gguf: Path) -> Path:
    """The folder holding ``gguf``'s tokenizer as Hugging Face files, converting it if no
    process has yet (for this file or another with its metadata)."""
    import transformers

    key = vocabulary_key(gguf)
    target = cache_root() / "tokenizers" / f"{key[:32]}-transformers-{transformers.__version__}"
    if (target / "tokenizer.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        folder = Path(work) / "tokenizer"
        done = subprocess.run(  # -P: nothing from the current folder is imported
            [sys.executable, "-P", "-m", __name__, str(gguf), str(folder)],
            capture_output=True,
            text=True,
            timeout=CONVERT_SECONDS,
        )
        if done.returncode != 0 or not (folder / "tokenizer.json").is_file():
            reason = (done.stderr.strip().splitlines() or ["no tokenizer.json written"])[-1]
            raise UnsupportedFormat(f"the GGUF file's tokenizer could not be read: {reason}")
        try:
            os.rename(folder, target)  # whole or not at all
        except OSError:
            if not (target / "tokenizer.json").is_file():  # else another process was first
                raise
    return target


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)


if __name__ == "__main__":
    _convert(Path(sys.argv[1]), Path(sys.argv[2]))
