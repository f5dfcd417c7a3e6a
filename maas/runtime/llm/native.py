"""C kernels built at first use with the system C compiler (the one inductor needs) into
``kernels/`` of the local cache (local_cache.py), named by their source, flags, compiler and
machine, written atomically, and loaded with ctypes. A kernel that cannot be built (no
compiler, no cache folder) is ``None``, once: its callers keep a PyTorch form beside it.

A C++ source (``.cpp``) is built with the C++ compiler, with the C sources it names compiled
by the C compiler and linked into the same library (torch_ops.cpp: PyTorch operators around
the kernels); its own flags (``flags``) go to the C++ compiler only."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from maas.runtime.local_cache import cache_root

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-fno-math-errno", "-fno-trapping-math")


class NativeLibrary:
    def __init__(
        self,
        source: Path,
        declare: Callable[[ctypes.CDLL], None],
        *,
        libraries: tuple[str, ...] = (),
        fallback: str,
        c_sources: tuple[Path, ...] = (),
        flags: tuple[str, ...] = (),
        made_for: str = "",
    ) -> None:
        self.source = source
        self.declare = declare
        """Sets the functions' argument and result types (a missing one raises)."""
        self.libraries = libraries
        self.c_sources = c_sources
        """C files built into a C++ source's library."""
        self.flags = flags
        """Compiler flags beyond ``FLAGS`` (include folders, defines)."""
        self.made_for = made_for
        """What else the build depends on and names it (the torch version it is built
        against)."""
        self.fallback = fallback
        """What runs instead, for the warning when it cannot be built."""
        self._lock = threading.Lock()
        self._library: ctypes.CDLL | None = None
        self._built: Path | None = None
        self._failed = False

    def load(self) -> ctypes.CDLL | None:
        """The built library, building it on first use; None if it cannot be built."""
        with self._lock:
            if self._library is None and not self._failed:
                try:
                    self._built = self.build()
                    library = ctypes.CDLL(str(self._built))
                    self.declare(library)
                    self._library = library
                except subprocess.CalledProcessError as err:
                    self._failed = True
                    stderr = (err.stderr or b"").decode(errors="replace").strip()[-2000:]
                    log.warning("%s not built, %s: %s", self.source.name, self.fallback,
                                stderr or err)  # fmt: skip
                except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
                    self._failed = True  # no compiler, no cache folder, a symbol missing
                    log.warning("%s not built, %s: %s", self.source.name, self.fallback, err)
            return self._library

    def built_name(self) -> str:
        """The built file's name, which names its source, flags, compiler and machine ("" if
        it is not built)."""
        return self._built.name if self._built is not None and self._library else ""

    def build(self) -> Path:
        compilers = [_compiler(C)]
        if self.source.suffix == ".cpp":
            compilers.append(_compiler(CXX))
        versions = [_version(compiler) for compiler in compilers]
        sources = [*self.c_sources, self.source]
        command = FLAGS + self.flags + self.libraries
        made_from = [*(s.read_bytes() for s in sources), " ".join(command).encode(), *versions]
        made_from.append(platform.machine().encode())  # a shared cache folder serves many hosts
        made_from.append(self.made_for.encode())
        key = hashlib.sha256(b"\0".join(made_from)).hexdigest()[:16]
        target = cache_root() / "kernels" / f"{self.source.stem}-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            built = Path(work) / target.name
            objects = []
            for c_source in self.c_sources:  # C files by the C compiler, each on its own
                objects.append(str(Path(work) / f"{c_source.stem}.o"))
                _run([compilers[0], *FLAGS, "-c", str(c_source), "-o", objects[-1]])
            _run([compilers[-1], *FLAGS, *self.flags, "-o", str(built), *objects,
                  str(self.source), *self.libraries])  # fmt: skip
            os.replace(built, target)  # atomic: a concurrent build writes the same bytes
        return target


C, CXX = ("cc", "gcc"), ("c++", "g++")


def _compiler(names: tuple[str, ...]) -> str:
    compiler = next(filter(None, map(shutil.which, names)), None)
    if compiler is None:
        raise OSError(f"no {'C++' if names == CXX else 'C'} compiler on PATH")
    return compiler


def _version(compiler: str) -> bytes:
    done = subprocess.run([compiler, "--version"], capture_output=True, timeout=30, check=True)
    return done.stdout.split(b"\n")[0]


def _run(command: list[str]) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=120)
