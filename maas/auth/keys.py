"""API key format and hashing.

A key reads ``maas-<key_id>_<secret>``: ``key_id`` is 12 public characters used to find the
row, ``secret`` is 32 random bytes (256 bits) in URL-safe base64. The database keeps only
HMAC-SHA256(server secret, key), compared in constant time; a stolen database alone cannot
be used to call the API.
"""

from __future__ import annotations

import hmac
import os
import secrets
import string
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from maas.errors import InvalidRequest, Unauthenticated

PREFIX = "maas-"
KEY_ID_LENGTH = 12
KEY_ID_ALPHABET = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class NewKey:
    key_id: str
    plaintext: str = field(repr=False)
    """The whole key; shown once and never stored."""


def generate_key() -> NewKey:
    key_id = "".join(secrets.choice(KEY_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    return NewKey(key_id, f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}")


def key_id_of(token: str) -> str:
    """The public id inside a presented key, or Unauthenticated if it is not shaped like one."""
    body = token[len(PREFIX) :]
    if (
        not token.startswith(PREFIX)
        or len(body) < KEY_ID_LENGTH + 2
        or body[KEY_ID_LENGTH] != "_"
        or not set(body[:KEY_ID_LENGTH]) <= set(KEY_ID_ALPHABET)
    ):
        raise Unauthenticated("invalid API key")
    return body[:KEY_ID_LENGTH]


def hash_key(server_secret: bytes, token: str) -> str:
    return hmac.new(server_secret, token.encode(), sha256).hexdigest()


def matches(server_secret: bytes, token: str, stored_hash: str) -> bool:
    return hmac.compare_digest(hash_key(server_secret, token), stored_hash)


def load_server_secret(path: Path, from_env: str | None = None) -> bytes:
    """The HMAC secret: ``MAAS_SECRET_KEY`` if given, else a file created once (mode 0600)."""
    if from_env:
        if len(from_env) < 32:
            raise InvalidRequest("MAAS_SECRET_KEY must be at least 32 characters of randomness")
        return from_env.encode()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_bytes(32).hex())
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(temporary, path)  # atomic, and the first process to get there wins
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return bytes.fromhex(path.read_text().strip())
