"""Training data that needs no download: scikit-learn's bundled ``load_digits`` (1,797
handwritten digits, 8x8 pixels, 16 grey levels) written as an archive of image folders, one
folder per digit, ready to upload as a ``dataset`` file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from maas.errors import InvalidRequest


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
