"""Open the key and tenant stores, and make the first admin key on a fresh install."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from sqlalchemy import Engine

from maas.auth.keys import load_server_secret
from maas.auth.principal import PLATFORM_TENANT, Role
from maas.auth.store import KeySpec, KeyStore, TenantStore
from maas.config import Settings

ADMIN_KEY_FILE = "admin.key"


def server_secret(settings: Settings) -> bytes:
    from_env = settings.secret_key.get_secret_value() if settings.secret_key else None
    return load_server_secret(settings.home / "secret.key", from_env)


def open_stores(settings: Settings, engine: Engine) -> tuple[KeyStore, TenantStore]:
    tenants = TenantStore(engine)
    tenants.ensure_platform()
    return KeyStore(engine, server_secret(settings)), tenants


def ensure_admin_key(settings: Settings, keys: KeyStore) -> str | None:
    """With no key in the database, create an admin key, write it to ``admin.key`` under
    MAAS_HOME (mode 0600) and return it; otherwise return None."""
    if keys.count() > 0:
        return None
    spec = KeySpec(name="first admin key", role=Role.admin, tenant=PLATFORM_TENANT)
    created = keys.create(spec, None, only_if_none=True)
    if created is None:  # another process made the first key meanwhile
        return None
    plaintext = created[1]
    write_secret_file(admin_key_path(settings), plaintext + "\n")
    return plaintext


def admin_key_path(settings: Settings) -> Path:
    return settings.home / ADMIN_KEY_FILE


def write_secret_file(path: Path, text: str) -> None:
    """Write a file only its owner can read, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
