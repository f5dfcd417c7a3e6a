"""``maas optimize`` queues a checked job and follows it; ``maas models compare`` shows the
parent's and the child's figures from the child's report."""

from __future__ import annotations

import json

from maas.jobs.worker import Worker
from tests.fixtures import make_cnn_folder


def test_optimize_then_compare(cli, settings, tmp_path):
    assert cli("models", "import", str(make_cnn_folder(tmp_path / "cnn")), "-n", "cnn")[0] == 0
    code, _, err = cli("optimize", "cnn", "--recipe", "prune 0.5")
    assert code == 1 and "shared by every tenant" in err  # imported by the operator: shared
    code, _, err = cli("optimize", "cnn", "--recipe", "quantize int8-dynamic -> prune 0.5")
    assert code == 1 and "comes after quantize" in err
    code, out, err = cli(
        "optimize", "cnn", "--recipe", "prune 0.5 -> quantize int8-dynamic", "--name", "small",
        "--no-wait",
    )  # fmt: skip
    assert code == 0 and "queued job-" in out, err
    job_id = out.split("queued ")[1].split(":")[0]
    worker = Worker(settings)
    try:
        assert worker.run(max_jobs=1) == 1
    finally:
        worker.engine.dispose()
    code, out, err = cli("jobs", "wait", job_id)
    assert code == 0 and '"reference": "small:1"' in out, err
    code, out, err = cli("models", "compare", "cnn:1", "small:1")
    assert code == 0, err
    assert "sparsity" in out and "throughput_per_s" in out and "measured together" in out
    code, out, _ = cli("models", "compare", "cnn:1", "cnn:1")
    assert code == 0 and "from different runs" in out


def test_optimize_uploads_a_local_dataset_to_learn_from(cli, settings, tmp_path, few_digits):
    from maas.files import FileStore
    from maas.registry import open_registry

    assert cli("models", "import", str(make_cnn_folder(tmp_path / "cnn")), "-n", "cnn")[0] == 0
    code, _, err = cli(
        "optimize", "cnn", "--recipe", "distil steps=5", "--name", "student",
        "--training-file", str(few_digits), "--no-wait",
    )  # fmt: skip
    assert code == 1 and "classes the model does not know: 0, 1, 2" in err  # cat, dog, bird
    code, _, err = cli("optimize", "cnn", "--recipe", "distil", "--name", "student")
    assert code == 1 and "give a training_file" in err
    registry = open_registry(settings)
    try:
        uploaded = FileStore.of_registry(registry, settings).list(None)
    finally:
        registry.close()
    assert [f.filename for f in uploaded] == ["few.zip"]  # kept, as /v1/files keeps uploads
    folder = make_cnn_folder(tmp_path / "digits")
    description = json.loads((folder / "maas-architecture.json").read_text())
    (folder / "maas-architecture.json").write_text(
        json.dumps({**description, "labels": ["0", "1", "2"]})
    )
    assert cli("models", "import", str(folder), "-n", "digits")[0] == 0
    code, out, err = cli(
        "optimize", "digits", "--recipe", "distil steps=5", "--name", "student",
        "--training-file", str(few_digits), "--evaluation-file", str(few_digits), "--no-wait",
    )  # fmt: skip
    assert code == 0 and out.count("uploaded") == 2, err
    worker = Worker(settings)
    try:
        assert worker.run(max_jobs=1) == 1
    finally:
        worker.engine.dispose()
    code, out, err = cli("jobs", "wait", out.split("queued ")[1].split(":")[0])
    assert code == 0 and '"evaluation_examples": 120' in out, err
