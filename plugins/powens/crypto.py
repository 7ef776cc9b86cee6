"""End-to-end encryption of field values (powens.md §4, §16 OP-3), with ``joserfc``.

Each value becomes one compact JWE (``RSA-OAEP-256`` + ``A256GCM``, ``kid`` in the protected header) under the
domain's public key from ``GET /publickey``. The key is cached for an hour; :meth:`KeyCache.refresh` drops it when
Powens says the key is wrong. Values and ciphertexts are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

from .client import PowensBadAnswer, PowensClient

log = logging.getLogger("plugins.powens")

ALG = "RSA-OAEP-256"
ENC = "A256GCM"
KEY_TTL_SECONDS = 3600.0
REGISTRY = jwe.JWERegistry(algorithms=[ALG, ENC])


class KeyProblem(Exception):
    """The published key cannot be used (no ``kid``, not RSA, unreadable)."""


def pick_key(body: Any) -> dict[str, Any]:
    """The JWK to encrypt with: from a JWK set, the RSA key for ``enc`` (or ``RSA-OAEP-256``), else the first RSA
    key; any other body is one JWK (§16 OP-3)."""
    if isinstance(body, dict) and isinstance(body.get("keys"), list):
        rsa = [k for k in body["keys"] if isinstance(k, dict) and k.get("kty") == "RSA"]
        preferred = [k for k in rsa if k.get("use") == "enc" or k.get("alg") == ALG]
        if not rsa:
            raise KeyProblem("the key set has no RSA key")
        return (preferred or rsa)[0]
    if isinstance(body, dict) and body.get("kty") == "RSA":
        return body
    raise KeyProblem("the published key is not an RSA JWK")


class KeyCache:
    def __init__(self, client: PowensClient, clock: Callable[[], float]) -> None:
        self._client = client
        self._clock = clock
        self._key: RSAKey | None = None
        self._kid: str | None = None
        self._fetched_at = 0.0

    @property
    def kid(self) -> str | None:
        return self._kid

    async def _load(self) -> tuple[RSAKey, str]:
        if self._key is not None and self._kid and self._clock() - self._fetched_at < KEY_TTL_SECONDS:
            return self._key, self._kid
        try:
            body = await self._client.request("GET", "/publickey")
            jwk = pick_key(body)
            kid = jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                # The JWE header must carry the kid, so a key without one cannot be used at all.
                raise KeyProblem("the published key has no kid")
            key = RSAKey.import_key({k: v for k, v in jwk.items() if k in ("kty", "n", "e", "kid")})
        except (KeyProblem, JoseError, ValueError, TypeError) as exc:
            reason = str(exc) if isinstance(exc, KeyProblem) else type(exc).__name__
            log.error("powens public key unusable", extra={"error": reason})
            raise KeyProblem(str(exc)) from None
        except PowensBadAnswer as exc:
            raise KeyProblem(f"bad /publickey answer: {exc}") from None
        self._key, self._kid, self._fetched_at = key, kid, self._clock()
        return key, kid

    async def refresh(self) -> str | None:
        """Forget the cached key and fetch it again; returns the new ``kid``."""
        old = self._kid
        self._key, self._kid = None, None
        _, kid = await self._load()
        if kid != old:
            log.info("powens public key changed", extra={"kid": kid})
        return kid

    async def encrypt(self, values: Mapping[str, str]) -> dict[str, str]:
        """One compact JWE per value, under the same JSON keys."""
        key, kid = await self._load()
        header = {"alg": ALG, "enc": ENC, "kid": kid}
        return {
            name: jwe.encrypt_compact(header, value.encode("utf-8"), key, registry=REGISTRY)
            for name, value in values.items()
        }
