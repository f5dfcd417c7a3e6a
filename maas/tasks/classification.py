"""Classification: texts or images in, the most likely labels with scores out."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool

from maas.routing.deployment import Deployment
from maas.tasks.embeddings import _stack
from maas.tasks.images import ImagePreprocessing, decode_image
from maas.tasks.outputs import top_labels
from maas.tasks.text import text_encoder


async def classify_texts(deployment: Deployment, texts: list[str], top_k: int) -> list[list[dict]]:
    rows = await run_in_threadpool(text_encoder(deployment).encode, texts)
    outputs = await deployment.infer(_stack(rows))
    return _labels(deployment, outputs[deployment.outputs[0].name], top_k)


async def classify_images(
    deployment: Deployment, images: list[bytes], top_k: int
) -> list[list[dict]]:
    spec = image_preprocessing(deployment)

    def decode_all():
        import numpy as np

        return np.stack([decode_image(data, spec, index=i) for i, data in enumerate(images)])

    pixels = await run_in_threadpool(decode_all)
    outputs = await deployment.infer({deployment.inputs[0].name: pixels})
    return _labels(deployment, outputs[deployment.outputs[0].name], top_k)


def image_preprocessing(deployment: Deployment) -> ImagePreprocessing:
    cached = deployment.helpers.get("images")
    if cached is None:
        cached = deployment.helpers["images"] = ImagePreprocessing.from_options(
            deployment.manifest.task_options
        )
    return cached


def _labels(deployment: Deployment, logits, top_k: int) -> list[list[dict]]:
    labels = deployment.manifest.labels
    return [top_labels(row, labels, top_k) for row in logits]
