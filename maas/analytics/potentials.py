"""The market potential of each industry: how many organisations could adopt, set by the
operator (``maas analytics potential retail 120``). Penetration is adopters over it, and a
forecast takes it as the Bass model's m instead of estimating m."""

from __future__ import annotations

import math
from datetime import UTC, datetime

from pydantic import BaseModel
from sqlalchemy import Engine, select

from maas.auth.principal import INDUSTRIES
from maas.db import make_session_factory, write_transaction
from maas.db.tables import MarketPotential
from maas.errors import InvalidRequest


class PotentialPublic(BaseModel):
    industry: str
    potential: float
    source: str
    updated_at: datetime


def set_potential(
    engine: Engine, industry: str, potential: float, source: str = ""
) -> PotentialPublic:
    """The operator's market potential of an industry (how many organisations could adopt)."""
    if industry not in INDUSTRIES:
        raise InvalidRequest(
            f"unknown industry {industry!r}; use one of: {', '.join(INDUSTRIES)}",
            param="industry",
        )
    if not (math.isfinite(potential) and potential > 0):
        raise InvalidRequest(
            "the potential is a positive number of organisations", param="potential"
        )
    with write_transaction(make_session_factory(engine)) as session:
        row = session.get(MarketPotential, industry)
        if row is None:
            row = MarketPotential(industry=industry)
            session.add(row)
        row.potential, row.source, row.updated_at = float(potential), source, datetime.now(UTC)
        session.flush()
        return PotentialPublic(
            industry=industry, potential=row.potential, source=source, updated_at=row.updated_at
        )


def list_potentials(engine: Engine) -> list[PotentialPublic]:
    with engine.connect() as connection:
        rows = connection.execute(select(MarketPotential).order_by(MarketPotential.industry))
        return [
            PotentialPublic(
                industry=r.industry, potential=r.potential, source=r.source, updated_at=r.updated_at
            )
            for r in rows
        ]
