"""The OpenAI-compatible API under /v1. Each module's router carries its full prefix, so
metrics see whole route templates."""

from maas.api.openai import chat, completions, embeddings, files, fine_tuning, models

routers = [
    models.router,
    embeddings.router,
    chat.router,
    completions.router,
    files.router,
    fine_tuning.router,
]
