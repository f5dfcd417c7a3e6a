"""Write usage records in batches on a background thread, so metering never slows or fails
a request. A clean shutdown flushes everything; if the database cannot take the last batch,
it is spilled to a JSON-lines file under MAAS_HOME and loaded at the next start."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, insert

from maas.db.tables import UsageRecord
from maas.messages import UsageEvent

log = logging.getLogger(__name__)

FLUSH_SECONDS = 0.5
BATCH = 1000
MAX_PENDING = 200_000
"""Past this many unwritten records (the database is down), they are spilled to a file."""
SPILL_GLOB = "usage-unsaved-*.jsonl"


class UsageRecorder:
    def __init__(
        self,
        engine: Engine,
        spill_dir: Path,
        *,
        on_flush: Callable[[dict[str, datetime]], None] | None = None,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        """``on_flush`` gets {key_id: last time used} for each written batch."""
        self._engine = engine
        self._spill_dir = spill_dir
        self._on_flush = on_flush
        self._flush_seconds = flush_seconds
        self._pending: deque[UsageEvent] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._write_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._load_spills()
        self._thread = threading.Thread(target=self._run, name="maas-usage", daemon=True)
        self._thread.start()

    def record(self, event: UsageEvent) -> None:
        """Queue one record; never blocks on the database and never raises."""
        self._pending.append(event)
        if len(self._pending) >= BATCH:
            self._wake.set()

    def flush(self) -> int:
        """Write what is queued at the time of the call; returns how many records."""
        written = 0
        with self._write_lock:
            remaining = len(self._pending)  # not what keeps arriving meanwhile
            while remaining > 0 and self._pending:
                size = min(BATCH, remaining, len(self._pending))
                batch = [self._pending.popleft() for _ in range(size)]
                remaining -= size
                try:
                    self._write(batch)
                except Exception:
                    self._pending.extendleft(reversed(batch))  # keep order; try again later
                    raise
                written += len(batch)
        return written

    def close(self) -> None:
        """Stop the thread and write what is left (spilling to a file if the database fails)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.flush()
        except Exception:
            log.exception("could not write %d usage records; spilling them", len(self._pending))
            self._spill()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._flush_seconds)
            self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.exception("writing usage records failed; %d kept for retry", len(self._pending))
                if len(self._pending) > MAX_PENDING:  # a long outage: keep memory bounded
                    with self._write_lock:
                        self._spill()

    def _write(self, batch: list[UsageEvent]) -> None:
        if not batch:
            return
        with self._engine.begin() as connection:
            connection.execute(insert(UsageRecord), [event.to_row() for event in batch])
        if self._on_flush:
            last_used: dict[str, datetime] = {}
            for event in batch:
                key = event.key_id
                if key and (key not in last_used or event.at > last_used[key]):
                    last_used[key] = event.at
            try:
                self._on_flush(last_used)
            except Exception:  # last-used times are a convenience; the records are written
                log.exception("updating keys' last-used times failed")

    def _spill(self) -> None:
        """Write what is queued to a JSON-lines file (temp file, then rename)."""
        events = list(self._pending)
        if not events:
            return
        self._spill_dir.mkdir(parents=True, exist_ok=True)
        name = f"usage-unsaved-{os.getpid()}-{time.time_ns()}.jsonl"
        temporary = self._spill_dir / f".{name}.tmp"
        with open(temporary, "w", encoding="utf-8") as out:
            for event in events:
                out.write(json.dumps(event.to_row(), default=str) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self._spill_dir / name)
        self._pending.clear()

    def _load_spills(self) -> None:
        """Write records spilled at an earlier shutdown; a file goes in one transaction, so a
        failure leaves it whole for the next start. Never stops the server from starting."""
        for path in sorted(self._spill_dir.glob(SPILL_GLOB)):
            try:
                events, bad = _read_spill(path)
                with self._write_lock:
                    self._write(events)
            except Exception:
                log.exception("could not load spilled usage records from %s; kept for later", path)
                continue
            path.unlink()
            if bad:
                log.error("%d unreadable lines in %s were skipped", bad, path.name)
            log.warning("loaded %d usage records spilled at an earlier shutdown", len(events))


def _read_spill(path: Path) -> tuple[list[UsageEvent], int]:
    events, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            row.pop("day", None)
            row["at"] = datetime.fromisoformat(row["at"])
            events.append(UsageEvent(**row))
        except (ValueError, TypeError, KeyError):
            bad += 1
    return events, bad
