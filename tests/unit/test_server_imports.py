"""The server's own imports stay light: torch (a few hundred MB resident) comes in only with a
back-end that runs a model in the server process, or a tokenizer that needs it; onnx (7 MiB)
only where an ONNX model is read or run. The engine process imports torch, but neither onnx
nor transformers (it gets the tokenizer as an ``EngineTokenizer``)."""

from __future__ import annotations

import subprocess
import sys

SERVER = """
import sys
from maas.api.app import build_app
from maas.config import Settings
build_app(Settings(home=sys.argv[1]))
print(sorted(m for m in ("torch", "transformers", "onnx") if m in sys.modules))
"""

ENGINE = """
import sys
from maas.engine import process
from maas.engine.llm_engine import LLMEngine
from maas.runtime.llm.runner import ModelRunner
print(sorted(m for m in ("transformers", "onnx") if m in sys.modules))
"""


def imported(probe: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_building_the_server_imports_no_torch_nor_onnx(tmp_path):
    assert imported(SERVER, str(tmp_path / "home")) == "[]"


def test_the_engine_s_modules_import_neither_onnx_nor_transformers():
    assert imported(ENGINE) == "[]"
