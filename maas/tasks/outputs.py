"""What a model's output rows mean: labels with scores, pooled embeddings."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def top_labels(logits: np.ndarray, labels: list[str] | None, k: int) -> list[dict]:
    """The k most likely classes of one row of logits, as [{"label", "score"}]."""
    scores = softmax(logits.astype(np.float64))
    order = np.argsort(-scores)[:k]
    names = labels or [str(i) for i in range(len(scores))]
    return [{"label": names[i], "score": float(scores[i])} for i in order]


def pool(hidden: np.ndarray, length: int, mode: str) -> np.ndarray:
    """One sentence vector from its token vectors [tokens, hidden] (only the first ``length``
    are real; the rest is batch padding)."""
    real = hidden[:length]
    if mode == "cls":
        return real[0]
    if mode == "max":
        return real.max(axis=0)
    return real.mean(axis=0)


def normalize(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector
