"""Sage ID access tokens: an async JWKS cache and the verifier for `/notification` and `/availableaccounts`.

The procedure is spec 2.2.2 and security.md T1-T8. PyJWT does the CPU work only (key parsing, signature, `iss`/`aud`);
fetching is ours, on the shared aiohttp session, because ``PyJWKClient`` blocks the loop, refetches on every unknown
`kid` and forgets good keys when a fetch fails (security.md section 2).

Nothing in this module logs a token, a header or claim value, or a response body: only reasons, counts and statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Literal

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import RSAAlgorithm

log = logging.getLogger("connector.security.tokens")

ALGORITHM = "RS256"
MAX_AUTHORIZATION = 8 * 1024  # Sanic's header cap; anything larger is refused before any parsing or crypto
MAX_KID = 256
MAX_JWKS_BYTES = 1024 * 1024  # a real key set is a few KiB; the cap stops a broken endpoint filling memory
MIN_RSA_BITS = 2048

Reason = Literal[
    "missing",
    "malformed",
    "alg",
    "kid_unknown",
    "signature",
    "expired",
    "not_yet_valid",
    "issuer",
    "audience",
    "scope",
    "client",
]

# Compact JWS: three base64url segments; the signature may be empty only so that `alg: none` reaches the alg check.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class JWKSCache:
    """Sage ID's signing keys, fetched on the shared session and served from memory.

    Refreshes in the background every ``refresh_seconds`` (a request never waits on a periodic refresh), refetches
    on an unknown `kid` at most once per ``unknown_kid_cooldown``, and keeps the last good keys through failed
    fetches for at most ``max_stale_seconds``.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        *,
        refresh_seconds: float = 600,
        unknown_kid_cooldown: float = 60,
        fetch_timeout: float = 5,
        max_stale_seconds: float = 86400,
        clock: Callable[[], float] = time.monotonic,
        max_negative_kids: int = 1024,
    ) -> None:
        self._session = session
        self._url = url
        self._refresh_seconds = refresh_seconds
        self._cooldown = unknown_kid_cooldown
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._max_stale = max_stale_seconds
        self._clock = clock
        self._max_negative = max_negative_kids
        self._keys: dict[str, RSAPublicKey] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last fetch of any outcome, to pace background retries
        self._unknown_fetch_at: float | None = None  # last fetch caused by an unknown kid: the cooldown's anchor
        self._generation = 0  # bumped by every completed fetch, so lock waiters know one just happened
        self._negative: OrderedDict[str, float] = OrderedDict()
        self._lock = asyncio.Lock()
        self._fetch_count = 0
        self._refresh_task: asyncio.Task[None] | None = None

    @property
    def fetch_count(self) -> int:
        """Fetch attempts made, successful or not."""
        return self._fetch_count

    @property
    def is_ready(self) -> bool:
        return self._usable(self._clock())

    async def warm(self) -> bool:
        """Fetch now (at start-up, or from a health check); True if usable keys are held afterwards."""
        async with self._lock:
            await self._fetch()
        return self.is_ready

    async def close(self) -> None:
        """Stop a background refresh in flight (the session belongs to the caller)."""
        task, self._refresh_task = self._refresh_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def get_key(self, kid: str) -> RSAPublicKey | None:
        now = self._clock()
        fetched = self._fetched_at
        if fetched is not None and self._usable(now):
            key = self._keys.get(kid)
            if key is not None:
                if now - fetched >= self._refresh_seconds:
                    self._start_background_refresh(now)
                return key
            seen = self._negative.get(kid)
            if seen is not None and now - seen < self._cooldown:
                return None
        # A fetch in flight is always worth waiting for (a cold start, a burst of misses); starting a new one is
        # what the cooldown limits.
        if not self._lock.locked() and not self._unknown_fetch_allowed(now):
            return None
        generation = self._generation
        async with self._lock:
            # Another request may have fetched while this one waited: use its result rather than fetch again, so
            # a burst of misses (or a cold start) costs one fetch.
            if self._generation == generation and self._unknown_fetch_allowed(self._clock()):
                self._unknown_fetch_at = self._clock()
                await self._fetch()
            now = self._clock()
            key = self._keys.get(kid) if self._usable(now) else None
            if key is None:
                self._remember_unknown(kid, now)
            return key

    def _usable(self, now: float) -> bool:
        return bool(self._keys) and self._fetched_at is not None and now - self._fetched_at <= self._max_stale

    def _unknown_fetch_allowed(self, now: float) -> bool:
        return self._unknown_fetch_at is None or now - self._unknown_fetch_at >= self._cooldown

    def _remember_unknown(self, kid: str, now: float) -> None:
        self._negative[kid] = now
        self._negative.move_to_end(kid)
        while len(self._negative) > self._max_negative:
            self._negative.popitem(last=False)

    def _start_background_refresh(self, now: float) -> None:
        if self._refresh_task is not None and not self._refresh_task.done():
            return
        # After a failed refresh, retry at the cooldown's pace rather than on every request.
        if self._attempted_at is not None and now - self._attempted_at < min(self._cooldown, self._refresh_seconds):
            return
        self._attempted_at = now  # claimed now, so requests arriving before the task runs do not start another
        self._refresh_task = asyncio.get_running_loop().create_task(self._background_refresh())

    async def _background_refresh(self) -> None:
        async with self._lock:
            if self._fetched_at is not None and self._clock() - self._fetched_at < self._refresh_seconds:
                return  # a fetch for an unknown kid already refreshed the set while this task waited
            await self._fetch()

    async def _fetch(self) -> None:
        """One fetch; the caller holds the lock. Keeps the current keys unless a usable set arrives."""
        self._fetch_count += 1
        self._attempted_at = self._clock()
        try:
            keys = await self._download()
        except Exception as exc:  # any failure keeps the last good keys; the caller sees "no key" at worst
            log.warning("JWKS fetch failed", extra={"error_type": type(exc).__name__})
            keys = None
        finally:
            self._generation += 1
        if keys:
            self._keys = keys
            self._fetched_at = self._clock()
            self._negative.clear()
        elif keys is not None:
            log.warning("JWKS fetch returned no usable RS256 signing keys")

    async def _download(self) -> dict[str, RSAPublicKey] | None:
        async with self._session.get(self._url, timeout=self._timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                log.warning("JWKS fetch failed", extra={"status": resp.status})
                return None
            if resp.content_length is not None and resp.content_length > MAX_JWKS_BYTES:
                log.warning("JWKS response too large", extra={"status": resp.status})
                return None
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:  # a chunked body has no content_length to check up front
                    log.warning("JWKS response too large")
                    return None
        try:
            document = json.loads(body)
        except ValueError:
            log.warning("JWKS response is not JSON")
            return None
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            log.warning("JWKS response has no keys array")
            return None
        return _parse_keys(entries)


def _parse_keys(entries: list[Any]) -> dict[str, RSAPublicKey]:
    keys: dict[str, RSAPublicKey] = {}
    skipped = 0
    for entry in entries:
        key = _signing_key(entry)
        if key is None:
            skipped += 1
            continue
        keys.setdefault(entry["kid"], key)  # a duplicate kid keeps the first, as Sage lists the current key first
    if skipped:
        log.info("JWKS entries skipped (not RS256 signing keys)", extra={"count": skipped})
    return keys


def _signing_key(entry: Any) -> RSAPublicKey | None:
    """The entry's public key if it may verify RS256 signatures: kty RSA, use sig or unset, alg RS256 or unset."""
    if not isinstance(entry, dict) or entry.get("kty") != "RSA":
        return None
    kid = entry.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID:
        return None
    if entry.get("use", "sig") != "sig" or entry.get("alg", ALGORITHM) != ALGORITHM:
        return None
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    if "d" in entry:
        return None  # private material in a public key set means the set is broken; do not trust it
    try:
        key = RSAAlgorithm.from_jwk(entry)
    except Exception:  # PyJWT's messages echo the JWK, so the error itself is not logged
        return None
    if not isinstance(key, RSAPublicKey) or key.key_size < MIN_RSA_BITS:
        return None
    return key


class TokenError(Exception):
    """A refused token. ``message`` is safe to return and log: it never holds a token, header or claim value."""

    def __init__(
        self,
        status: Literal[401, 403],
        error: Literal["invalid_token", "insufficient_scope"],
        message: str,
        reason: Reason,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.reason = reason


def _invalid(reason: Reason, message: str) -> TokenError:
    return TokenError(401, "invalid_token", message, reason)


def www_authenticate(err: TokenError) -> str:
    return f'Bearer error="{err.error}"'


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    found: set[str] = set()
    for name in ("scope", "scp", "permissions"):
        value = claims.get(name)
        if isinstance(value, str) and name != "permissions":
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


# PyJWT exceptions in the order they must be matched: InvalidSignatureError is a DecodeError, and the specific claim
# errors are InvalidTokenErrors.
_DECODE_ERRORS: tuple[tuple[type[Exception], Reason, str], ...] = (
    (jwt.InvalidSignatureError, "signature", "token signature is invalid"),
    (jwt.InvalidIssuerError, "issuer", "token issuer is not accepted"),
    (jwt.InvalidAudienceError, "audience", "token audience is not accepted"),
    (jwt.InvalidAlgorithmError, "alg", "token algorithm is not accepted"),
)
_MISSING_CLAIM: dict[str, Reason] = {"iss": "issuer", "aud": "audience", "exp": "malformed"}


class SageTokenVerifier:
    """Checks a request's ``Authorization`` value against Sage ID and returns the verified claims.

    Verified tokens are remembered (keyed on the SHA-256 of the whole token, until the token's ``exp``) so that a
    repeated token costs a hash instead of an RSA verification; scope and client checks still run on every call.
    """

    def __init__(
        self,
        jwks: JWKSCache,
        *,
        issuer: str,
        audience: str,
        leeway: int = 30,
        allowed_clients: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
        cache_size: int = 4096,
    ) -> None:
        self._jwks = jwks
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._allowed = frozenset(allowed_clients)
        self._clock = clock
        self._cache_size = cache_size
        self._verified: OrderedDict[bytes, tuple[float, Mapping[str, Any]]] = OrderedDict()
        self._clients_seen: set[str] = set()

    async def verify(self, authorization: str | None, scope: str) -> Mapping[str, Any]:
        """The verified claims, or :class:`TokenError` (401 ``invalid_token`` / 403 ``insufficient_scope``)."""
        try:
            claims = await self._authenticate(authorization)
        except TokenError as err:
            log.debug("token refused", extra={"reason": err.reason})
            raise
        except Exception as exc:  # a parser surprise must be a 401, never a 500 carrying a traceback
            log.warning("token refused after an unexpected error", extra={"error_type": type(exc).__name__})
            raise _invalid("malformed", "token could not be parsed") from None
        self._authorize(claims, scope)
        return claims

    async def _authenticate(self, authorization: str | None) -> Mapping[str, Any]:
        token = self._bearer(authorization)
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self._clock()
        hit = self._verified.get(digest)
        if hit is not None:
            if now < hit[0]:
                return hit[1]
            del self._verified[digest]  # past exp: re-verify fully, so the leeway applies exactly as for a new token
        return self._remember(digest, await self._decode(token, now))

    def _bearer(self, authorization: str | None) -> str:
        if authorization is not None and len(authorization) > MAX_AUTHORIZATION:
            raise _invalid("malformed", "authorization header is too large")
        if not authorization or not authorization.strip():
            raise _invalid("missing", "a bearer token is required")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            raise _invalid("missing", "a bearer token is required")
        token = token.strip()
        if not token:
            raise _invalid("missing", "a bearer token is required")
        if not _COMPACT_JWS.fullmatch(token):
            raise _invalid("malformed", "token is not a compact JWS")
        return token

    async def _decode(self, token: str, now: float) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except Exception:
            raise _invalid("malformed", "token header could not be parsed") from None
        # Only alg and kid are read from the unverified header. jku, x5u, jwk and x5c are never looked at, so a
        # token can never choose where its key comes from.
        if header.get("alg") != ALGORITHM:
            raise _invalid("alg", "token algorithm is not accepted")
        if "crit" in header:
            raise _invalid("malformed", "token names critical header extensions we do not support")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID:
            raise _invalid("malformed", "token key id is missing or invalid")
        key = await self._jwks.get_key(kid)
        if key is None:
            raise _invalid("kid_unknown", "token key id is not in the Sage ID key set")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                # Time claims are checked below against the injected clock: PyJWT reads the wall clock, which
                # would make expiry of cached tokens and the ±1 s leeway edges untestable.
                options={
                    "require": ["exp", "iss", "aud"],
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                },
            )
        except jwt.MissingRequiredClaimError as err:
            raise _invalid(_MISSING_CLAIM.get(err.claim, "malformed"), "token lacks a required claim") from None
        except jwt.PyJWTError as err:
            for kind, reason, message in _DECODE_ERRORS:
                if isinstance(err, kind):
                    raise _invalid(reason, message) from None
            raise _invalid("malformed", "token could not be decoded") from None
        # PyJWT compared these already; repeated because an exact issuer match is the whole point of the check and
        # PyJWT's own comparison once accepted substrings (CVE-2024-53861).
        if claims.get("iss") != self._issuer:
            raise _invalid("issuer", "token issuer is not accepted")
        self._check_times(claims, now)
        return claims

    def _check_times(self, claims: Mapping[str, Any], now: float) -> None:
        exp = claims.get("exp")
        if not _number(exp):
            raise _invalid("malformed", "token exp is not a number")
        if exp <= now - self._leeway:
            raise _invalid("expired", "token has expired")
        for name in ("nbf", "iat"):  # optional (spec 2.2.2 accepts a token without iat), but never in the future
            if name not in claims:
                continue
            value = claims[name]
            if not _number(value):
                raise _invalid("malformed", f"token {name} is not a number")
            if value > now + self._leeway:
                raise _invalid("not_yet_valid", "token is not valid yet")

    def _remember(self, digest: bytes, claims: dict[str, Any]) -> Mapping[str, Any]:
        # Read-only, because every later caller of the same token gets this very object.
        frozen = MappingProxyType(claims)
        self._verified[digest] = (float(claims["exp"]), frozen)
        while len(self._verified) > self._cache_size:
            self._verified.popitem(last=False)
        return frozen

    def _authorize(self, claims: Mapping[str, Any], scope: str) -> None:
        if scope not in _scopes(claims):
            raise TokenError(403, "insufficient_scope", "token lacks the scope this endpoint requires", "scope")
        client = claims.get("azp", claims.get("sub"))
        if self._allowed:
            if not isinstance(client, str) or client not in self._allowed:
                raise TokenError(403, "insufficient_scope", "token client is not allowed", "client")
        elif isinstance(client, str) and client not in self._clients_seen and len(self._clients_seen) < 64:
            # Spec 2.2.2 step 9: without an allow-list the (verified) client is logged, so it can be learned.
            self._clients_seen.add(client)
            log.info("Sage ID token client seen", extra={"client": client[:128]})
