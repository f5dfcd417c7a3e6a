"""Embeddings: texts (or token ids) in, one pooled, optionally normalised vector each out."""

from __future__ import annotations

import numpy as np
from starlette.concurrency import run_in_threadpool

from maas.routing.deployment import Deployment
from maas.tasks.outputs import normalize, pool
from maas.tasks.text import text_encoder


async def embed(
    deployment: Deployment, texts: list[str] | None = None, token_ids: list[list[int]] | None = None
) -> tuple[list[np.ndarray], int]:
    """Vectors for the inputs and the number of tokens they took (after truncation)."""
    encoder = text_encoder(deployment)
    if texts is not None:
        rows = await run_in_threadpool(encoder.encode, texts)
    else:
        rows = encoder.from_ids(token_ids or [])
    lengths = [len(row["input_ids"]) for row in rows]
    outputs = await deployment.infer(_stack(rows))
    hidden = outputs["last_hidden_state"]
    options = deployment.manifest.task_options
    mode = options.get("pooling", "mean")
    vectors = [pool(hidden[i], lengths[i], mode) for i in range(len(rows))]
    if options.get("normalize", False):
        vectors = [normalize(v) for v in vectors]
    return [v.astype(np.float32) for v in vectors], sum(lengths)


def dimension(deployment: Deployment) -> int:
    return deployment.outputs[0].shape[-1]


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from maas.routing.deployment import stack

    return {name: stack([row[name][None, :] for row in rows]) for name in rows[0]}
