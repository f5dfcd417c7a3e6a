"""The archive corpus: every trick is refused, and nothing is written outside the target."""

from __future__ import annotations

import tarfile

import pytest

from maas.artifacts.archive import ArchiveLimits, extract_archive
from maas.errors import UnsafeArchive
from tests.fixtures import (
    files_under,
    make_gguf,
    make_hf_folder,
    make_tar,
    make_zip,
    tar_file,
    tar_folder,
    tar_link,
)

LIMITS = ArchiveLimits(max_bytes=10_000, max_members=20)


def _device(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


TAR_CORPUS = {
    "absolute path": ([tar_file("/tmp/maas-evil.txt")], "absolute path"),
    "dot-dot": ([tar_file("model/../../evil.txt")], "'..'"),
    "dot-dot at start": ([tar_file("../evil.txt")], "'..'"),
    "symlink to an absolute path": ([tar_link("config.json", "/etc/passwd")], "points outside"),
    "symlink escaping with dot-dot": ([tar_link("model/link", "../../evil")], "points outside"),
    "symlink then write through it": (
        [tar_link("escape", "/tmp"), tar_file("escape/evil.txt")],
        "points outside",
    ),
    "hard link outside": ([tar_link("hard", "../evil", hard=True)], "points outside"),
    "device file": ([_device("dev")], "device"),
    "oversize": ([tar_file("big.bin", b"\0" * 10_001)], "MAAS_MAX_ARCHIVE_BYTES"),
    "oversize in sum": (
        [tar_file(f"f{i}", b"\0" * 4000) for i in range(3)],
        "MAAS_MAX_ARCHIVE_BYTES",
    ),
    "too many entries": ([tar_file(f"f{i}") for i in range(21)], "MAAS_MAX_ARCHIVE_MEMBERS"),
    "backslash": ([tar_file("..\\evil.txt")], "backslash"),
}


@pytest.mark.parametrize("case", sorted(TAR_CORPUS))
def test_tar_corpus_is_refused_and_writes_nothing(tmp_path, case):
    members, message = TAR_CORPUS[case]
    archive = make_tar(tmp_path / "archive.tar.gz", members)
    sandbox = tmp_path / "sandbox"
    target = sandbox / "target"
    target.mkdir(parents=True)
    before = files_under(tmp_path)
    with pytest.raises(UnsafeArchive, match=message):
        extract_archive(archive, target, LIMITS)
    assert files_under(tmp_path) == before
    assert not list(target.iterdir())


ZIP_CORPUS = {
    "absolute path": ({"/tmp/maas-evil.txt": b"x"}, {}, "absolute path"),
    "dot-dot": ({"../evil.txt": b"x"}, {}, "'..'"),
    "drive letter": ({"C:/evil.txt": b"x"}, {}, "absolute path"),
    "symlink": ({}, {"link": "/etc/passwd"}, "symbolic link"),
    "oversize": ({"big.bin": b"\0" * 10_001}, {}, "MAAS_MAX_ARCHIVE_BYTES"),
    "too many entries": ({f"f{i}": b"x" for i in range(21)}, {}, "MAAS_MAX_ARCHIVE_MEMBERS"),
}


@pytest.mark.parametrize("case", sorted(ZIP_CORPUS))
def test_zip_corpus_is_refused_and_writes_nothing(tmp_path, case):
    members, links, message = ZIP_CORPUS[case]
    archive = make_zip(tmp_path / "archive.zip", members, links)
    target = tmp_path / "target"
    target.mkdir()
    before = files_under(tmp_path)
    with pytest.raises(UnsafeArchive, match=message):
        extract_archive(archive, target, LIMITS)
    assert files_under(tmp_path) == before


def test_a_zip_bomb_is_refused_before_unpacking(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"zeros.bin": b"\0" * 5_000_000})
    assert archive.stat().st_size < 50_000
    with pytest.raises(UnsafeArchive, match="MAAS_MAX_ARCHIVE_BYTES"):
        extract_archive(archive, tmp_path / "target", LIMITS)
    assert not (tmp_path / "target" / "zeros.bin").exists()


def test_corrupt_archives_are_clear_errors(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08 not really gzip")
    with pytest.raises(UnsafeArchive, match="cannot read archive"):
        extract_archive(bad, tmp_path / "t1", LIMITS)
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UnsafeArchive, match="cannot read archive"):
        extract_archive(bad_zip, tmp_path / "t2", LIMITS)


def test_links_inside_the_archive_are_fine(tmp_path):
    archive = make_tar(
        tmp_path / "ok.tar.gz",
        [
            tar_file("model/a.txt", b"hello"),
            tar_link("model/b.txt", "a.txt"),
        ],
    )
    extract_archive(archive, tmp_path / "target", LIMITS)
    assert (tmp_path / "target" / "model" / "b.txt").read_bytes() == b"hello"


def test_archives_import_through_the_registry(registry, tmp_path):
    folder = make_hf_folder(tmp_path / "hf")
    record = registry.import_model(
        tar_folder(tmp_path / "hf.tar.gz", folder, "my-model"), "from-tar"
    )
    assert record.format == "huggingface"
    manifest = registry.read_manifest(record)
    assert "config.json" in {f.path for f in manifest.files}  # the wrapping folder is skipped

    gguf = make_gguf(tmp_path / "tiny.gguf")
    zipped = make_zip(tmp_path / "tiny.zip", {"tiny.gguf": gguf.read_bytes()})
    assert registry.import_model(zipped, "from-zip").format == "gguf"
    assert files_under(registry.store.staging_root) == set()


def test_unsafe_archive_through_the_registry_leaves_nothing(registry, tmp_path):
    archive = make_tar(tmp_path / "evil.tar.gz", [tar_file("ok.txt"), tar_file("../../evil.txt")])
    with pytest.raises(UnsafeArchive):
        registry.import_model(archive, "evil")
    assert not (tmp_path / "evil.txt").exists()
    assert files_under(registry.store.root) == {".staging"}
    assert registry.list_models() == []


def test_archive_limits_come_from_settings(tmp_path):
    from maas.config import Settings
    from maas.registry import open_registry

    settings = Settings(home=tmp_path / "home", max_archive_bytes=100)
    registry = open_registry(settings)
    try:
        archive = make_tar(tmp_path / "a.tar.gz", [tar_file("big", b"\0" * 101)])
        with pytest.raises(UnsafeArchive, match="more than 100 bytes"):
            registry.import_model(archive, "m")
    finally:
        registry.close()
