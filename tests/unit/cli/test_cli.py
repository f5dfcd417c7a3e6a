"""The CLI: exit codes and one-line messages for bad input; the happy path end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures import make_gguf, make_hf_folder


def test_import_list_show_alias_rm(cli, tmp_path):
    gguf = make_gguf(tmp_path / "tiny.gguf")
    code, out, err = cli("models", "import", str(gguf), "--name", "tiny", "--alias", "production")
    assert code == 0, err
    assert "imported tiny:1 (chat, gguf" in out and "@production" in out
    assert cli("models", "import", str(gguf), "-n", "tiny")[0] == 0

    code, out, _ = cli("models", "list")
    assert code == 0 and "tiny" in out and "production->1" in out

    code, out, _ = cli("models", "show", "tiny")
    assert code == 0 and "gguf" in out and "production" in out

    code, out, _ = cli("models", "show", "tiny:2", "--json")
    assert code == 0 and json.loads(out)["version"] == 2

    code, out, _ = cli("models", "alias", "tiny", "2", "production")
    assert code == 0 and "tiny@production -> tiny:2" in out

    code, out, _ = cli("models", "verify", "tiny")
    assert code == 0 and "tiny:2: 1 files match" in out

    assert cli("models", "rm", "tiny:1")[0] == 0
    code, out, _ = cli("models", "rm", "tiny")
    assert code == 0 and "removed tiny" in out
    assert "no models yet" in cli("models", "list")[1]


BAD_INPUT = [
    (("models", "import", "{gguf}", "--name", "Bad/Name"), "invalid model name 'Bad/Name'"),
    (("models", "import", "{missing}", "--name", "m"), "does not exist"),
    (("models", "import", "{gguf}", "--name", "m", "--task", "dance"), "unknown task 'dance'"),
    (("models", "import", "{gguf}", "--name", "m", "--alias", "7"), "invalid alias '7'"),
    (("models", "import", "{pickle}", "--name", "m"), "pickle-based weights can run code"),
    (("models", "show", "m:0"), "the version must be a number from 1 up"),
    (("models", "show", "nope"), "model 'nope' not found"),
    (("models", "show", "m@staging"), "model 'm' not found"),
    (("models", "rm", "nope:3"), "model 'nope' not found"),
    (("models", "rm", "m@production"), "rm takes NAME or NAME:VERSION"),
    (("models", "alias", "nope", "1", "production"), "model 'nope' not found"),
    (("models", "unalias", "nope", "production"), "model 'nope' not found"),
    (("models", "verify", "nope"), "model 'nope' not found"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_exit_1(cli, tmp_path, args, message):
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"\x80\x04K\x01.")
    paths = {
        "gguf": make_gguf(tmp_path / "tiny.gguf"),
        "missing": tmp_path / "nope",
        "pickle": pickle,
    }
    code, out, err = cli(*[a.format(**paths) for a in args])
    assert code == 1
    assert err.startswith("error: ")
    assert message in " ".join(err.split())
    assert "Traceback" not in err + out


def test_usage_errors_exit_2(cli):
    code, _, err = cli("models", "import")
    assert code == 2 and "Missing argument" in err
    code, _, err = cli("models", "alias", "m", "zero", "production")
    assert code == 2 and "Invalid value for 'version'" in err


def test_bad_setting_is_one_line(cli, monkeypatch):
    monkeypatch.setenv("MAAS_PORT", "not-a-port")
    code, _, err = cli("serve")
    assert code == 1 and "invalid setting MAAS_PORT" in err


def test_help_everywhere(cli):
    for args in [
        (),
        ("models",),
        ("models", "import"),
        ("models", "rm"),
        ("serve",),
        ("demo",),
        ("db",),
        ("generate",),
        ("chat",),
    ]:
        code, out, _ = cli(*args, "--help")
        assert code == 0 and "Usage" in out


def test_version_and_db_commands(cli):
    assert cli("version")[1].strip().startswith("maas ")
    from maas.db import make_engine
    from maas.db.migrate import head_revision

    head = head_revision(make_engine("sqlite://"))
    code, out, _ = cli("db", "upgrade")
    assert code == 0 and f"database at revision {head}" in out
    assert f"database {head}, newest {head}" in cli("db", "current")[1]


def test_progress_does_not_break_import_of_a_folder(cli, tmp_path):
    code, out, err = cli("models", "import", str(make_hf_folder(tmp_path / "hf")), "--name", "hf")
    assert code == 0, err
    assert "imported hf:1 (chat, huggingface" in out


def test_python_dash_m_runs_the_cli_and_fails_cleanly(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maas", "models", "show", "Not Valid"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"MAAS_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error: invalid model reference")
    assert "Traceback" not in result.stderr


def test_keys_and_tenants_locally(cli, tmp_path):
    code, out, err = cli("tenants", "create", "acme", "--industry", "retail")
    assert code == 0, err
    assert "created tenant acme (retail)" in out
    code, out, _ = cli("tenants", "list")
    assert "acme" in out and "platform" in out
    code, out, err = cli(
        "keys",
        "create",
        "--name",
        "ci",
        "--role",
        "maintainer",
        "--tenant",
        "acme",
        "--models",
        "a,b",
        "--rpm",
        "60",
        "--budget",
        "1000",
        "--expires-in-days",
        "30",
    )
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    assert key.startswith("maas-")
    key_id = key[5:17]
    code, out, _ = cli("keys", "list")
    assert key_id in out and "maintainer" in out and key not in out
    gguf = make_gguf(tmp_path / "tiny.gguf")
    assert cli("models", "import", str(gguf), "-n", "private", "--tenant", "acme")[0] == 0
    assert '"tenant": "acme"' in cli("models", "show", "private", "--json")[1]
    code, _, err = cli("models", "import", str(gguf), "-n", "x", "--tenant", "nope")
    assert code == 1 and "tenant 'nope' not found" in err
    code, out, _ = cli("keys", "revoke", key_id)
    assert code == 0 and f"revoked {key_id}" in out
    assert "revoked" in cli("keys", "list")[1]


ACCESS_BAD_INPUT = [
    (("tenants", "create", "acme", "--industry", "space"), "unknown industry 'space'"),
    (("tenants", "create", "Bad Name", "--industry", "retail"), "invalid tenant name"),
    (("keys", "create", "--name", "k", "--tenant", "nope"), "tenant 'nope' not found"),
    (("keys", "revoke", "nope"), "key 'nope' not found"),
    (("usage", "--by", "colour"), "cannot group usage by colour"),
    (("usage", "--since", "yesterday"), "--since must be a date"),
    (("artifacts", "rotate-master-key"), "no master key is configured"),
]


@pytest.mark.parametrize(("args", "message"), ACCESS_BAD_INPUT)
def test_access_commands_bad_input(cli, args, message):
    code, out, err = cli(*args)
    assert code == 1
    assert err.startswith("error: ") and message in " ".join(err.split())


def test_keys_create_rejects_a_bad_role(cli):
    code, _, err = cli("keys", "create", "--name", "k", "--role", "root")
    assert code == 2 and "root" in err
