"""A GGUF file's tokenizer, converted once into Hugging Face files in the local cache.

``transformers`` converts a GGUF vocabulary (``AutoTokenizer.from_pretrained(...,
gguf_file=...)``) only with its GGUF reader, which imports torch: a few hundred MB that the
server would then hold for a tokenizer. So the conversion runs once per GGUF file in a child
process (``python -m maas.runtime.llm.gguf_tokenizer GGUF FOLDER``), its result is kept in
``tokenizers/`` of the local cache under the file's sha256 and the ``transformers`` version,
and every process, the server included, loads the saved files with ``transformers``' fast
tokenizer class, without torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from maas.errors import UnsupportedFormat
from maas.runtime.local_cache import cache_root

CONVERT_SECONDS = 600


def converted(gguf: Path, sha256: str) -> Path:
    """The folder holding ``gguf``'s tokenizer as Hugging Face files, converting it if no
    process has yet."""
    import transformers

    target = cache_root() / "tokenizers" / f"{sha256[:32]}-transformers-{transformers.__version__}"
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
