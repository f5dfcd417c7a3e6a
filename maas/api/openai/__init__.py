"""The OpenAI-compatible API under /v1. Each module's router carries its full prefix, so
metrics see whole route templates."""

from maas.api.openai import embeddings, models

routers = [models.router, embeddings.router]
