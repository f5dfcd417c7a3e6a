"""maas serve's worker pool restarts a worker that exits, and backs off when one keeps dying."""

from __future__ import annotations

from maas.jobs.worker import PARENT_VARIABLE, WorkerPool, worker_environment


class Process:
    def __init__(self, exited: bool) -> None:
        self.exited = exited
        self.pid, self.returncode = 4242, 1 if exited else None

    def poll(self):
        return self.returncode if self.exited else None


def pool_with(processes) -> tuple[WorkerPool, list[Process]]:
    pool = WorkerPool(len(processes))
    spawned: list[Process] = []

    def spawn() -> Process:
        spawned.append(Process(exited=True))  # each new one dies at once too
        return spawned[-1]

    pool._spawn = spawn
    pool.processes = list(processes)
    pool._started = [0.0] * len(processes)
    pool._delays = [WorkerPool.RESTART_DELAY] * len(processes)
    return pool, spawned


def test_a_live_worker_is_left_alone():
    pool, spawned = pool_with([Process(exited=False)])
    pool.restart_exited(100.0)
    assert spawned == []


def test_a_worker_that_keeps_dying_is_restarted_ever_more_slowly():
    pool, spawned = pool_with([Process(exited=True)])
    starts = []
    for second in range(0, 200):
        before = len(spawned)
        pool.restart_exited(float(second))
        if len(spawned) > before:
            starts.append(second)
    gaps = [b - a for a, b in zip([0, *starts], starts, strict=False)]
    assert gaps[:5] == [2, 4, 8, 16, 32]  # doubling from RESTART_DELAY
    assert max(gaps) == WorkerPool.MAX_RESTART_DELAY  # and capped


def test_a_worker_that_ran_a_while_is_restarted_at_the_short_delay():
    pool, spawned = pool_with([Process(exited=True)])
    pool._delays = [32.0]
    pool.restart_exited(1000.0)  # it lived long: back to the short delay
    assert len(spawned) == 1 and pool._delays == [WorkerPool.RESTART_DELAY]


def test_nothing_is_restarted_once_the_pool_is_stopping():
    pool, spawned = pool_with([Process(exited=True)])
    pool._stopping.set()
    pool.restart_exited(100.0)
    assert spawned == []


def test_workers_threads_sleep_while_they_wait_unless_the_user_says_otherwise():
    env = worker_environment({"PATH": "/bin"}, parent=42)
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE", PARENT_VARIABLE: "42"}
    assert worker_environment({"OMP_WAIT_POLICY": "ACTIVE"}, 42)["OMP_WAIT_POLICY"] == "ACTIVE"
