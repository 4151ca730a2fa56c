"""Secrets at rest: Twilio auth tokens and agent API keys, encrypted with Fernet.

Fernet (``cryptography``: AES-128-CBC + HMAC-SHA256, authenticated, versioned tokens) is the
well-kept primitive for exactly this. ``[security] encryption_key`` (or
``RELAY_SECURITY_ENCRYPTION_KEY``) holds one or more comma-separated Fernet keys:

* the first key encrypts everything written from now on;
* every key listed can decrypt (``MultiFernet``), so rotation is: put the new key first,
  keep the old one after it, run ``relay db rotate-key`` (re-encrypts every stored secret
  with the new key), then drop the old key from the setting.

Without a configured key, the embedded SQLite default keeps a generated key in a file next
to the database (``relay-data/secret.key``, mode 0600). A PostgreSQL store shared by
several processes must be given the key explicitly: each process has to hold the same one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from ..errors import ConfigError, RelayError

log = logging.getLogger("relay.control.secretbox")


class SecretError(RelayError):
    """A stored secret could not be decrypted (wrong or missing key)."""

    kind = "secret_decrypt"


def tail(secret: str) -> str:
    """The last four characters, shown as ``…abcd``; nothing for short secrets."""
    return secret[-4:] if len(secret) >= 12 else ""


def masked(secret_tail: str) -> str:
    return f"…{secret_tail}" if secret_tail else "…****"


class SecretBox:
    """Encrypt/decrypt short secrets; the key list supports rotation (see module doc)."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ConfigError("security.encryption_key: no key given")
        try:
            self._fernets = [Fernet(k) for k in keys]
        except (ValueError, TypeError):
            raise ConfigError(
                "security.encryption_key: each key must be a Fernet key (32 url-safe "
                "base64-encoded bytes; make one with `relay db new-key`)"
            ) from None
        self._multi = MultiFernet(self._fernets)

    @classmethod
    def from_setting(cls, setting: str) -> SecretBox:
        keys = [k.strip().encode() for k in setting.split(",") if k.strip()]
        return cls(keys)

    @staticmethod
    def new_key() -> str:
        return Fernet.generate_key().decode("ascii")

    def encrypt(self, plaintext: str) -> str:
        return self._fernets[0].encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, token: str) -> str:
        try:
            return self._multi.decrypt(token.encode("ascii")).decode()
        except (InvalidToken, ValueError):
            raise SecretError(
                "a stored secret does not decrypt with security.encryption_key "
                "(was the key changed without keeping the old one after it?)"
            ) from None

    def rotate(self, token: str) -> str:
        """Re-encrypt ``token`` under the first key (MultiFernet.rotate)."""
        try:
            return self._multi.rotate(token.encode("ascii")).decode("ascii")
        except (InvalidToken, ValueError):
            raise SecretError("a stored secret does not decrypt with any configured key") from None


def load_or_create_key_file(path: Path) -> str:
    """The embedded default: a key file beside the SQLite database, created once (0600)."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SecretBox.new_key()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    log.info("created the secrets encryption key %s (keep it with the database)", path)
    return key
