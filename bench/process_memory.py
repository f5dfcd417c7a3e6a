"""Resident memory (RSS) of a process tree: a server and every process under it, read from /proc.

The tree's RSS is the sum of its processes' ``VmRSS``, so pages two processes share (the same
shared library mapped in both) count once in each.
"""

from __future__ import annotations

import os
import threading


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process under it."""
    return sum(rss for _, rss in tree_rss_by_process(root).values())


def tree_rss_by_process(root: int) -> dict[int, tuple[str, int]]:
    """(what it is, resident bytes) of ``root`` and of every process under it, by PID."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as status:
                line = next(line for line in status if line.startswith("VmRSS:"))
            found[pid] = (_role(pid, root), int(line.split()[1]) * 1024)
        except (OSError, StopIteration):
            continue
    return found


def _role(pid: int, root: int) -> str:
    """A short name for a process of the tree, from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    line = " ".join(argv)
    if "resource_tracker" in line:
        return "multiprocessing resource tracker"
    if "spawn_main" in line:
        return "spawned child (engine)"
    if pid == root:
        return "server"
    return " ".join(os.path.basename(arg) for arg in argv[:2]).strip()


class PeakRss:
    """The largest :func:`tree_rss` of ``root``'s tree while in the ``with`` block, sampled by a
    thread every ``interval`` seconds (a thread, so that it samples whatever the caller does),
    and each process's part of the tree at that peak (``at_peak``: role and bytes by PID)."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self.at_peak: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while True:
            processes = tree_rss_by_process(self.root)
            total = sum(rss for _, rss in processes.values())
            if total > self.peak:
                self.peak, self.at_peak = total, processes
            if self._stop.wait(self.interval):
                return
