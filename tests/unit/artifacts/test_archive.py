"""The archive corpus: every trick is refused, and nothing is written outside the target."""

from __future__ import annotations

import copy
import json
import os
import tarfile
import zipfile

import pytest

from maas.artifacts import archive as archive_module
from maas.artifacts.archive import ArchiveLimits, extract_archive
from maas.config import Settings
from maas.errors import RefusedArtifact, UnsafeArchive
from maas.registry.policy import check_file_names
from tests.fixtures import (
    disk_use,
    files_under,
    make_gguf,
    make_hf_folder,
    make_tar,
    make_zip,
    make_zip_bomb,
    tar_file,
    tar_folder,
    tar_link,
)

MiB = 1024**2
GiB = 1024**3
LIMITS = ArchiveLimits(max_bytes=10_000, max_members=20, max_ratio=200)
ROOMY = ArchiveLimits(max_bytes=GiB, max_members=100, max_ratio=200)
"""Room for a bomb to pass every cap but the ratio."""


def default_limits() -> ArchiveLimits:
    fields = Settings.model_fields
    return ArchiveLimits(
        fields["max_archive_bytes"].default,
        fields["max_archive_members"].default,
        fields["max_archive_ratio"].default,
    )


@pytest.fixture
def written_at_failure(monkeypatch):
    """Bytes in the target when a failed extraction starts to empty it: the most it wrote."""
    seen = []
    empty = archive_module._empty

    def measure_then_empty(target):
        seen.append(disk_use(target))
        empty(target)

    monkeypatch.setattr(archive_module, "_empty", measure_then_empty)
    return seen


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
    "the same file twice": ([tar_file("a.txt"), tar_file("a.txt")], "twice"),
    "write through a link inside": (
        [tar_link("model/weights", "real"), tar_file("model/weights/x.txt")],
        "through the link",
    ),
    "hard link before its file": (
        [tar_link("b.txt", "a.txt", hard=True), tar_file("a.txt")],
        "must follow the file",
    ),
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


def test_the_reviewed_zip_bomb_is_refused_before_a_byte_is_written(tmp_path, written_at_failure):
    archive = make_zip_bomb(tmp_path / "bomb.zip", GiB)
    assert archive.stat().st_size < 1.1 * MiB
    with pytest.raises(UnsafeArchive, match="MAAS_MAX_ARCHIVE_RATIO"):
        extract_archive(archive, tmp_path / "target", default_limits())
    assert written_at_failure == [0]


def test_small_entries_are_held_to_the_ratio_of_the_whole_archive(tmp_path, written_at_failure):
    shards = {f"shard-{i}.safetensors": b"\0" * (MiB // 2) for i in range(40)}  # each under 1 MiB
    archive = make_zip(tmp_path / "shards.zip", shards)
    with pytest.raises(UnsafeArchive, match=r"the archive expands .* \(MAAS_MAX_ARCHIVE_RATIO"):
        extract_archive(archive, tmp_path / "target", ROOMY)
    assert written_at_failure == [0]


def test_a_zip_header_that_understates_a_size_stops_there(tmp_path, written_at_failure):
    archive = make_zip_bomb(tmp_path / "liar.zip", 64 * MiB, declared=1000)
    target = tmp_path / "target"
    with pytest.raises(UnsafeArchive, match="cannot read archive"):
        extract_archive(archive, target, default_limits())
    assert written_at_failure[0] <= 1000
    assert not list(target.iterdir())


def test_the_writer_counts_real_bytes_whatever_the_reader_does(
    tmp_path, monkeypatch, written_at_failure
):
    """A reader that yields more than the header declares is stopped by our own count."""
    archive = make_zip(tmp_path / "a.zip", {"weights.safetensors": os.urandom(3 * MiB)})
    infolist, open_entry = zipfile.ZipFile.infolist, zipfile.ZipFile.open

    def understated(zf):
        infos = [copy.copy(info) for info in infolist(zf)]
        for info in infos:
            info.file_size = 1000
        return infos

    monkeypatch.setattr(zipfile.ZipFile, "infolist", understated)
    monkeypatch.setattr(  # opened by name: the true size, so all 3 MiB come out
        zipfile.ZipFile, "open", lambda zf, info, *a, **k: open_entry(zf, info.filename, *a, **k)
    )
    with pytest.raises(UnsafeArchive, match="more than the 1000 bytes its header declares"):
        extract_archive(archive, tmp_path / "target", LIMITS)
    assert written_at_failure == [0]


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([tar_file("zeros.safetensors", b"\0" * 64 * MiB)], id="one big entry"),
        pytest.param(
            [tar_file(f"shard-{i}", b"\0" * (MiB // 2)) for i in range(40)], id="small entries"
        ),
    ],
)
def test_a_tar_gz_bomb_is_refused_while_it_streams(tmp_path, written_at_failure, members):
    archive = make_tar(tmp_path / "bomb.tar.gz", members)
    with pytest.raises(UnsafeArchive, match=r"the archive expands .* \(MAAS_MAX_ARCHIVE_RATIO"):
        extract_archive(archive, tmp_path / "target", ROOMY)
    assert written_at_failure == [0]


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_pickle_entry_is_refused_before_anything_is_written(tmp_path, kind):
    members = {"config.json": b"{}", "pytorch_model.bin": b"pickle"}
    if kind == "tar":
        archive = make_tar(tmp_path / "a.tar.gz", [tar_file(n, d) for n, d in members.items()])
    else:
        archive = make_zip(tmp_path / "a.zip", members)
    target = tmp_path / "target"
    written_when_checked = []

    def policy(names):
        written_when_checked.append(files_under(target))
        check_file_names(names)

    with pytest.raises(RefusedArtifact, match="pickle"):
        extract_archive(archive, target, LIMITS, check_names=policy)
    assert written_when_checked == [set(), set()]
    assert not list(target.iterdir())


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_a_normal_model_passes_the_ratio_cap(tmp_path, kind):
    folder = make_hf_folder(tmp_path / "hf")
    padding = {"added_tokens": [{"content": "<pad>", "special": True}] * 20_000}
    (folder / "tokenizer.json").write_text(json.dumps(padding))  # 0.8 MB, ratio over 300
    (folder / "more.safetensors").write_bytes(os.urandom(3 * MiB))
    make_gguf(folder / "tiny.gguf")
    if kind == "tar":
        archive = tar_folder(tmp_path / "hf.tar.gz", folder, "my-model")
    else:
        members = {p.name: p.read_bytes() for p in folder.iterdir()}
        archive = make_zip(tmp_path / "hf.zip", members)
    target = tmp_path / "target"
    extract_archive(archive, target, default_limits(), check_names=check_file_names)
    unpacked = target / "my-model" if kind == "tar" else target
    assert {p.name for p in unpacked.iterdir()} == {p.name for p in folder.iterdir()}
    assert (unpacked / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
