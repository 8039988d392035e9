"""Bookings kept at rest while their decision is incomplete, sealed with AES-256-GCM.

The coordinator keeps an incomplete booking (fingerprints included) only so that it can finish
the search by itself, and only until the decision is final. The key comes from a file named in
the configuration (a Kubernetes secret, say); without one, the coordinator creates a random key
in its data directory on first start, readable by its own user only (a development default: in
production the key lives apart from the database, as the Helm chart mounts it from a Secret). A
key file others may read stops the coordinator from starting.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedprint.private import private_directory, require_private_key

log = structlog.get_logger(__name__)

KEY_BYTES = 32
NONCE_BYTES = 12


class SealingError(ValueError):
    """A key file is unusable, or a sealed booking does not open with this key."""


def load_or_create_key(path: Path, what: str = "booking key") -> bytes:
    """The 32-byte key in ``path`` (hex), created (mode 0600, in a 0700 directory) when the file
    does not exist; ``what`` names the key in messages. Raises
    :class:`~fedprint.private.ExposedKeyFile` when others may read the file: the service does not
    start on a key that has already leaked to every local user."""
    if not path.exists():
        private_directory(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(KEY_BYTES) + "\n")
        log.warning(f"created a {what}; keep it apart from the database and backed up", path=str(path))
    require_private_key(path, what)
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        raise SealingError(f"{path}: the {what} must be {KEY_BYTES} bytes in hex") from None
    if len(key) != KEY_BYTES:
        raise SealingError(f"{path}: the {what} must be {KEY_BYTES} bytes in hex, not {len(key)}")
    return key


class BookingSeal:
    """Seals and opens serialized bookings; the TCN is bound in as associated data, so a sealed
    booking cannot be passed off under another TCN."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, tcn: str, plaintext: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, tcn.encode())

    def open(self, tcn: str, sealed: bytes) -> bytes:
        try:
            return self._aead.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], tcn.encode())
        except Exception as error:  # InvalidTag: wrong key, wrong TCN or altered bytes
            raise SealingError(f"sealed booking {tcn} does not open with this key") from error
