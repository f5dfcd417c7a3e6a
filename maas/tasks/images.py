"""Images in: PNG/JPEG bytes decoded, resized and normalised as the model's files say."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from maas.errors import InvalidRequest, PayloadTooLarge

MAX_PIXELS = 50_000_000
"""Larger images are refused before they are decoded (decompression bombs)."""


@dataclass(frozen=True)
class ImagePreprocessing:
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    shortest_edge: int | None = None
    """Resize the shorter side to this, then centre-crop height x width (ResNet style)."""
    rescale: float = 1 / 255

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> ImagePreprocessing:
        """From maas's ``preprocessing`` ({image_size, mean, std}) or a Hugging Face
        ``preprocessor_config.json``."""
        if "preprocessing" in options:
            spec = options["preprocessing"]
            height, width = spec.get("image_size", [224, 224])
            return cls(height, width, tuple(spec.get("mean", [0.0])), tuple(spec.get("std", [1.0])))
        spec = options.get("preprocessor", {})
        size = spec.get("size", {"height": 224, "width": 224})
        crop = spec.get("crop_size") or {}
        if isinstance(size, int):
            size = {"height": size, "width": size}
        shortest = size.get("shortest_edge")
        height = crop.get("height", size.get("height", shortest))
        width = crop.get("width", size.get("width", shortest))
        mean = spec.get("image_mean", [0.5, 0.5, 0.5]) if spec.get("do_normalize", True) else [0.0]
        std = spec.get("image_std", [0.5, 0.5, 0.5]) if spec.get("do_normalize", True) else [1.0]
        rescale = spec.get("rescale_factor", 1 / 255) if spec.get("do_rescale", True) else 1.0
        return cls(height, width, tuple(mean), tuple(std), shortest, rescale)


def decode_image(data: bytes, spec: ImagePreprocessing, *, index: int = 0) -> np.ndarray:
    """One image as float32 [3, height, width], or InvalidRequest naming the bad image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > MAX_PIXELS:
                raise PayloadTooLarge(
                    f"image {index} is {image.width}x{image.height}; at most {MAX_PIXELS} pixels"
                )
            if image.format not in ("PNG", "JPEG", "WEBP", "BMP", "GIF"):
                raise InvalidRequest(f"image {index} is {image.format}; send PNG or JPEG")
            image = image.convert("RGB")
            image = _resize(image, spec)
            pixels = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidRequest(f"image {index} could not be decoded as PNG or JPEG: {err}") from None
    pixels = pixels * spec.rescale
    pixels = (pixels - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _resize(image, spec: ImagePreprocessing):
    from PIL import Image

    if spec.shortest_edge is None:
        return image.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
    scale = spec.shortest_edge / min(image.width, image.height)
    resized = image.resize(
        (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
        Image.Resampling.BILINEAR,
    )
    left = (resized.width - spec.width) // 2
    top = (resized.height - spec.height) // 2
    return resized.crop((left, top, left + spec.width, top + spec.height))
