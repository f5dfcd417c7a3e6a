"""Per-key limits, counted exactly inside one server process.

Requests and tokens per minute use a sliding 60-second window (a log of what happened), so
200 requests arriving together against a limit of N let exactly N through. The monthly
budgets, in tokens and in cost, start from what the usage records say for the month, so they
survive a restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from maas.auth.principal import Budget, Principal
from maas.errors import QuotaExceeded, RateLimited

WINDOW = 60.0


@dataclass
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    tokens_in_window: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class Admission:
    """A request let in; release it when the response is done."""

    key_id: str


def month_of(when: datetime) -> str:
    return when.strftime("%Y-%m")


class RateLimiter:
    def __init__(
        self,
        month_used: Callable[[str, str, str], float],
        *,
        currency: Callable[[], str | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``month_used(key_id, unit, "YYYY-MM")`` reads what a key and every key created
        under it (a budget covers them all) used in a month: tokens (``unit`` "tokens") or
        cost at the price table (``unit`` "cost"). ``currency()`` names the table's."""
        self._month_used = month_used
        self._currency = currency
        self._clock = clock
        self._now = now
        self._states: dict[str, _KeyState] = {}
        self._months: dict[tuple[str, str], tuple[str, float]] = {}
        """(key_id, unit) -> (month, used) of each budget in use."""
        self._lock = threading.Lock()

    def needs_budget(self, principal: Principal) -> bool:
        """True when a budget the key draws from has no total for this month yet."""
        period = month_of(self._now())
        return any(self._month(budget)[0] != period for budget in _pools(principal))

    def load_budget(self, principal: Principal) -> None:
        """Read the month's use from the usage records (blocking: call off the event loop)."""
        period = month_of(self._now())
        for budget in _pools(principal):
            if self._month(budget)[0] == period:
                continue
            used = self._month_used(budget.key_id, budget.unit, period)
            with self._lock:
                if self._month(budget)[0] != period:
                    self._months[(budget.key_id, budget.unit)] = (period, used)

    def _month(self, budget: Budget) -> tuple[str, float]:
        return self._months.get((budget.key_id, budget.unit), ("", 0))

    def admit(self, principal: Principal, *, uses_tokens: bool) -> Admission:
        """Let a request in, or raise RateLimited / QuotaExceeded."""
        limits = principal.limits
        with self._lock:
            state = self._state(principal.key_id)
            now = self._clock()
            self._expire(state, now)
            if uses_tokens:
                self._check_budget(principal)
            if limits.max_concurrent is not None and state.in_flight >= limits.max_concurrent:
                raise RateLimited(
                    f"this key already has {state.in_flight} requests in flight "
                    f"(limit {limits.max_concurrent})",
                    retry_after=1.0,
                    state=self._state_headers(principal, state, now),
                )
            rpm = limits.requests_per_minute
            if rpm is not None and len(state.requests) >= rpm:
                raise RateLimited(
                    f"rate limit of {rpm} requests per minute reached",
                    retry_after=state.requests[0] + WINDOW - now,
                    state=self._state_headers(principal, state, now),
                )
            if uses_tokens:
                self._check_tokens_per_minute(principal, state, now)
            state.requests.append(now)
            state.in_flight += 1
            return Admission(principal.key_id)

    def check_tokens(self, principal: Principal) -> None:
        """The token checks alone, for a request already admitted."""
        with self._lock:
            state = self._state(principal.key_id)
            now = self._clock()
            self._expire(state, now)
            self._check_budget(principal)
            self._check_tokens_per_minute(principal, state, now)

    def release(self, admission: Admission) -> None:
        with self._lock:
            state = self._states.get(admission.key_id)
            if state is not None:
                state.in_flight -= 1

    def charge(self, principal: Principal, tokens: int, cost: float = 0.0) -> None:
        """Count the tokens a request used and what it cost (after it ran) against the minute
        window and against every budget the key draws from."""
        if tokens <= 0 and cost <= 0:
            return
        period = month_of(self._now())
        spent = {"tokens": max(tokens, 0), "cost": max(cost, 0.0)}
        with self._lock:
            if tokens > 0:
                state = self._state(principal.key_id)
                state.tokens.append((self._clock(), tokens))
                state.tokens_in_window += tokens
            for budget in _pools(principal):
                month, used = self._month(budget)
                if month == period:
                    self._months[(budget.key_id, budget.unit)] = (month, used + spent[budget.unit])

    def headers(self, principal: Principal) -> dict[str, str]:
        """``x-ratelimit-*`` headers for a response to this key."""
        with self._lock:
            state = self._state(principal.key_id)
            now = self._clock()
            self._expire(state, now)
            return self._state_headers(principal, state, now)

    def _check_tokens_per_minute(self, principal: Principal, state: _KeyState, now: float) -> None:
        tpm = principal.limits.tokens_per_minute
        if tpm is not None and state.tokens_in_window >= tpm:
            raise RateLimited(
                f"rate limit of {tpm} tokens per minute reached",
                retry_after=state.tokens[0][0] + WINDOW - now,
                state=self._state_headers(principal, state, now),
            )

    def _check_budget(self, principal: Principal) -> None:
        now = self._now()
        period = month_of(now)
        for budget in _pools(principal):
            month, used = self._month(budget)
            if month != period or used < budget.amount:
                continue
            whose = "this key's" if budget.key_id == principal.key_id else f"key {budget.key_id}'s"
            next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
            if budget.unit == "tokens":
                amount = f"{int(budget.amount)} tokens"
            else:
                amount = f"{budget.amount:.2f} {self._currency() or '(price table currency)'}"
            raise QuotaExceeded(
                f"{whose} monthly budget of {amount} is spent; it renews on "
                f"{next_month.date().isoformat()}",
                retry_after=(next_month - now).total_seconds(),
            )

    def _state(self, key_id: str) -> _KeyState:
        state = self._states.get(key_id)
        if state is None:
            state = self._states[key_id] = _KeyState()
        return state

    @staticmethod
    def _expire(state: _KeyState, now: float) -> None:
        while state.requests and state.requests[0] <= now - WINDOW:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= now - WINDOW:
            state.tokens_in_window -= state.tokens.popleft()[1]

    @staticmethod
    def _state_headers(principal: Principal, state: _KeyState, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        rpm, tpm = principal.limits.requests_per_minute, principal.limits.tokens_per_minute
        if rpm is not None:
            oldest = state.requests[0] if state.requests else now
            headers["limit-requests"] = str(rpm)
            headers["remaining-requests"] = str(max(0, rpm - len(state.requests)))
            headers["reset-requests"] = f"{max(0.0, oldest + WINDOW - now):.3f}s"
        if tpm is not None:
            oldest = state.tokens[0][0] if state.tokens else now
            headers["limit-tokens"] = str(tpm)
            headers["remaining-tokens"] = str(max(0, tpm - state.tokens_in_window))
            headers["reset-tokens"] = f"{max(0.0, oldest + WINDOW - now):.3f}s"
        return headers


def _pools(principal: Principal) -> tuple[Budget, ...]:
    """The budgets a key draws from: its own and those of the keys above it."""
    if principal.budgets:
        return principal.budgets
    own = (
        ("tokens", principal.limits.monthly_token_budget),
        ("cost", principal.limits.monthly_cost_budget),
    )
    return tuple(
        Budget(principal.key_id, unit, amount) for unit, amount in own if amount is not None
    )
