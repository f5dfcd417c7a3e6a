"""llama.cpp's ``llama-server`` and ``llama-quantize``, built once for the serving benchmark.

The sources are the llama.cpp that the ``llama-cpp-python`` sdist on PyPI vendors
(``vendor/llama.cpp``), so they come through the package index like everything else:
``pip download --no-binary :all: --no-deps llama-cpp-python==VERSION``. Sources, build and the
GGUF files made from the demo model live in a cache folder outside the repository,
``~/.cache/maas-bench/llama.cpp/<VERSION>/`` (``$XDG_CACHE_HOME`` if set), and are reused
when present; delete the folder to rebuild.

The build is Release, static, with only the two targets it needs, no libcurl or OpenSSL and no
web UI (its prebuilt assets would be downloaded from Hugging Face). ``GGML_NATIVE`` is off:
each x86 extension is turned on by its own ``GGML_*`` option when ``/proc/cpuinfo`` reports
it, but never the AMX ones. A native build crashed at start on a VM whose CPU reports AMX.

bench/llm_serving.py builds on first use; to build ahead, and see the options chosen:

    nice -n 10 .venv/bin/python bench/llama_cpp.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

VERSION = "0.3.36"
"""The llama-cpp-python sdist whose vendored llama.cpp is built (ggml-org/llama.cpp@0c1e57098,
by its changelog; the build itself reports version 0.5.0-dev, commit unknown)."""

CACHE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "maas-bench"
    / "llama.cpp"
    / VERSION
)

# Each ggml x86 option and the /proc/cpuinfo flags of the -m options it compiles with
# (ggml/src/ggml-cpu/CMakeLists.txt, the non-MSVC, non-native branch).
AVX512_BASE = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
GGML_X86_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx2",),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": AVX512_BASE,
    "GGML_AVX512_VBMI": (*AVX512_BASE, "avx512vbmi"),
    "GGML_AVX512_VNNI": (*AVX512_BASE, "avx512_vnni"),
    "GGML_AVX512_BF16": (*AVX512_BASE, "avx512_bf16"),
}
GGML_AMX_OPTIONS = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")

TARGETS = ("llama-server", "llama-quantize")


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_options(flags: set[str]) -> list[str]:
    """The configure options: fixed ones, then each x86 option on or off by ``flags``."""
    options = [
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_SHARED_LIBS=OFF",
        "-DLLAMA_CURL=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DGGML_CCACHE=OFF",
        "-DGGML_NATIVE=OFF",
    ]
    for option, needs in GGML_X86_OPTIONS.items():
        options.append(f"-D{option}={'ON' if flags.issuperset(needs) else 'OFF'}")
    options += [f"-D{option}=OFF" for option in GGML_AMX_OPTIONS]
    return options


def build(cache: Path = CACHE) -> Path:
    """The folder holding ``llama-server`` and ``llama-quantize``, built first if missing."""
    binaries = cache / "build" / "bin"
    if all((binaries / target).exists() for target in TARGETS):
        return binaries
    source = unpack(download(cache), cache / "src")
    options = cmake_options(cpu_flags())
    print(f"building llama.cpp {VERSION} in {cache / 'build'}: {' '.join(options)}", flush=True)
    started = time.monotonic()
    run(["cmake", "-S", source, "-B", cache / "build", *options], cache / "build.log")
    run(
        [
            "cmake",
            "--build",
            cache / "build",
            "--config",
            "Release",
            "--target",
            *TARGETS,
            "-j",
            str(os.cpu_count() or 2),
        ],
        cache / "build.log",
    )
    seconds = round(time.monotonic() - started)
    record = {"version": VERSION, "cmake_options": options, "build_seconds": seconds}
    (cache / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"built llama.cpp in {seconds} s", flush=True)
    return binaries


def build_info(cache: Path = CACHE) -> dict:
    """What :func:`build` recorded: version, cmake options and build time."""
    path = cache / "build.json"
    return json.loads(path.read_text()) if path.exists() else {"version": VERSION}


def download(cache: Path) -> Path:
    """The llama-cpp-python sdist, from the package index unless already in ``cache``."""
    sdist = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not sdist.exists():
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        run([*command, f"llama-cpp-python=={VERSION}", "-d", cache], cache / "download.log")
    if not sdist.exists():
        raise SystemExit(f"pip download left no {sdist.name} in {cache}")
    return sdist


def unpack(sdist: Path, into: Path) -> Path:
    """The sdist's ``vendor/llama.cpp`` folder, extracted into ``into``."""
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    source = into / prefix
    if not (source / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
            archive.extractall(into, members=members, filter="data")
    return source


def run(command: list, log: Path) -> None:
    with open(log, "a") as out:
        out.write(f"$ {' '.join(map(str, command))}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(
            f"{command[0]} failed ({result.returncode}); see {log}:\n" + "\n".join(tail)
        )


def quantize(binaries: Path, gguf: Path, kind: str, cache: Path = CACHE) -> Path:
    """``gguf`` re-quantised to ``kind`` (``Q8_0``, ``F16``, ...), cached beside the build."""
    target = cache / "gguf" / f"{gguf.stem}.{kind}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        command = [binaries / "llama-quantize", "--allow-requantize", gguf, partial, kind]
        run([*command, str(os.cpu_count() or 2)], cache / "quantize.log")
        partial.rename(target)
    return target


class LlamaServer:
    """A ``llama-server`` process on a loopback port; stopped by its PID."""

    def __init__(self, binaries: Path, model: Path, port: int, log: Path, *args: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in stop()
        command = [binaries / "llama-server", "-m", model, "--host", "127.0.0.1"]
        self.process = subprocess.Popen(
            [*command, "--port", str(port), *args],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until ``/health`` answers 200 (it answers 503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"llama-server exited early:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"llama-server not ready after {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


def main() -> None:
    """Build (or find) the binaries and print where they are and how they were built."""
    binaries = build()
    print(binaries)
    print(json.dumps(build_info(), indent=2))


if __name__ == "__main__":
    main()
