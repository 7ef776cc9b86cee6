"""Secrets at rest: AES-256-GCM with key rotation.

A sealed value is ``version (1 byte) ‖ key id (8 bytes) ‖ nonce (12 bytes) ‖ ciphertext+tag``. The key id is a hash
of the key, so the order of ``security.encryption_keys`` can change freely: the first key encrypts, and any listed
key decrypts what it sealed. Associated data binds each value to its table, column and row, so a ciphertext copied
into another row does not decrypt.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

VERSION = b"\x01"
_HEADER = 1 + 8 + 12


class SecretError(Exception):
    """A sealed value could not be opened (unknown key id, tampered or misplaced ciphertext)."""


class UnknownKey(SecretError):
    """A value sealed with a key that is no longer configured: an operator's fix (put the key back, or rotate)."""


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"connector-key-id\0" + key).digest()[:8]


class SecretBox:
    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self._current = key_id(keys[0])

    def seal(self, plaintext: bytes, aad: str) -> bytes:
        nonce = os.urandom(12)
        sealed = self._keys[self._current].encrypt(nonce, plaintext, aad.encode())
        return VERSION + self._current + nonce + sealed

    def open(self, sealed: bytes, aad: str) -> bytes:
        if len(sealed) < _HEADER + 16 or sealed[:1] != VERSION:
            raise SecretError("sealed value is malformed")
        kid, nonce = sealed[1:9], sealed[9:_HEADER]
        aead = self._keys.get(kid)
        if aead is None:
            raise UnknownKey(f"sealed with key id {kid.hex()}, which is not in security.encryption_keys")
        try:
            return aead.decrypt(nonce, sealed[_HEADER:], aad.encode())
        except InvalidTag:
            raise SecretError("sealed value failed authentication (tampered, or copied from another row)") from None

    def seal_json(self, value: Any, aad: str) -> bytes:
        return self.seal(json.dumps(value, separators=(",", ":"), default=str).encode(), aad)

    def open_json(self, sealed: bytes, aad: str) -> Any:
        return json.loads(self.open(sealed, aad))

    def is_current(self, sealed: bytes) -> bool:
        """Whether ``sealed`` already uses the first key (the re-encrypt pass skips it)."""
        return sealed[1:9] == self._current


def new_key() -> str:
    """A fresh key in the form ``security.encryption_keys`` expects (base64url of 32 random bytes)."""
    import base64

    return base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
