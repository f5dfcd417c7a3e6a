"""The rate limiter on a fake clock: windows slide, budgets renew with the month."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from maas.auth.limits import RateLimiter
from maas.auth.principal import Limits, Principal, Role
from maas.errors import QuotaExceeded, RateLimited


def principal(**limits) -> Principal:
    return Principal(
        key_id="k1",
        name="k",
        tenant_id=1,
        tenant="t",
        industry="other",
        role=Role.user,
        allowed_models=None,
        expires_at=None,
        limits=Limits(**limits),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.wall = datetime(2026, 11, 30, 23, 59, tzinfo=UTC)

    def __call__(self) -> float:
        return self.now


def test_the_request_window_slides():
    clock = Clock()
    limiter = RateLimiter(lambda key, unit, month: 0, clock=clock)
    key = principal(requests_per_minute=2)
    for _ in range(2):
        limiter.release(limiter.admit(key, uses_tokens=False))
    with pytest.raises(RateLimited) as caught:
        limiter.admit(key, uses_tokens=False)
    assert caught.value.retry_after == pytest.approx(60.0)
    clock.now += 30
    with pytest.raises(RateLimited) as caught:
        limiter.admit(key, uses_tokens=False)
    assert caught.value.retry_after == pytest.approx(30.0)
    clock.now += 30.001
    limiter.admit(key, uses_tokens=False)


def test_the_budget_starts_from_the_records_and_renews_next_month():
    clock = Clock()
    recorded = {"2026-11": 90, "2026-12": 0}
    limiter = RateLimiter(
        lambda key, unit, month: recorded[month], clock=clock, now=lambda: clock.wall
    )
    key = principal(monthly_token_budget=100)
    assert limiter.needs_budget(key)
    limiter.load_budget(key)
    assert not limiter.needs_budget(key)
    limiter.admit(key, uses_tokens=True)
    limiter.charge(key, 10)
    with pytest.raises(QuotaExceeded):
        limiter.admit(key, uses_tokens=True)
    limiter.admit(key, uses_tokens=False)  # requests without tokens still pass
    clock.wall = datetime(2026, 12, 1, 0, 1, tzinfo=UTC)
    assert limiter.needs_budget(key)
    limiter.load_budget(key)
    limiter.admit(key, uses_tokens=True)


def test_a_budget_in_currency_counts_cost_not_tokens():
    clock = Clock()
    recorded = {("tokens", "2026-11"): 10**9, ("cost", "2026-11"): 4.0}
    limiter = RateLimiter(
        lambda key, unit, month: recorded[(unit, month)],
        currency=lambda: "EUR",
        clock=clock,
        now=lambda: clock.wall,
    )
    key = principal(monthly_cost_budget=5.0)
    limiter.load_budget(key)
    limiter.admit(key, uses_tokens=True)  # a billion tokens, but 4.00 of 5.00 spent
    limiter.charge(key, 10, cost=0.75)
    limiter.admit(key, uses_tokens=True)
    limiter.charge(key, 10, cost=0.25)
    with pytest.raises(QuotaExceeded) as refused:
        limiter.admit(key, uses_tokens=True)
    assert "this key's monthly budget of 5.00 EUR is spent; it renews on 2026-12-01" in str(
        refused.value
    )


def test_both_budgets_hold_at_once():
    clock = Clock()
    limiter = RateLimiter(lambda key, unit, month: 0, clock=clock, now=lambda: clock.wall)
    key = principal(monthly_token_budget=100, monthly_cost_budget=1.0)
    limiter.load_budget(key)
    limiter.charge(key, 100, cost=0.01)  # tokens spent first
    with pytest.raises(QuotaExceeded, match="100 tokens"):
        limiter.admit(key, uses_tokens=True)
