"""The server's own imports stay light: torch (a few hundred MB resident) comes in only with a
back-end that runs a model in the server process, or a tokenizer that needs it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from maas.api.app import build_app
from maas.config import Settings
build_app(Settings(home=sys.argv[1]))
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_building_the_server_imports_no_torch(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
