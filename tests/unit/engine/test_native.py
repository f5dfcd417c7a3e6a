"""C kernels built at first use (maas/runtime/llm/native.py): each built once into its
cache, atomically, and loaded; none without a compiler."""

from __future__ import annotations

import pytest

from maas.runtime.llm import int8_matmul, native, paged_attention, torch_ops

KERNELS = {"paged_attention": paged_attention.NATIVE, "int8_matmul": int8_matmul.NATIVE}
LIBRARIES = {**KERNELS, "torch_ops": torch_ops.OPS}
"""The C kernels, and the C++ operators built with them (built and loaded once a process:
loading a second copy would register its kernels again)."""


def unbuilt(library, monkeypatch, tmp_path) -> native.NativeLibrary:
    """``library`` not yet built or loaded, with a fresh cache."""
    monkeypatch.setattr(library, "_library", None)
    monkeypatch.setattr(library, "_failed", False)
    monkeypatch.setenv("MAAS_CACHE_DIR", str(tmp_path))
    return library


@pytest.fixture(params=sorted(KERNELS))
def kernel(request, monkeypatch, tmp_path) -> native.NativeLibrary:
    return unbuilt(KERNELS[request.param], monkeypatch, tmp_path)


@pytest.fixture(params=sorted(LIBRARIES))
def library(request, monkeypatch, tmp_path) -> native.NativeLibrary:
    return unbuilt(LIBRARIES[request.param], monkeypatch, tmp_path)


def test_each_kernel_is_built_once_into_its_cache(kernel, tmp_path):
    if native.shutil.which("cc") is None and native.shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    built = kernel.build()
    assert built.parent == tmp_path / "kernels"
    assert built.name.startswith(f"{kernel.source.stem}-")
    stamp = built.stat().st_mtime_ns
    assert kernel.build() == built and built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # nothing half-written
    assert kernel.load() is not None and kernel.built_name() == built.name


def test_without_a_compiler_a_library_is_none_and_nothing_is_written(
    library, monkeypatch, tmp_path
):
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    assert library.load() is None and library.built_name() == ""
    assert library.load() is None  # tried once
    assert not (tmp_path / "kernels").exists()
