"""API key -> Principal, with a short cache so a request costs one HMAC, not a query."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from maas.auth.keys import key_id_of, matches
from maas.auth.principal import Principal
from maas.auth.store import KeyStore
from maas.errors import Unauthenticated

CACHE_SECONDS = 5.0
"""How long a key's row is trusted before it is read again: revoking a key from another
process (the CLI) takes effect on a running server within this time."""


@dataclass(frozen=True)
class _Entry:
    secret_hash: str
    principal: Principal
    revoked_at: datetime | None
    loaded_at: float


class Authenticator:
    def __init__(
        self,
        keys: KeyStore,
        server_secret: bytes,
        *,
        cache_seconds: float = CACHE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._keys = keys
        self._secret = server_secret
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Principal | None:
        """The principal if the key's row is in the cache (and still fresh); else None."""
        entry = self._cache.get(key_id_of(token))
        if entry is None or self._clock() - entry.loaded_at > self._cache_seconds:
            return None
        return self._check(token, entry)

    def authenticate(self, token: str) -> Principal:
        """Check a presented key; reads the database on a cache miss (call off the event loop)."""
        return self.cached(token) or self._check(token, self._load(key_id_of(token)))

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._cache.pop(key_id, None)

    def _load(self, key_id: str) -> _Entry:
        found = self._keys.lookup(key_id)
        if found is None:
            raise Unauthenticated("invalid API key")
        entry = _Entry(*found, loaded_at=self._clock())
        with self._lock:
            self._cache[key_id] = entry
        return entry

    def _check(self, token: str, entry: _Entry) -> Principal:
        if not matches(self._secret, token, entry.secret_hash):
            raise Unauthenticated("invalid API key")
        if entry.revoked_at is not None:
            raise Unauthenticated("this API key has been revoked")
        expires_at = entry.principal.expires_at
        if expires_at is not None and expires_at <= datetime.now(UTC):
            raise Unauthenticated(f"this API key expired at {expires_at.isoformat()}")
        return entry.principal
