"""maas's log lines: API keys blanked in every one, and the processes maas starts (an engine
process, a pipeline stage) logging as the server itself does.

A process started with multiprocessing's ``spawn`` begins with logging unconfigured: its
INFO lines (the dtype chosen at load and what each candidate measured, the compiled step's
timings, "ready in") were dropped, and a server's log said nothing for the minute a first
load can take. The parent takes ``ChildLogging.of_parent()`` and passes it to the child,
which calls ``apply()`` first thing: a handler on the standard error it shares with the
parent, at the parent's level, in uvicorn's format with the process's name in front::

    INFO:     (engine-smollm2-135m-instruct:1) dtype int8: 16.2 ms a step alone, ...
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

KEY_PATTERN = re.compile(r"(maas-[a-z0-9]{12}_)[A-Za-z0-9_\-]+")


class RedactKeys(logging.Filter):
    """Blank the secret part of any API key in a log line (e.g. one sent in a URL, which
    the server refuses but the access log would otherwise still print)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                KEY_PATTERN.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        if isinstance(record.msg, str):
            record.msg = KEY_PATTERN.sub(r"\1***", record.msg)
        return True


class ChildFormatter(logging.Formatter):
    """uvicorn's plain format ("INFO:     message"), the process's name before the message."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"{record.levelname}:".ljust(9)
        return f"{prefix} ({record.processName}) {super().format(record)}"


@dataclass(frozen=True)
class ChildLogging:
    """How a child process logs: at ``level`` (the parent's for the ``maas`` logger)."""

    level: int

    @classmethod
    def of_parent(cls) -> ChildLogging:
        return cls(logging.getLogger("maas").getEffectiveLevel())

    def apply(self) -> None:
        """In the child: its ``maas`` lines to standard error at the parent's level."""
        handler = logging.StreamHandler()
        handler.setFormatter(ChildFormatter())
        handler.addFilter(RedactKeys())
        logger = logging.getLogger("maas")
        logger.handlers[:] = [handler]
        logger.setLevel(self.level)
        logger.propagate = False
