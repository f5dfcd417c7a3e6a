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
    period: str = ""
    month_tokens: int | None = None
    """Tokens used this calendar month; None until read from the usage records."""


@dataclass(frozen=True)
class Admission:
    """A request let in; release it when the response is done."""

    key_id: str
    counts_concurrency: bool


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
        """``month_tokens(key_id, "YYYY-MM")`` reads a key's recorded tokens for a month."""
        self._month_tokens = month_tokens
        self._clock = clock
        self._now = now
        self._states: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    def needs_budget(self, principal: Principal) -> bool:
        """True when the key has a budget whose month total is not loaded yet."""
        if principal.limits.monthly_token_budget is None:
            return False
        state = self._states.get(principal.key_id)
        return state is None or state.month_tokens is None or state.period != month_of(self._now())

    def load_budget(self, principal: Principal) -> None:
        """Read the month's tokens from the usage records (blocking: call off the event loop)."""
        period = month_of(self._now())
        used = self._month_tokens(principal.key_id, period)
        with self._lock:
            state = self._state(principal.key_id)
            if state.period != period or state.month_tokens is None:
                state.period, state.month_tokens = period, used

    def admit(self, principal: Principal, *, uses_tokens: bool) -> Admission:
        """Let a request in, or raise RateLimited / QuotaExceeded."""
        limits = principal.limits
        with self._lock:
            state = self._state(principal.key_id)
            now = self._clock()
            self._expire(state, now)
            if uses_tokens and limits.monthly_token_budget is not None:
                self._check_budget(principal, state)
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
            tpm = limits.tokens_per_minute
            if uses_tokens and tpm is not None and state.tokens_in_window >= tpm:
                raise RateLimited(
                    f"rate limit of {tpm} tokens per minute reached",
                    retry_after=state.tokens[0][0] + WINDOW - now,
                    state=self._state_headers(principal, state, now),
                )
            state.requests.append(now)
            state.in_flight += 1
            return Admission(principal.key_id, counts_concurrency=True)

    def release(self, admission: Admission) -> None:
        with self._lock:
            state = self._states.get(admission.key_id)
            if state is not None and admission.counts_concurrency:
                state.in_flight -= 1

    def charge(self, key_id: str, tokens: int) -> None:
        """Count tokens a request used (after it ran) against the minute window and month."""
        if tokens <= 0:
            return
        with self._lock:
            state = self._state(key_id)
            state.tokens.append((self._clock(), tokens))
            state.tokens_in_window += tokens
            if state.month_tokens is not None and state.period == month_of(self._now()):
                state.month_tokens += tokens

    def headers(self, principal: Principal) -> dict[str, str]:
        """``x-ratelimit-*`` headers for a response to this key."""
        with self._lock:
            state = self._state(principal.key_id)
            now = self._clock()
            self._expire(state, now)
            return self._state_headers(principal, state, now)

    def _check_budget(self, principal: Principal, state: _KeyState) -> None:
        budget = principal.limits.monthly_token_budget
        if state.month_tokens is not None and budget is not None and state.month_tokens >= budget:
            now = self._now()
            next_month = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC)
            raise QuotaExceeded(
                f"this key's monthly budget of {budget} tokens is spent; it renews on "
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
