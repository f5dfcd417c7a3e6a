"""Per-key limits, counted exactly inside one server process.

Requests and tokens per minute use a sliding 60-second window (a log of what happened), so
200 requests arriving together against a limit of N let exactly N through. The monthly token
budget starts from what the usage records say for the month, so it survives a restart.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from maas.auth.principal import Principal
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
        month_tokens: Callable[[str, str], int],
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``month_tokens(key_id, "YYYY-MM")`` reads the tokens recorded in a month by a key
        and every key created under it (a budget covers them all)."""
        self._month_tokens = month_tokens
        self._clock = clock
        self._now = now
        self._states: dict[str, _KeyState] = {}
        self._months: dict[str, tuple[str, int]] = {}
        """key_id -> (month, tokens used) of each budget in use."""
        self._lock = threading.Lock()

    def needs_budget(self, principal: Principal) -> bool:
        """True when a budget the key draws from has no total for this month yet."""
        period = month_of(self._now())
        return any(
            self._months.get(key_id, ("", 0))[0] != period for key_id, _ in _pools(principal)
        )

    def load_budget(self, principal: Principal) -> None:
        """Read the month's tokens from the usage records (blocking: call off the event loop)."""
        period = month_of(self._now())
        for key_id, _ in _pools(principal):
            if self._months.get(key_id, ("", 0))[0] == period:
                continue
            used = self._month_tokens(key_id, period)
            with self._lock:
                if self._months.get(key_id, ("", 0))[0] != period:
                    self._months[key_id] = (period, used)

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

    def charge(self, principal: Principal, tokens: int) -> None:
        """Count tokens a request used (after it ran) against the minute window and against
        every budget the key draws from."""
        if tokens <= 0:
            return
        period = month_of(self._now())
        with self._lock:
            state = self._state(principal.key_id)
            state.tokens.append((self._clock(), tokens))
            state.tokens_in_window += tokens
            for key_id, _ in _pools(principal):
                month, used = self._months.get(key_id, ("", 0))
                if month == period:
                    self._months[key_id] = (month, used + tokens)

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
        for key_id, budget in _pools(principal):
            month, used = self._months.get(key_id, ("", 0))
            if month != period or used < budget:
                continue
            whose = "this key's" if key_id == principal.key_id else f"key {key_id}'s"
            next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
            raise QuotaExceeded(
                f"{whose} monthly budget of {budget} tokens is spent; it renews on "
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


def _pools(principal: Principal) -> tuple[tuple[str, int], ...]:
    """The budgets a key draws from: its own and those of the keys above it."""
    if principal.budgets:
        return principal.budgets
    budget = principal.limits.monthly_token_budget
    return ((principal.key_id, budget),) if budget is not None else ()
