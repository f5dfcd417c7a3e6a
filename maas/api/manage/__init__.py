"""The management API under /api/v1: what the CLI does, over HTTP."""

from maas.api.manage import access, analytics, jobs, models, optimizations

routers = [models.router, access.router, jobs.router, optimizations.router, analytics.router]
