"""What compiling the decode step costs in memory: the demo LLM loaded in int8, each way in a
fresh process, and its resident memory (VmRSS) once loaded.

- eager: ``compile=False``;
- compiled, warm: compiled with inductor's cache already holding the steps (a restart);
- compiled, cold: compiled with an empty inductor cache (a machine's first load).

Also the memory of importing torch, and then Dynamo and inductor, in a process of their own.

    .venv/bin/python bench/compile_memory.py

Takes about 3 minutes (the cold compile); run it with nothing else busy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "compile_memory.json"

LOAD = """
import os, tempfile
from pathlib import Path
from maas.config import Settings
from maas.registry import demo, open_registry
from maas.runtime.llm.options import RunnerOptions
from maas.runtime.llm.runner import ModelRunner

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

registry = open_registry(Settings(home=Path(tempfile.mkdtemp()) / "home"))
registry.import_model(demo.locate(demo.DEMO_MODELS[0]), "demo", task="chat")
opened = registry.open_version("demo:1")
before = rss_mib()
runner = ModelRunner(opened, RunnerOptions(dtype="int8", compile={compile}))
print(before, rss_mib(), runner.compiled is not None)
"""

IMPORTS = """
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024

import torch
after_torch = rss_mib()
import torch._dynamo, torch._inductor.compile_fx
print(after_torch, rss_mib())
"""


def run(code: str, env: dict[str, str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return done.stdout.split()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="compile-memory-"))
    cache = root / "maas-cache"  # kernels built by the first load, reused by the others
    inductor = root / "inductor"
    env = {**os.environ, "MAAS_CACHE_DIR": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
    rows = {}
    run(LOAD.format(compile=False), env)  # builds maas's kernels and keeps the dtype's timing
    for name, compile in (("eager", False), ("compiled, cold", True), ("compiled, warm", True)):
        before, after, compiled = run(LOAD.format(compile=compile), env)
        rows[name] = {"before_load_mib": int(before), "loaded_mib": int(after)}
        assert (compiled == "True") is compile, f"{name}: compiled is {compiled}"
        print(f"{name:<16} {before:>5} MiB before the load, {after:>5} MiB loaded", flush=True)
    torch_mib, compiler_mib = run(IMPORTS, env)
    rows["imports"] = {"torch_mib": int(torch_mib), "dynamo_and_inductor_mib": int(compiler_mib)}
    print(f"import torch {torch_mib} MiB; with Dynamo and inductor {compiler_mib} MiB")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"benchmark": "compile_memory", "results": rows}, indent=2))


if __name__ == "__main__":
    main()
