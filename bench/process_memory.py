"""Resident memory (RSS) of a process tree: a server and every process under it, read from /proc.

The tree's RSS is the sum of its processes' ``VmRSS``, so pages two processes share (the same
shared library mapped in both) count once in each.
"""

from __future__ import annotations

import os
import threading


def tree_rss(root: int) -> int:
    """Resident bytes of ``root`` and every process under it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as status:
                line = next(line for line in status if line.startswith("VmRSS:"))
            total += int(line.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return total


class PeakRss:
    """The largest :func:`tree_rss` of ``root``'s tree while in the ``with`` block, sampled by a
    thread every ``interval`` seconds (a thread, so that it samples whatever the caller does)."""

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
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
            self.peak = max(self.peak, tree_rss(self.root))
            if self._stop.wait(self.interval):
                return
