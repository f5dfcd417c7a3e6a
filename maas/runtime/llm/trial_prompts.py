"""The texts ``MAAS_LLM_DTYPE=auto`` checks each candidate dtype on (see dtypes.py), apart
from dtypes.py so that the server encodes them without importing torch (the engine process
gets them as token ids: see ``EngineTokenizer``)."""

from __future__ import annotations

PROBE = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and "
    "Berlin is the capital of Germany. Water boils at one hundred degrees Celsius at sea "
    "level. To make a cup of tea, boil the water, add the leaves and wait three minutes."
)
"""A plain text whose next-token choices a candidate must share with float32."""

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
"""The probe question (as a chat): float32's answer fed to a candidate after the question
computed whole, and again after ``SPLIT`` tokens and its last full block came from the
prefix cache."""
