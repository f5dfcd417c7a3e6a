"""A worker process: claims jobs one at a time and runs them, heartbeating on a thread.

``maas worker`` runs one; ``maas serve`` starts ``MAAS_JOB_WORKERS`` of them beside the server
(separate processes: a training step never runs on the server's event loop or holds its GIL).
A worker asked to stop (SIGTERM, SIGINT) stops its job at the job's next progress report and
puts it back in the queue, so the next worker resumes it from its checkpoint at once; a worker
that dies (kill -9) loses its job when the lease runs out, and the next worker resumes it then.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

from maas.config import Settings
from maas.db import make_engine, upgrade
from maas.db.tables import utcnow
from maas.jobs.kinds import JobKind, job_kinds
from maas.jobs.records import JobStatus
from maas.jobs.store import Cancelled, JobStore, Lease, LeaseLost, Report

log = logging.getLogger(__name__)


PARENT_VARIABLE = "MAAS_JOB_WORKER_PARENT"
"""Set by ``WorkerPool`` to the server's PID: a worker whose server died (killed, so it could
not stop its workers) stops too, instead of running on alone."""


FLUSH_SECONDS = 0.5
"""How often a running job's queued reports are written."""


class Stopping(Exception):
    """The worker is stopping; its job goes back to the queue."""


class JobContext:
    """What a running job sees: its parameters, a folder of its own for checkpoints, and
    ``report`` for progress. Every report ends by checking whether the job must stop."""

    def __init__(self, store: JobStore, lease: Lease, settings: Settings, stop: threading.Event):
        self.store = store
        self.lease = lease
        self.settings = settings
        self.params: dict[str, Any] = lease.job.params
        self.job_id = lease.job.id
        self.attempt = lease.attempt
        self.workdir = settings.home / "jobs" / lease.job.id
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._stop = stop
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.finished = False
        self._pending: list[Report] = []
        self._lock = threading.Lock()

    def finish_in(self, session, result: dict[str, Any]) -> None:
        """Record success inside another write's transaction (the registry's import of the
        job's model): both commit, or neither, and only while this attempt holds the lease."""
        self.check()
        self.flush(session)
        self.store.finish(self.lease, JobStatus.succeeded, result=result, session=session)
        self.finished = True

    def resume_point(self) -> dict[str, Any] | None:
        """The last checkpoint's description, as ``report(checkpoint=...)`` saved it."""
        return self.store.checkpoint(self.lease)

    def check(self) -> None:
        """Raise if the job must stop: lease lost, cancelled, or the worker stopping."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost")
        if self.cancelled.is_set():
            raise Cancelled(self.job_id)
        if self._stop.is_set():
            raise Stopping(self.job_id)

    def report(
        self,
        progress: float | None = None,
        *,
        message: str | None = None,
        step: int | None = None,
        metrics: dict[str, float] | None = None,
        checkpoint: dict[str, Any] | None = None,
        level: str = "info",
        stage: str | None = None,
    ) -> None:
        """Queue progress, an event and the checkpoint just written for the job's reporter
        thread (the training loop never waits on the database), then raise if the job must
        stop. The queue is flushed before the job ends or is handed back, so a stopped
        job's last checkpoint is always the one on record."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job_id}: lease lost")
        report = Report(utcnow(), progress, message, level, step, metrics, checkpoint, stage)
        with self._lock:
            self._pending.append(report)
        self.check()

    def flush(self, session=None) -> None:
        """Write the queued reports now, in one transaction (``session``'s, if given: a
        second writer would wait on SQLite's lock that session holds); LeaseLost if fenced
        out."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            self.store.report_many(self.lease, pending, session=session)
        except LeaseLost:
            self.lost.set()
            raise
        except Exception:
            with self._lock:  # the database away for a moment: keep them for the next flush
                self._pending[:0] = pending
            raise


class Worker:
    def __init__(
        self,
        settings: Settings,
        *,
        owner: str | None = None,
        kinds: dict[str, JobKind] | None = None,
    ) -> None:
        self.settings = settings
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.kinds = kinds if kinds is not None else job_kinds(settings.job_plugins)
        self.engine = make_engine(settings.database_url)
        upgrade(self.engine)  # as the registry does when it opens: a fresh home works
        self.store = JobStore(self.engine)
        self.stop = threading.Event()

    def run(self, max_jobs: int | None = None) -> int:
        """Claim and run jobs until asked to stop (or ``max_jobs`` ran); returns how many."""
        done = 0
        log.info("worker %s: kinds %s", self.owner, ", ".join(sorted(self.kinds)) or "none")
        while not self.stop.is_set() and (max_jobs is None or done < max_jobs):
            if self._orphaned():
                log.warning("worker %s: its server is gone; stopping", self.owner)
                break
            lease = self.store.claim(self.owner, tuple(self.kinds), self.settings.job_lease_seconds)
            if lease is None:
                self.stop.wait(self.settings.job_poll_seconds)
                continue
            self.run_one(lease)
            done += 1
        return done

    def _orphaned(self) -> bool:
        parent = os.environ.get(PARENT_VARIABLE)
        return parent is not None and os.getppid() != int(parent)

    def run_one(self, lease: Lease) -> None:
        context = JobContext(self.store, lease, self.settings, self.stop)
        beating = threading.Event()
        heart = threading.Thread(
            target=self._heartbeat, args=(context, beating), name="job-heartbeat", daemon=True
        )
        heart.start()
        log.info("job %s (%s): attempt %d", lease.job.id, lease.job.kind, lease.attempt)
        try:
            result = self.kinds[lease.job.kind].run(context)
            if not context.finished:  # unless the kind recorded it with its registered model
                context.flush()
                self.store.finish(lease, JobStatus.succeeded, result=result)
        except Cancelled:
            self._quietly(context.flush)
            self._end(lease, JobStatus.cancelled)
        except Stopping:
            self._quietly(context.flush)
            self._quietly(lambda: self.store.release(lease, f"worker {self.owner} stopped"))
        except LeaseLost:
            log.warning("job %s: lease lost; its next attempt runs elsewhere", lease.job.id)
        except Exception as err:  # the job's own failure: recorded, never retried blindly
            log.exception("job %s failed", lease.job.id)
            error = {
                "message": str(err) or type(err).__name__,
                "type": type(err).__name__,
                "param": getattr(err, "param", None),
                "trace": traceback.format_exc(limit=8),
            }
            self._end(lease, JobStatus.failed, error=error)
        finally:
            beating.set()
            heart.join(timeout=10)

    def _end(self, lease: Lease, status: JobStatus, error: dict | None = None) -> None:
        self._quietly(lambda: self.store.finish(lease, status, error=error))

    @staticmethod
    def _quietly(write) -> None:
        try:
            write()
        except LeaseLost:
            log.warning("lease lost before the job's end was recorded")

    def _heartbeat(self, context: JobContext, done: threading.Event) -> None:
        """Flush the job's reports every ``FLUSH_SECONDS``; heartbeat every third of the lease."""
        interval = self.settings.job_lease_seconds / 3
        last_beat = time.monotonic()
        while not done.wait(min(FLUSH_SECONDS, interval)):
            if self._orphaned():
                self.stop.set()  # the job goes back to the queue at its next report
            try:
                context.flush()
                if time.monotonic() - last_beat >= interval:
                    last_beat = time.monotonic()
                    if self.store.heartbeat(context.lease, self.settings.job_lease_seconds):
                        context.cancelled.set()
            except LeaseLost:
                context.lost.set()
                return
            except Exception:  # the database away for a moment: try again next time
                log.warning("heartbeat failed", exc_info=True)


def run_worker(settings: Settings) -> None:
    """``maas worker``: until SIGTERM or SIGINT."""
    worker = Worker(settings)

    def stop(signum, _frame) -> None:
        log.info("worker %s: signal %d, stopping after the current step", worker.owner, signum)
        worker.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.run()
    finally:
        worker.engine.dispose()


def worker_environment(environ: Mapping[str, str], parent: int) -> dict[str, str]:
    """The environment of a worker ``maas serve`` starts: the server's, naming its parent,
    with OpenMP threads that sleep while they wait (unless ``OMP_WAIT_POLICY`` is set).

    A job's processes share the cores with the server's engines, and PyTorch's OpenMP
    threads spin while they wait for work. ``bench/omp_sharing.py`` on two cores, two
    processes of two threads each running a decode-sized loop (2.5 s alone): both spinning,
    57 s each (medians; 10 to 122 s); both sleeping, 4.3; one spinning beside one sleeping,
    7.0 and 4.4. Engines keep spinning: alone, that is worth 10 to 25% of a stream's
    tokens per second (docs/performance.md)."""
    return {
        **environ,
        "OMP_WAIT_POLICY": environ.get("OMP_WAIT_POLICY", "PASSIVE"),
        PARENT_VARIABLE: str(parent),
    }


class WorkerPool:
    """The worker processes ``maas serve`` runs beside the server: started with it, restarted
    if one dies, asked to stop (SIGTERM: each puts its job back in the queue) when it stops."""

    RESTART_DELAY = 2.0
    MAX_RESTART_DELAY = 60.0
    SHORT_LIFE = 10.0
    """A worker that exits sooner than this after its start waits twice as long before the
    next restart (a worker that cannot start, say a broken plugin, is not respawned in a
    tight loop)."""

    def __init__(self, count: int, stop_timeout: float = 30.0) -> None:
        self.count = count
        self.stop_timeout = stop_timeout
        self.processes: list[subprocess.Popen] = []
        self._started: list[float] = []
        self._delays: list[float] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        if self.count == 0:
            return
        self.processes = [self._spawn() for _ in range(self.count)]
        self._started = [time.monotonic()] * self.count
        self._delays = [self.RESTART_DELAY] * self.count
        self._watcher = threading.Thread(target=self._watch, name="job-workers", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stopping.set()
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)

    def _spawn(self) -> subprocess.Popen:
        env = worker_environment(os.environ, os.getpid())
        return subprocess.Popen([sys.executable, "-m", "maas", "worker"], env=env)

    def _watch(self) -> None:
        while not self._stopping.wait(1.0):
            self.restart_exited(time.monotonic())

    def restart_exited(self, now: float) -> None:
        """Start a new worker in each slot whose worker exited, once the slot's delay since
        its last start has passed."""
        for index, process in enumerate(self.processes):
            if process.poll() is None or self._stopping.is_set():
                continue
            lived = now - self._started[index]
            if lived < self._delays[index]:
                continue
            log.warning(
                "job worker %d exited (%s): starting another", process.pid, process.returncode
            )
            short = lived < self.SHORT_LIFE + self._delays[index]
            self._delays[index] = (
                min(self._delays[index] * 2, self.MAX_RESTART_DELAY)
                if short
                else self.RESTART_DELAY
            )
            self.processes[index] = self._spawn()
            self._started[index] = now
