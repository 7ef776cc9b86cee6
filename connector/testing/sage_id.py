"""A Sage ID stand-in for tests and the demo: RSA keys generated at run time, a JWKS, and signed tokens.

Nothing here is a real key: every key is made fresh when a :class:`SageIdentity` is built.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

SANDBOX_AUDIENCE = "sfdsbanking/sfdsBankingProvider-Pre"


@dataclass
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        return cls(kid or uuid.uuid4().hex, rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def public_jwk(self) -> dict[str, Any]:
        jwk = json.loads(RSAAlgorithm.to_jwk(self.private.public_key()))
        jwk.update({"kid": self.kid, "use": "sig", "alg": "RS256"})
        return jwk


@dataclass
class SageIdentity:
    """Sage ID as tests see it: publishes ``keys`` as a JWKS and mints tokens with the current key."""

    issuer: str
    audience: str = SANDBOX_AUDIENCE
    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.public_jwk() for k in self.keys]}

    def rotate(self, *, keep_old: bool = True) -> SigningKey:
        """Publish a new signing key (first in the set), optionally dropping the old ones."""
        new = SigningKey.generate()
        self.keys = [new, *self.keys] if keep_old else [new]
        return new

    def claims(self, scope: str | list[str] | None, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "sage-banking-service@clients",
            "azp": "sage-banking-service",
            "iat": now,
            "exp": now + 3600,
        }
        if scope is not None:
            claims["scope"] = scope
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        scope: str | list[str] | None = "WebhooksLambda",
        *,
        key: SigningKey | None = None,
        headers: Mapping[str, Any] | None = None,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        """A token signed like Sage ID's; ``claims`` override the defaults (pass ``None`` to drop one)."""
        signer = key or self.keys[0]
        header = {"kid": signer.kid, **(headers or {})}
        return jwt.encode(self.claims(scope, **claims), signer.private, algorithm=algorithm, headers=header)

    def notification_token(self, **claims: Any) -> str:
        return self.mint("WebhooksLambda", **claims)

    def provider_api_token(self, **claims: Any) -> str:
        return self.mint("ProviderAPI", **claims)
