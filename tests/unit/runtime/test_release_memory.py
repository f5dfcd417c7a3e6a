"""After a load, the heap's freed pages go back to the system instead of staying resident."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from maas.runtime.memory import release_freed_memory

def rss_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmRSS:")[1].split()[0]) // 1024

big = bytearray(16 << 20)  # freed, it raises glibc's mmap threshold to 16 MB, so
del big  # the blocks below come from the heap, as a model load's tensors do
blocks = [bytearray(1 << 20) for _ in range(200)]  # 200 MB
for block in blocks:
    block[::4096] = b"x" * 256  # a byte in every page: resident
keep = blocks[-1]  # the top of the heap stays in use: only a trim can give the rest back
del blocks
before = rss_mb()
released = release_freed_memory()
print(before, rss_mb(), released)
"""


def test_freed_heap_pages_are_given_back():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    before, after, released = done.stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 150, done.stdout  # of the 199 MB freed
