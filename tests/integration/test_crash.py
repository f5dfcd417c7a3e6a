"""A real crash in the middle of an import: the process is killed while copying."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from maas.config import Settings
from maas.registry import open_registry
from tests.fixtures import files_under, make_hf_folder

IMPORTER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from maas.config import Settings
    from maas.registry import open_registry

    class Stall:
        def start(self, description, total):
            pass
        def advance(self, amount):
            Path(sys.argv[3]).write_text("copying")
            time.sleep(60)

    registry = open_registry(Settings(home=Path(sys.argv[1])))
    registry.import_model(Path(sys.argv[2]), "victim", progress=Stall())
    """
)


def test_killed_import_leaves_no_version_and_is_swept(tmp_path):
    home = tmp_path / "home"
    source = make_hf_folder(tmp_path / "hf", sharded=True)
    marker = tmp_path / "copying"
    process = subprocess.Popen(
        [sys.executable, "-c", IMPORTER, str(home), str(source), str(marker)],
        env={**os.environ, "MAAS_HOME": str(home)},
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert process.poll() is None, "importer exited before copying"
            assert time.monotonic() < deadline, "importer never started copying"
            time.sleep(0.05)
        staging = home / "artifacts" / ".staging"
        assert any(p.is_dir() for p in staging.iterdir())  # the half-built version is there
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)

    registry = open_registry(Settings(home=home))  # start-up sweeps what the crash left
    try:
        assert registry.list_models() == []
        assert files_under(registry.store.root) == {".staging"}
        assert registry.import_model(source, "victim").version == 1
    finally:
        registry.close()
