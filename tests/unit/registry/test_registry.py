"""Registry behaviour: resolution, aliases, immutability, integrity, atomic imports."""

from __future__ import annotations

import json
import os
import stat

import pytest

from maas.errors import (
    AliasNotFound,
    ArtifactCorrupted,
    Conflict,
    InvalidName,
    InvalidRequest,
    ModelNotFound,
    RefusedArtifact,
    UnsafeArchive,
    VersionNotFound,
)
from maas.registry.policy import check_file_names
from tests.fixtures import (
    disk_use,
    files_under,
    make_gguf,
    make_hf_folder,
    make_onnx,
    make_zip_bomb,
    tar_folder,
)


@pytest.fixture
def gguf(tmp_path):
    return make_gguf(tmp_path / "src" / "tiny.gguf")


def test_import_gguf_records_manifest(registry, gguf):
    record = registry.import_model(gguf, "tiny", description="a tiny llama")
    assert (record.name, record.version, record.task, record.format, record.runtime) == (
        "tiny",
        1,
        "chat",
        "gguf",
        "llm",
    )
    manifest = registry.read_manifest(record)
    assert manifest.architecture == "llama"
    assert manifest.context_length == 128
    assert manifest.chat_template and "messages" in manifest.chat_template
    assert manifest.tokenizer["model"] == "gpt2" and manifest.tokenizer["vocab_size"] == 4
    assert manifest.description == "a tiny llama"
    [entry] = manifest.files
    assert entry.path == "tiny.gguf" and entry.size == gguf.stat().st_size
    assert len(entry.sha256) == 64


def test_ft_names_belong_to_fine_tuning_jobs(registry, gguf):
    with pytest.raises(InvalidName, match="fine-tuning jobs"):
        registry.import_model(gguf, "ft:tiny:x:job1")
    with pytest.raises(InvalidName, match="not an ft: name"):
        registry.import_model(gguf, "tiny", fine_tuned=True)
    record = registry.import_model(gguf, "ft:tiny:x:job1", fine_tuned=True)
    assert registry.resolve("ft:tiny:x:job1:1") == record
    assert registry.resolve("ft:tiny:x:job1@latest") == record


def test_versions_count_up_and_references_resolve(registry, gguf):
    for _ in range(3):
        registry.import_model(gguf, "tiny")
    assert registry.resolve("tiny").version == 3  # no production alias: the latest
    assert registry.resolve("tiny:2").version == 2
    assert registry.resolve("tiny@latest").version == 3
    registry.set_alias("tiny", "production", 1)
    registry.set_alias("tiny", "staging", 2)
    assert registry.resolve("tiny").version == 1  # production wins over latest
    assert registry.resolve("tiny@staging").version == 2
    assert registry.resolve("tiny@production").version == 1


def test_unknown_references_are_not_found(registry, gguf):
    registry.import_model(gguf, "tiny")
    with pytest.raises(ModelNotFound):
        registry.resolve("nope")
    with pytest.raises(VersionNotFound):
        registry.resolve("tiny:9")
    with pytest.raises(AliasNotFound):
        registry.resolve("tiny@staging")


def test_alias_moves_and_is_removed(registry, gguf):
    registry.import_model(gguf, "tiny", alias="production")
    registry.import_model(gguf, "tiny")
    assert registry.resolve("tiny@production").version == 1
    moved = registry.set_alias("tiny", "production", 2)
    assert moved.version == 2 and moved.aliases == ("production",)
    assert registry.get_model("tiny").aliases == {"production": 2}
    assert registry.resolve("tiny:1").aliases == ()
    registry.delete_alias("tiny", "production")
    assert registry.resolve("tiny").version == 2
    with pytest.raises(AliasNotFound):
        registry.delete_alias("tiny", "production")


def test_alias_to_missing_version_or_bad_name_is_refused(registry, gguf):
    registry.import_model(gguf, "tiny")
    with pytest.raises(VersionNotFound):
        registry.set_alias("tiny", "production", 5)
    with pytest.raises(InvalidName):
        registry.set_alias("tiny", "latest", 1)
    with pytest.raises(InvalidName):
        registry.set_alias("tiny", "7", 1)


def test_versions_are_immutable(registry, gguf, tmp_path):
    first = registry.import_model(gguf, "tiny")
    before = registry.read_manifest(first)
    folder = registry.folder(first)
    # The files are read-only on disk ...
    for path in folder.rglob("*"):
        if path.is_file():
            assert not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    # ... a re-import makes a new version and leaves the old one byte for byte ...
    gguf.write_bytes(gguf.read_bytes() + b"\0" * 32)
    second = registry.import_model(gguf, "tiny")
    assert second.version == 2
    assert registry.read_manifest(registry.resolve("tiny:1")) == before
    assert registry.read_manifest(second).files[0].sha256 != before.files[0].sha256
    # ... and a removed version's number is never given out again.
    registry.delete_version("tiny", 2)
    assert registry.import_model(gguf, "tiny").version == 3


def test_model_task_is_fixed_by_its_first_version(registry, tmp_path, gguf):
    registry.import_model(gguf, "tiny")
    with pytest.raises(Conflict, match="serves task 'chat'"):
        registry.import_model(gguf, "tiny", task="text-generation")
    with pytest.raises(InvalidRequest, match="unknown task"):
        registry.import_model(gguf, "other", task="dance")
    with pytest.raises(InvalidRequest, match="cannot serve task 'embeddings'"):
        registry.import_model(gguf, "other", task="embeddings")


def test_chat_needs_a_chat_template(registry, tmp_path):
    plain = make_gguf(tmp_path / "plain.gguf", chat_template=None)
    assert registry.import_model(plain, "plain").task == "text-generation"
    with pytest.raises(InvalidRequest, match="no chat template"):
        registry.import_model(plain, "plain2", task="chat")


def test_open_version_verifies_hashes(registry, gguf):
    record = registry.import_model(gguf, "tiny")
    opened = registry.open_version("tiny")
    assert opened.folder == registry.folder(record)
    target = registry.folder(record) / "tiny.gguf"
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactCorrupted, match="does not match its sha256"):
        registry.open_version("tiny:1")


def test_changed_manifest_is_refused(registry, gguf):
    record = registry.import_model(gguf, "tiny")
    path = registry.folder(record) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    os.chmod(path, 0o644)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactCorrupted, match="manifest.json does not match"):
        registry.open_version("tiny")


def test_added_or_missing_files_are_refused(registry, tmp_path):
    record = registry.import_model(make_hf_folder(tmp_path / "hf"), "hf")
    folder = registry.folder(record)
    (folder / "extra.py").write_text("import os")
    with pytest.raises(ArtifactCorrupted, match="not in the manifest: extra.py"):
        registry.open_version("hf")
    (folder / "extra.py").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ArtifactCorrupted, match="tokenizer.json is missing"):
        registry.open_version("hf")


def test_failure_mid_copy_leaves_nothing(registry, tmp_path, monkeypatch):
    import maas.registry.importer as importer

    source = make_hf_folder(tmp_path / "hf", sharded=True)
    calls = 0
    real_copy = importer.copy_and_hash

    def copy_then_fail(src, dst, on_progress=None):
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk on fire")
        return real_copy(src, dst, on_progress)

    monkeypatch.setattr(importer, "copy_and_hash", copy_then_fail)
    with pytest.raises(OSError, match="disk on fire"):
        registry.import_model(source, "hf")
    assert calls == 2
    assert registry.list_models() == []
    assert files_under(registry.store.root) == {".staging"}


def test_failure_after_rename_leaves_nothing(registry, gguf, monkeypatch):
    import maas.registry.rows as rows

    def broken_alias(*args, **kwargs):
        raise RuntimeError("database went away")

    monkeypatch.setattr(rows, "point_alias", broken_alias)
    with pytest.raises(RuntimeError):
        registry.import_model(gguf, "tiny", alias="production")
    assert registry.list_models() == []
    assert files_under(registry.store.root) <= {".staging", "tiny"}
    assert not any((registry.store.root / "tiny").iterdir())


def test_an_archive_bomb_never_fills_the_staging_folder(registry, tmp_path, monkeypatch):
    from maas.artifacts import archive

    written = []
    empty = archive._empty

    def measure_then_empty(target):
        written.append(disk_use(target))
        empty(target)

    monkeypatch.setattr(archive, "_empty", measure_then_empty)
    bomb = make_zip_bomb(tmp_path / "model.zip", 1024**3)  # 1 MB that unpacks to 1 GiB
    with pytest.raises(UnsafeArchive, match="MAAS_MAX_ARCHIVE_RATIO"):
        registry.import_model(bomb, "bomb")
    assert written == [0]
    assert registry.list_models() == []
    assert files_under(registry.store.root) == {".staging"}


def test_a_pickle_in_an_archive_is_refused_before_it_is_unpacked(registry, tmp_path, monkeypatch):
    import maas.registry.importer as importer

    folder = make_hf_folder(tmp_path / "hf")
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    archive = tar_folder(tmp_path / "hf.tar.gz", folder, "my-model")
    staged_bytes = []

    def policy(relpaths):
        staged_bytes.append(disk_use(registry.store.staging_root))
        check_file_names(relpaths)

    monkeypatch.setattr(importer, "check_file_names", policy)
    with pytest.raises(RefusedArtifact, match="pickle"):
        registry.import_model(archive, "pickled")
    assert staged_bytes and set(staged_bytes) == {0}
    assert registry.list_models() == []
    assert files_under(registry.store.root) == {".staging"}


def test_sweep_removes_leftovers_of_a_crash(registry, gguf):
    registry.import_model(gguf, "tiny")
    # What a crash leaves: a staging folder nobody holds, and a version folder with no row.
    leftover = registry.store.staging_root / "deadbeef"
    (leftover / "version").mkdir(parents=True)
    (leftover / "version" / "half.safetensors").write_bytes(b"\0" * 100)
    (registry.store.staging_root / "deadbeef.lock").write_text("")
    orphan = registry.store.root / "tiny" / "2"
    orphan.mkdir()
    (orphan / "tiny.gguf").write_bytes(b"partial")
    live = registry.store.stage()  # an import in progress is left alone
    try:
        assert registry.sweep() == 2
        assert not leftover.exists() and not orphan.exists()
        [kept] = (registry.store.root / ".orphans").iterdir()  # set aside, not deleted
        assert (kept / "tiny.gguf").read_bytes() == b"partial"
        assert live.path.exists()
        assert registry.open_version("tiny:1").record.version == 1
    finally:
        live.close()
    assert files_under(registry.store.staging_root) == set()


def test_delete_version_refuses_while_aliased(registry, gguf):
    registry.import_model(gguf, "tiny", alias="production")
    with pytest.raises(Conflict, match="alias production"):
        registry.delete_version("tiny", 1)
    registry.delete_version("tiny", 1, force=True)
    assert registry.get_model("tiny").versions == ()
    assert registry.get_model("tiny").aliases == {}
    assert not (registry.store.root / "tiny" / "1").exists()
    with pytest.raises(VersionNotFound):
        registry.resolve("tiny")


def test_delete_model_removes_everything_and_name_can_be_reused(registry, gguf):
    registry.import_model(gguf, "tiny", alias="production")
    registry.import_model(gguf, "tiny")
    registry.delete_model("tiny")
    with pytest.raises(ModelNotFound):
        registry.get_model("tiny")
    assert not (registry.store.root / "tiny").exists()
    again = registry.import_model(gguf, "tiny")
    assert again.version == 1
    assert registry.open_version("tiny").record == again


def test_hugging_face_folder_is_inspected(registry, tmp_path):
    source = make_hf_folder(tmp_path / "hf", sharded=True)
    (source / "generation_config.json").write_text('{"max_new_tokens": 7}')
    (source / ".git").mkdir()
    (source / ".git" / "HEAD").write_text("ref")
    record = registry.import_model(source, "hf")
    manifest = registry.read_manifest(record)
    assert record.runtime == "llm" and record.task == "chat"
    assert manifest.architecture == "LlamaForCausalLM"
    assert manifest.context_length == 64
    assert manifest.generation_config == {"max_new_tokens": 7}
    assert "tokenizer.json" in manifest.tokenizer["files"]
    assert {f.path for f in manifest.files} == {
        "config.json",
        "tokenizer_config.json",
        "tokenizer.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    }


def test_classifier_and_embedding_folders_get_their_task(registry, tmp_path):
    classifier = make_hf_folder(
        tmp_path / "cls",
        architecture="BertForSequenceClassification",
        model_type="bert",
        chat_template=None,
        config_extra={"id2label": {"1": "positive", "0": "negative"}},
    )
    record = registry.import_model(classifier, "sentiment")
    assert (record.task, record.runtime) == ("text-classification", "transformers")
    assert registry.read_manifest(record).labels == ["negative", "positive"]

    encoder = make_hf_folder(
        tmp_path / "emb", architecture="BertModel", model_type="bert", chat_template=None
    )
    (encoder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ]
        )
    )
    (encoder / "1_Pooling").mkdir()
    (encoder / "1_Pooling" / "config.json").write_text(
        '{"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}'
    )
    record = registry.import_model(encoder, "embedder")
    assert record.task == "embeddings"
    assert registry.read_manifest(record).task_options == {"pooling": "mean", "normalize": True}


def test_onnx_with_external_data(registry, tmp_path):
    model = make_onnx(tmp_path / "onnx" / "model.onnx", external_location="weights.data")
    (tmp_path / "onnx" / "weights.data").write_bytes(bytes(64))
    record = registry.import_model(model, "linear")
    manifest = registry.read_manifest(record)
    assert (record.task, record.runtime) == ("tensor", "onnx")
    assert [f.path for f in manifest.files] == ["model.onnx", "weights.data"]
    assert [(t.name, t.datatype, t.shape) for t in manifest.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, t.shape) for t in manifest.outputs] == [("y", "FP32", [-1, 4])]


def test_missing_and_unrecognised_sources(registry, tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        registry.import_model(tmp_path / "nothing-here", "x")
    with pytest.raises(InvalidRequest, match="cannot read"):  # the OS cannot even look
        registry.import_model(tmp_path / ("a" * 5000), "x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hi")
    with pytest.raises(InvalidRequest, match="no model found"):
        registry.import_model(tmp_path / "notes", "x")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(InvalidRequest, match="not a valid GGUF"):
        registry.import_model(bad, "x")
    assert registry.list_models() == []


def test_concurrent_imports_get_distinct_versions(registry, gguf):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        records = list(pool.map(lambda _: registry.import_model(gguf, "tiny"), range(8)))
    assert sorted(r.version for r in records) == list(range(1, 9))
    assert [v.version for v in registry.get_model("tiny").versions] == list(range(1, 9))
    for record in records:
        registry.open_version(record.reference)


def test_a_read_overtaken_by_a_write_is_not_cached(registry, gguf, monkeypatch):
    import threading

    import maas.registry.rows as rows

    registry.import_model(gguf, "tiny")
    registry._models.clear()
    read_done, write_done = threading.Event(), threading.Event()
    load_model = rows.load_model

    def slow_for_the_reader(session, name):
        model = load_model(session, name)
        if threading.current_thread().name == "reader":
            read_done.set()  # read before the write commits ...
            assert write_done.wait(10)  # ... stored in the cache after it
        return model

    monkeypatch.setattr(rows, "load_model", slow_for_the_reader)
    reader = threading.Thread(target=registry.get_model, args=("tiny",), name="reader")
    reader.start()
    assert read_done.wait(10)
    registry.import_model(gguf, "tiny")
    write_done.set()
    reader.join(10)
    assert [v.version for v in registry.get_model("tiny").versions] == [1, 2]


def test_sweep_leaves_everything_when_the_database_looks_wrong(registry, gguf, settings):
    registry.import_model(gguf, "tiny")
    from maas.config import Settings
    from maas.registry import open_registry

    other = Settings(home=settings.home, database_url=f"sqlite:///{settings.home / 'other.db'}")
    stranger = open_registry(other)  # an empty database pointed at a full artifact root
    try:
        assert (registry.store.root / "tiny" / "1" / "tiny.gguf").exists()
        assert not (registry.store.root / ".orphans").exists()
    finally:
        stranger.close()
    assert registry.open_version("tiny:1")


def test_a_failed_delete_puts_the_folder_back(registry, gguf, monkeypatch):
    registry.import_model(gguf, "tiny")
    import maas.registry.service as service

    real = service.write_transaction

    class Boom(Exception):
        pass

    from contextlib import contextmanager

    @contextmanager
    def failing_commit(factory):
        with real(factory) as session:
            yield session
            raise Boom  # the commit fails after the rows were deleted and the folder moved

    monkeypatch.setattr(service, "write_transaction", failing_commit)
    with pytest.raises(Boom):
        registry.delete_version("tiny", 1)
    monkeypatch.undo()
    assert registry.open_version("tiny:1").record.version == 1


def test_writes_check_the_owner_they_were_authorised_for(registry, gguf):
    from maas.auth.store import TenantStore

    tenants = TenantStore(registry.engine)
    tenants.create("seven", "retail")
    tenants.create("eight", "energy")
    seven, eight = tenants.get_id("seven"), tenants.get_id("eight")
    registry.import_model(gguf, "tiny", owner=seven)
    with pytest.raises(ModelNotFound):
        registry.set_alias("tiny", "production", 1, owner=eight)
    with pytest.raises(ModelNotFound):
        registry.delete_model("tiny", owner=None)
    registry.set_alias("tiny", "production", 1, owner=seven)
    with pytest.raises(Conflict, match="not available") as caught:
        registry.import_model(gguf, "tiny", owner=eight, task="text-generation")
    assert "task" not in str(caught.value)  # nothing about someone else's model leaks
    assert registry.import_model(gguf, "tiny").version == 2  # ANY_OWNER keeps the owner
    assert registry.get_model("tiny").tenant_id == seven
