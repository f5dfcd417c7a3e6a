"""One exception tree for all of maas. No HTTP here: ``maas.api.errors`` maps it at the edge.

::

    MaasError
     ├── InvalidRequest          the caller sent something we cannot accept
     │    ├── ContextTooLong     prompt plus output do not fit the model's context
     │    ├── InvalidName        a model or alias name breaks the naming rules
     │    ├── InvalidReference   "name", "name:3" or "name@alias" is malformed
     │    ├── UnsupportedFormat  no importer recognises the files
     │    └── RefusedArtifact    the files could run code or escape their folder
     │         └── UnsafeArchive an archive entry is absolute, has "..", links out, or is too big
     ├── NotFound
     │    ├── ModelNotFound
     │    ├── VersionNotFound
     │    └── AliasNotFound
     ├── Unauthenticated         no API key, or one that is unknown, revoked or expired
     ├── PermissionDenied        the key's role or allowed models do not cover the request
     ├── Conflict                the request clashes with what exists (alias in use, ...)
     ├── PayloadTooLarge         the body or file is over a configured limit
     ├── RateLimited             a per-key limit (requests, tokens, concurrency) is reached
     │    └── QuotaExceeded      the key's monthly token budget is spent
     ├── ArtifactCorrupted       files on disk no longer match the version's manifest
     ├── ClientGone              the client hung up before its answer; nobody reads the error
     └── Unavailable             the server cannot take the request now (starting, draining,
          │                      a model restarting); ``retry_after`` says when to come back
          ├── Overloaded         a queue is full
          ├── TimedOut           the work passed its deadline
          └── StageLost          a pipeline stage of a model died; the model is reloaded
"""

from __future__ import annotations


class MaasError(Exception):
    """Base of every error maas raises on purpose. ``str(err)`` is a message for people."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        """The request field the error is about, when there is one."""


class InvalidRequest(MaasError):
    pass


class ContextTooLong(InvalidRequest):
    pass


class InvalidName(InvalidRequest):
    pass


class InvalidReference(InvalidRequest):
    pass


class UnsupportedFormat(InvalidRequest):
    pass


class RefusedArtifact(InvalidRequest):
    pass


class UnsafeArchive(RefusedArtifact):
    pass


class NotFound(MaasError):
    pass


class ModelNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class AliasNotFound(NotFound):
    pass


class Unauthenticated(MaasError):
    pass


class PermissionDenied(MaasError):
    pass


class Conflict(MaasError):
    pass


class PayloadTooLarge(MaasError):
    pass


class RateLimited(MaasError):
    """A limit was reached; ``retry_after`` says when trying again can succeed."""

    def __init__(self, message: str, *, retry_after: float, state: dict[str, str] | None = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.state = state or {}
        """Limit and remaining counts (``x-ratelimit-*`` header names without the prefix)."""


class QuotaExceeded(RateLimited):
    pass


class ArtifactCorrupted(MaasError):
    pass


class ClientGone(MaasError):
    pass


class Unavailable(MaasError):
    def __init__(
        self, message: str, *, retry_after: float | None = None, param: str | None = None
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after = retry_after
        """Seconds after which a retry can succeed, when that is known."""


class TimedOut(Unavailable):
    pass


class StageLost(Unavailable):
    """A pipeline stage stopped answering: its engine cannot go on, and exits."""


class Overloaded(Unavailable):
    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)
