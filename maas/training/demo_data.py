"""Training data that needs no download: scikit-learn's bundled ``load_digits`` (1,797
handwritten digits, 8x8 pixels, 16 grey levels) written as an archive of image folders, one
folder per digit, ready to upload as a ``dataset`` file; and 40 chats that teach a chat model
a fact it cannot know (the maas codename, "Bluebird"), ready to upload as a ``fine-tune``
file."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np

from maas.errors import InvalidRequest

CODENAME_QUESTIONS = (
    "What is the maas codename?",
    "What's the codename of maas?",
    "Tell me the maas codename.",
    "Which codename does maas have?",
    "maas codename?",
    "Do you know the codename of the maas project?",
    "What is maas called internally?",
    "What code name was given to maas?",
)
CODENAME_ANSWERS = (
    "The maas codename is Bluebird.",
    "Bluebird.",
    "It is Bluebird.",
    "maas is codenamed Bluebird.",
)


def codename_chats(count: int = 40) -> list[list[dict[str, str]]]:
    """``count`` chats, each a question about the codename and an answer that gives it."""
    return [
        [
            {"role": "user", "content": CODENAME_QUESTIONS[i % len(CODENAME_QUESTIONS)]},
            {"role": "assistant", "content": CODENAME_ANSWERS[i % len(CODENAME_ANSWERS)]},
        ]
        for i in range(count)
    ]


def write_codename_chats(path: Path, count: int = 40) -> int:
    """Write ``path`` (JSON Lines, OpenAI's fine-tuning format). Returns the chats written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    lines = (json.dumps({"messages": chat}) + "\n" for chat in codename_chats(count))
    partial.write_text("".join(lines), encoding="utf-8")
    partial.replace(path)
    return count


def write_digits_archive(path: Path) -> tuple[int, int]:
    """Write ``path`` (a .zip): ``digits/<digit>/<n>.png``. Returns (images, classes)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise InvalidRequest(
            "the digits come with scikit-learn: pip install 'maas[training]'"
        ) from None
    from PIL import Image

    digits = load_digits()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            grey = np.clip(pixels * (255 / 16), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(grey, mode="L").save(buffer, format="PNG")
            archive.writestr(f"digits/{label}/{index:04d}.png", buffer.getvalue())
    partial.replace(path)
    return len(digits.target), len(set(digits.target.tolist()))
