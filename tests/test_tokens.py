"""Sage ID token checks (security.md T1-T8, section 2 and the section 9 suite cases) against a real JWKS server.

The JWKS and a canary are aiohttp apps on 127.0.0.1; tokens come from :mod:`connector.testing.sage_id`. Time is a
pair of injected clocks (monotonic for the JWKS cache, wall for token times), so cooldowns and expiry need no sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from connector.security import tokens
from connector.security.tokens import JWKSCache, SageTokenVerifier, TokenError, www_authenticate
from connector.testing.connector import eventually
from connector.testing.sage_id import SANDBOX_AUDIENCE, SageIdentity, SigningKey

SANDBOX_ISSUER = "https://id-shadow.sage.com/"
PROD_ISSUER = "https://id.sage.com/"
PROD_AUDIENCE = "sfdsbanking/sfdsBankingProvider"
NOTIFY = "WebhooksLambda"
PROVIDER = "ProviderAPI"

# RSA key generation dominates this file's run time: make a few keys once and share them.
KEY_A = SigningKey.generate("key-a")
KEY_B = SigningKey.generate("key-b")
KEY_C = SigningKey.generate("key-c")
ATTACKER = SigningKey.generate("attacker")


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Server:
    """A loopback HTTP server that counts requests; ``mode`` picks how the JWKS endpoint answers."""

    def __init__(self, identity: SageIdentity | None = None) -> None:
        self.identity = identity
        self.hits = 0
        self.mode = "ok"
        self.document: dict[str, Any] | None = None
        self.redirect_to = ""
        self.release = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "500":
            return web.Response(status=500, text="upstream error")
        if self.mode == "badjson":
            return web.Response(text="{not json", content_type="application/json")
        if self.mode == "redirect":
            raise web.HTTPFound(self.redirect_to)
        if self.mode == "hang":
            await self.release.wait()
        if self.mode.startswith("huge"):
            body = json.dumps(self.identity.jwks() if self.identity else {}).encode() + b" " * (1024 * 1024)
            if self.mode == "huge":
                return web.Response(body=body, content_type="application/json")
            stream = web.StreamResponse()
            stream.enable_chunked_encoding()
            await stream.prepare(request)
            for i in range(0, len(body), 65536):
                await stream.write(body[i : i + 65536])
            await stream.write_eof()
            return stream
        if self.document is not None:
            return web.json_response(self.document)
        return web.json_response(self.identity.jwks() if self.identity else {"keys": []})


@asynccontextmanager
async def serve(server: Server) -> AsyncIterator[Server]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}/.well-known/jwks.json"
    try:
        yield server
    finally:
        server.release.set()
        await runner.cleanup()


@pytest.fixture
def identity() -> SageIdentity:
    return SageIdentity(SANDBOX_ISSUER, keys=[KEY_A])


@pytest.fixture
async def jwks(identity: SageIdentity) -> AsyncIterator[Server]:
    async with serve(Server(identity)) as server:
        yield server


@pytest.fixture
async def canary() -> AsyncIterator[Server]:
    async with serve(Server(SageIdentity(SANDBOX_ISSUER, keys=[ATTACKER]))) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def mono() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(float(int(time.time())))


@pytest.fixture
async def cache(session: aiohttp.ClientSession, jwks: Server, mono: FakeClock) -> AsyncIterator[JWKSCache]:
    c = JWKSCache(session, jwks.url, fetch_timeout=0.3, clock=mono)
    yield c
    await c.close()


@pytest.fixture
def verifier(cache: JWKSCache, wall: FakeClock) -> SageTokenVerifier:
    return SageTokenVerifier(cache, issuer=SANDBOX_ISSUER, audience=SANDBOX_AUDIENCE, clock=wall)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any] | bytes, claims: dict[str, Any] | bytes, sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS built by hand, for shapes PyJWT refuses to produce."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = claims if isinstance(claims, bytes) else json.dumps(claims).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    return f"{signing_input.decode()}.{b64(sign(signing_input))}"


def rs256(key: SigningKey) -> Callable[[bytes], bytes]:
    return lambda data: key.private.sign(data, padding.PKCS1v15(), hashes.SHA256())


def flip(token: str, segment: int) -> str:
    """Change one character in the middle of a segment (never the last, whose low bits may be ignored)."""
    parts = token.split(".")
    seg = parts[segment]
    i = len(seg) // 2
    parts[segment] = seg[:i] + ("B" if seg[i] == "A" else "A") + seg[i + 1 :]
    return ".".join(parts)


def bearer(token: str) -> str:
    return f"Bearer {token}"


async def refused(
    verifier: SageTokenVerifier, authorization: str | None, scope: str = NOTIFY, *, status: int = 401
) -> TokenError:
    with pytest.raises(TokenError) as info:
        await verifier.verify(authorization, scope)
    err = info.value
    assert err.status == status
    assert err.error == ("invalid_token" if status == 401 else "insufficient_scope")
    return err


# --- valid tokens -------------------------------------------------------------------------------------------------


async def test_valid_notification_token_passes(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    claims = await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    assert claims["iss"] == SANDBOX_ISSUER
    assert claims["azp"] == "sage-banking-service"


async def test_valid_provider_api_token_passes(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    claims = await verifier.verify(bearer(identity.provider_api_token()), PROVIDER)
    assert claims["scope"] == PROVIDER


@pytest.mark.parametrize(
    "claims",
    [
        {"scope": "openid WebhooksLambda offline"},
        {"scope": ["other", NOTIFY]},
        {"scp": NOTIFY},
        {"scp": ["other", NOTIFY]},
        {"permissions": [NOTIFY]},
    ],
    ids=["scope-string", "scope-array", "scp-string", "scp-array", "permissions"],
)
async def test_scope_claim_forms_accepted(
    verifier: SageTokenVerifier, identity: SageIdentity, claims: dict[str, Any]
) -> None:
    claims = dict(claims)
    await verifier.verify(bearer(identity.mint(claims.pop("scope", None), **claims)), NOTIFY)


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_bearer_scheme_is_case_insensitive(
    verifier: SageTokenVerifier, identity: SageIdentity, scheme: str
) -> None:
    await verifier.verify(f"{scheme} {identity.notification_token()}", NOTIFY)


async def test_returned_claims_are_read_only(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    claims = await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    with pytest.raises(TypeError):
        claims["scope"] = PROVIDER  # type: ignore[index]


# --- T1: RS256 only, refused before any key lookup ----------------------------------------------------------------


async def test_alg_none_refused_before_key_lookup(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server
) -> None:
    token = forge({"alg": "none", "typ": "JWT", "kid": KEY_A.kid}, identity.claims(NOTIFY), lambda _: b"")
    assert token.endswith(".")
    assert (await refused(verifier, bearer(token))).reason == "alg"
    assert jwks.hits == 0


@pytest.mark.parametrize("secret_form", ["pem", "jwk-json"])
async def test_hs256_signed_with_public_key_refused(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server, secret_form: str
) -> None:
    public = KEY_A.private.public_key()
    secret = (
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        if secret_form == "pem"
        else json.dumps(KEY_A.public_jwk()).encode()
    )
    token = forge(
        {"alg": "HS256", "typ": "JWT", "kid": KEY_A.kid},
        identity.claims(NOTIFY),
        lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
    assert (await refused(verifier, bearer(token))).reason == "alg"
    assert jwks.hits == 0


@pytest.mark.parametrize("alg", ["RS384", "RS512", "PS256", "ES256"])
async def test_other_asymmetric_algorithms_refused(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server, alg: str
) -> None:
    key: Any = ec.generate_private_key(ec.SECP256R1()) if alg == "ES256" else KEY_A.private
    token = jwt.encode(identity.claims(NOTIFY), key, algorithm=alg, headers={"kid": KEY_A.kid})
    assert (await refused(verifier, bearer(token))).reason == "alg"
    assert jwks.hits == 0


# --- T2: signature before claims ----------------------------------------------------------------------------------


async def test_flipped_payload_byte_refused_and_no_claim_logged(
    verifier: SageTokenVerifier, identity: SageIdentity, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    canary_value = f"canary-{uuid.uuid4().hex}"
    token = identity.mint(NOTIFY, sub=canary_value, azp=canary_value)
    tampered = flip(token, 1)
    assert (await refused(verifier, bearer(tampered))).reason == "signature"
    assert canary_value not in caplog.text
    assert tampered not in caplog.text and tampered.split(".")[1] not in caplog.text


async def test_flipped_signature_byte_refused(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    token = identity.notification_token()
    assert (await refused(verifier, bearer(flip(token, 2)))).reason == "signature"


# --- T3: kid only as a lookup key; jku/x5u/jwk/x5c ignored ---------------------------------------------------------


async def test_kid_absent_single_jwks_refused_unlike_openid_suite(
    verifier: SageTokenVerifier, identity: SageIdentity
) -> None:
    # The OpenID suite's kid-absent-single-jwks expects acceptance; spec 2.2.2 requires a kid, so we refuse.
    token = jwt.encode(identity.claims(NOTIFY), KEY_A.private, algorithm="RS256")
    assert "kid" not in jwt.get_unverified_header(token)
    assert (await refused(verifier, bearer(token))).reason == "malformed"


async def test_kid_absent_multiple_jwks_refused(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    identity.keys = [KEY_A, KEY_B]
    token = jwt.encode(identity.claims(NOTIFY), KEY_A.private, algorithm="RS256")
    assert (await refused(verifier, bearer(token))).reason == "malformed"


@pytest.mark.parametrize("kid", ["../../x", '"', "k" * 300, "x" * 10_000], ids=["path", "quote", "300", "10KB"])
async def test_hostile_kid_refused(verifier: SageTokenVerifier, identity: SageIdentity, kid: str) -> None:
    token = identity.mint(NOTIFY, headers={"kid": kid})
    await refused(verifier, bearer(token))


@pytest.mark.parametrize("kid", [123, ["key-a"], {"k": "key-a"}, None, "", True])
async def test_kid_not_a_string_refused(verifier: SageTokenVerifier, identity: SageIdentity, kid: Any) -> None:
    token = forge({"alg": "RS256", "typ": "JWT", "kid": kid}, identity.claims(NOTIFY), rs256(KEY_A))
    assert (await refused(verifier, bearer(token))).reason == "malformed"


@pytest.mark.parametrize("kid", [ATTACKER.kid, KEY_A.kid], ids=["attacker-kid", "our-kid"])
async def test_jku_jwk_x5u_headers_are_never_followed(
    verifier: SageTokenVerifier, identity: SageIdentity, canary: Server, kid: str
) -> None:
    jwk = ATTACKER.public_jwk()
    headers = {"kid": kid, "jku": canary.url, "x5u": canary.url, "jwk": jwk, "x5c": ["MIIB"]}
    for extra in ({"jku": canary.url}, {"jwk": jwk}, headers):
        token = identity.mint(NOTIFY, key=ATTACKER, headers={**extra, "kid": kid})
        await refused(verifier, bearer(token))
    assert canary.hits == 0


@pytest.mark.parametrize(
    "crit",
    [{"crit": ["http://example.invalid/ext"]}, {"crit": ["b64"], "b64": True}],
    ids=["unknown-extension", "b64-which-pyjwt-supports"],
)
async def test_crit_header_refused(verifier: SageTokenVerifier, identity: SageIdentity, crit: dict[str, Any]) -> None:
    token = forge({"alg": "RS256", "typ": "JWT", "kid": KEY_A.kid, **crit}, identity.claims(NOTIFY), rs256(KEY_A))
    await refused(verifier, bearer(token))


# --- T4/T5: issuer and audience -----------------------------------------------------------------------------------


async def test_issuer_without_trailing_slash_refused(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    token = identity.mint(NOTIFY, iss=SANDBOX_ISSUER.rstrip("/"))
    assert (await refused(verifier, bearer(token))).reason == "issuer"


@pytest.mark.parametrize("iss", [SANDBOX_ISSUER + "x", "https://id-shadow.sage.com", "https://evil.example/", None])
async def test_other_issuers_refused(verifier: SageTokenVerifier, identity: SageIdentity, iss: str | None) -> None:
    assert (await refused(verifier, bearer(identity.mint(NOTIFY, iss=iss)))).reason == "issuer"


async def test_production_token_against_sandbox_config_refused(
    verifier: SageTokenVerifier, identity: SageIdentity
) -> None:
    for claims in ({"iss": PROD_ISSUER}, {"iss": PROD_ISSUER, "aud": PROD_AUDIENCE}):
        await refused(verifier, bearer(identity.mint(NOTIFY, **claims)))


async def test_sandbox_token_against_production_config_refused(
    cache: JWKSCache, identity: SageIdentity, wall: FakeClock
) -> None:
    production = SageTokenVerifier(cache, issuer=PROD_ISSUER, audience=PROD_AUDIENCE, clock=wall)
    await refused(production, bearer(identity.notification_token()))


@pytest.mark.parametrize(
    "aud",
    [None, "sfdsbanking/other", PROD_AUDIENCE, ["sfdsbanking/other", PROD_AUDIENCE], [], SANDBOX_AUDIENCE + "/"],
    ids=["missing", "other", "production", "array-without-ours", "empty-array", "suffixed"],
)
async def test_audience_refused(verifier: SageTokenVerifier, identity: SageIdentity, aud: Any) -> None:
    assert (await refused(verifier, bearer(identity.mint(NOTIFY, aud=aud)))).reason == "audience"


async def test_audience_array_with_ours_passes(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    await verifier.verify(bearer(identity.mint(NOTIFY, aud=["sfdsbanking/other", SANDBOX_AUDIENCE])), NOTIFY)


# --- T6: time claims, 30 s leeway ---------------------------------------------------------------------------------


async def test_exp_leeway_edges(verifier: SageTokenVerifier, identity: SageIdentity, wall: FakeClock) -> None:
    now = int(wall.t)
    expired = identity.mint(NOTIFY, iat=now - 600, exp=now - 31)
    assert (await refused(verifier, bearer(expired))).reason == "expired"
    await verifier.verify(bearer(identity.mint(NOTIFY, iat=now - 600, exp=now - 29)), NOTIFY)


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_future_nbf_and_iat_leeway_edges(
    verifier: SageTokenVerifier, identity: SageIdentity, wall: FakeClock, claim: str
) -> None:
    now = int(wall.t)
    early = identity.mint(NOTIFY, **{claim: now + 31})
    assert (await refused(verifier, bearer(early))).reason == "not_yet_valid"
    await verifier.verify(bearer(identity.mint(NOTIFY, **{claim: now + 29})), NOTIFY)


async def test_missing_exp_refused(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    await refused(verifier, bearer(identity.mint(NOTIFY, exp=None)))


@pytest.mark.parametrize("exp", ["9999999999", True, [1]])
async def test_non_numeric_exp_refused(verifier: SageTokenVerifier, identity: SageIdentity, exp: Any) -> None:
    await refused(verifier, bearer(identity.mint(NOTIFY, exp=exp)))


async def test_missing_iat_accepted(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    # Spec 2.2.2 does not require iat (the OpenID suite's missing-iat case); pinned deliberately.
    claims = await verifier.verify(bearer(identity.mint(NOTIFY, iat=None)), NOTIFY)
    assert "iat" not in claims


# --- T7: scope and client -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token_scope", "required"),
    [
        (PROVIDER, NOTIFY),
        (NOTIFY, PROVIDER),
        (None, NOTIFY),
        ("WebhooksLambdaX", NOTIFY),
        ("webhookslambda", NOTIFY),
        ("ProviderAPI,WebhooksLambda", NOTIFY),
    ],
    ids=["provider-on-notification", "notification-on-provider", "no-scope", "lookalike", "case", "comma-joined"],
)
async def test_wrong_scope_forbidden(
    verifier: SageTokenVerifier, identity: SageIdentity, token_scope: str | None, required: str
) -> None:
    err = await refused(verifier, bearer(identity.mint(token_scope)), required, status=403)
    assert err.reason == "scope"
    assert www_authenticate(err) == 'Bearer error="insufficient_scope"'


async def test_scope_checked_on_every_call_even_when_cached(
    verifier: SageTokenVerifier, identity: SageIdentity
) -> None:
    token = identity.notification_token()
    await verifier.verify(bearer(token), NOTIFY)
    await refused(verifier, bearer(token), PROVIDER, status=403)


async def test_allowed_clients(cache: JWKSCache, identity: SageIdentity, wall: FakeClock) -> None:
    v = SageTokenVerifier(
        cache, issuer=SANDBOX_ISSUER, audience=SANDBOX_AUDIENCE, allowed_clients=["sage-banking-service"], clock=wall
    )
    await v.verify(bearer(identity.notification_token()), NOTIFY)
    await v.verify(bearer(identity.notification_token(azp=None, sub="sage-banking-service")), NOTIFY)
    for claims in ({"azp": "someone-else"}, {"azp": "someone-else", "sub": "sage-banking-service"}, {"azp": None}):
        err = await refused(v, bearer(identity.notification_token(**claims)), status=403)
        assert err.reason == "client"


# --- JWKS cache (security.md section 2) ---------------------------------------------------------------------------


async def test_random_kids_cost_at_most_one_extra_fetch(
    verifier: SageTokenVerifier, cache: JWKSCache, identity: SageIdentity, jwks: Server, mono: FakeClock
) -> None:
    assert await cache.warm()
    for i in range(200):
        token = identity.mint(NOTIFY, headers={"kid": uuid.uuid4().hex})
        assert (await refused(verifier, bearer(token))).reason == "kid_unknown"
        mono.advance(0.25)  # 200 tokens spread over 50 s: all within one cooldown
    assert jwks.hits <= 2
    assert cache.fetch_count == jwks.hits


async def test_concurrent_verifies_on_cold_cache_make_one_fetch(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server
) -> None:
    tokens_ = [identity.notification_token(jti=str(i)) for i in range(50)]
    await asyncio.gather(*(verifier.verify(bearer(t), NOTIFY) for t in tokens_))
    assert jwks.hits == 1


async def test_cold_start_failure_then_recovery(
    verifier: SageTokenVerifier, cache: JWKSCache, identity: SageIdentity, jwks: Server
) -> None:
    jwks.mode = "500"
    assert not await cache.warm()
    assert not cache.is_ready
    jwks.mode = "ok"
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    assert cache.is_ready


@pytest.mark.parametrize("mode", ["500", "badjson", "redirect", "empty", "huge", "huge-chunked"])
async def test_failed_refresh_keeps_known_keys_until_max_stale(
    verifier: SageTokenVerifier,
    cache: JWKSCache,
    identity: SageIdentity,
    jwks: Server,
    canary: Server,
    mono: FakeClock,
    mode: str,
) -> None:
    assert await cache.warm()
    jwks.mode, jwks.redirect_to = ("ok", "") if mode == "empty" else (mode, canary.url)
    if mode == "empty":
        jwks.document = {"keys": []}
    mono.advance(601)
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    await eventually(lambda: jwks.hits == 2, timeout=1, interval=0.005)
    await verifier.verify(bearer(identity.notification_token(jti="2")), NOTIFY)
    assert canary.hits == 0
    mono.advance(86400)  # last good keys are now older than max_stale_seconds
    assert (await refused(verifier, bearer(identity.notification_token(jti="3")))).reason == "kid_unknown"
    assert not cache.is_ready


async def test_hanging_jwks_does_not_slow_known_kid(
    verifier: SageTokenVerifier, cache: JWKSCache, identity: SageIdentity, jwks: Server, mono: FakeClock
) -> None:
    assert await cache.warm()
    jwks.mode = "hang"
    mono.advance(601)
    started = time.perf_counter()
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    assert time.perf_counter() - started < 0.1  # the refresh runs in the background
    await eventually(lambda: jwks.hits == 2, timeout=1, interval=0.005)
    # A kid that does need a fetch waits at most the fetch timeout (0.3 s here), then gets a plain 401.
    started = time.perf_counter()
    await refused(verifier, bearer(identity.mint(NOTIFY, headers={"kid": "new-kid"})))
    assert time.perf_counter() - started < 1.0
    assert jwks.hits == 2  # it waited for the refresh in flight instead of starting its own
    await verifier.verify(bearer(identity.notification_token(jti="2")), NOTIFY)


async def test_key_rotation_passes_after_one_refetch(
    verifier: SageTokenVerifier, cache: JWKSCache, identity: SageIdentity, jwks: Server
) -> None:
    assert await cache.warm()
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    identity.keys = [KEY_B]  # rotated: new key published, old one removed
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    assert jwks.hits == 2
    old = identity.mint(NOTIFY, key=KEY_A, jti="old")  # a jti so it is not the token cached above
    assert (await refused(verifier, bearer(old))).reason == "kid_unknown"
    assert jwks.hits == 2


async def test_second_unknown_kid_waits_for_cooldown(
    verifier: SageTokenVerifier, cache: JWKSCache, identity: SageIdentity, jwks: Server, mono: FakeClock
) -> None:
    assert await cache.warm()
    identity.keys = [KEY_B, KEY_A]
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)
    assert jwks.hits == 2
    mono.advance(10)
    identity.keys = [KEY_C, KEY_B, KEY_A]
    token_c = identity.notification_token()
    assert (await refused(verifier, bearer(token_c))).reason == "kid_unknown"
    assert jwks.hits == 2
    mono.advance(50)
    await verifier.verify(bearer(token_c), NOTIFY)
    assert jwks.hits == 3


async def test_kid_published_after_a_miss_passes_after_cooldown(
    verifier: SageTokenVerifier, cache: JWKSCache, identity: SageIdentity, jwks: Server, mono: FakeClock
) -> None:
    assert await cache.warm()
    token_b = identity.mint(NOTIFY, key=KEY_B)  # signed before Sage's JWKS lists the key
    assert (await refused(verifier, bearer(token_b))).reason == "kid_unknown"
    assert jwks.hits == 2
    identity.keys = [KEY_B, KEY_A]
    mono.advance(30)
    assert (await refused(verifier, bearer(token_b))).reason == "kid_unknown"
    assert jwks.hits == 2
    mono.advance(31)
    await verifier.verify(bearer(token_b), NOTIFY)
    assert jwks.hits == 3


def _public(key: SigningKey, **changes: Any) -> dict[str, Any]:
    return {**key.public_jwk(), **changes}


@pytest.mark.parametrize(
    "entry",
    [
        {"kty": "oct", "kid": KEY_A.kid, "k": b64(b"0" * 32), "alg": "HS256"},
        _public(KEY_A, use="enc"),
        _public(KEY_A, alg="RS384"),
        _public(KEY_A, key_ops=["encrypt"]),
        _public(KEY_A, kty="EC"),
    ],
    ids=["oct", "use-enc", "alg-rs384", "key-ops-encrypt", "kty-mismatch"],
)
async def test_non_signing_keys_are_not_used(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server, entry: dict[str, Any]
) -> None:
    jwks.document = {"keys": [entry]}
    assert (await refused(verifier, bearer(identity.notification_token()))).reason == "kid_unknown"


async def test_jwks_with_extra_junk_entries_still_serves_good_keys(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server
) -> None:
    junk = ["junk", {"kty": "RSA"}, {"kty": "RSA", "kid": "x", "n": "!!", "e": "AQAB"}, _public(KEY_B, d="AQAB")]
    jwks.document = {"keys": [*junk, *identity.jwks()["keys"]]}
    await verifier.verify(bearer(identity.notification_token()), NOTIFY)


# --- malformed input: always 401, never an escaping exception ------------------------------------------------------


def _malformed_tokens() -> dict[str, str]:
    claims = SageIdentity(SANDBOX_ISSUER, keys=[KEY_A]).claims(NOTIFY)
    header = {"alg": "RS256", "typ": "JWT", "kid": KEY_A.kid}
    good = forge(header, claims, rs256(KEY_A))
    return {
        "two-segments": ".".join(good.split(".")[:2]),
        "four-segments": good + ".AAAA",
        "bad-base64": "!!!." + good.split(".", 1)[1],
        "bad-base64-length": "A." + good.split(".", 1)[1],
        "header-not-json": forge(b"not json", claims, rs256(KEY_A)),
        "header-json-array": forge(b'["RS256"]', claims, rs256(KEY_A)),
        "header-non-utf8": forge(b"\xff\xfe{", claims, rs256(KEY_A)),
        "payload-not-json-signed": forge(header, b"not json", rs256(KEY_A)),
        "payload-json-array-signed": forge(header, b"[1,2]", rs256(KEY_A)),
        "empty-segments": "..",
        "non-ascii": "é." + good.split(".", 1)[1],
    }


@pytest.mark.parametrize("name", list(_malformed_tokens()))
async def test_malformed_token_refused_with_401(verifier: SageTokenVerifier, name: str) -> None:
    await refused(verifier, bearer(_malformed_tokens()[name]))


@pytest.mark.parametrize(
    "authorization",
    [None, "", "   ", "Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "Token abc.def.ghi", "Bearer a.b.c d", "x" * 9000],
    ids=["none", "empty", "blank", "basic", "bare-scheme", "scheme-spaces", "other-scheme", "two-tokens", "9k"],
)
async def test_bad_authorization_header_refused(
    verifier: SageTokenVerifier, jwks: Server, authorization: str | None
) -> None:
    err = await refused(verifier, authorization)
    assert www_authenticate(err) == 'Bearer error="invalid_token"'
    assert jwks.hits == 0


async def test_token_without_scheme_refused(verifier: SageTokenVerifier, identity: SageIdentity) -> None:
    await refused(verifier, identity.notification_token())


async def test_100kb_authorization_refused_before_any_crypto(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[str] = []

    def spy(name: str) -> Callable[..., Any]:
        real = getattr(tokens.jwt, name)
        return lambda *a, **k: parsed.append(name) or real(*a, **k)

    monkeypatch.setattr(tokens.jwt, "get_unverified_header", spy("get_unverified_header"))
    monkeypatch.setattr(tokens.jwt, "decode", spy("decode"))
    token = identity.mint(NOTIFY, padding="p" * 100_000)
    assert (await refused(verifier, bearer(token))).reason == "malformed"
    assert parsed == []
    assert jwks.hits == 0


# --- T8: verified-token cache -------------------------------------------------------------------------------------


async def test_cache_hit_skips_crypto(
    verifier: SageTokenVerifier, identity: SageIdentity, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0
    real_decode = tokens.jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting_decode)
    token = identity.notification_token()
    for _ in range(3):
        await verifier.verify(bearer(token), NOTIFY)
    assert calls == 1


async def test_cached_token_with_changed_signature_byte_refused(
    verifier: SageTokenVerifier, identity: SageIdentity
) -> None:
    token = identity.notification_token()
    await verifier.verify(bearer(token), NOTIFY)
    assert (await refused(verifier, bearer(flip(token, 2)))).reason == "signature"
    await verifier.verify(bearer(token), NOTIFY)


async def test_cached_token_refused_after_exp(
    verifier: SageTokenVerifier, identity: SageIdentity, wall: FakeClock
) -> None:
    token = identity.mint(NOTIFY, exp=int(wall.t) + 60)
    await verifier.verify(bearer(token), NOTIFY)
    wall.advance(60 + 29)  # past exp, within leeway: the entry is gone, a full check still accepts
    await verifier.verify(bearer(token), NOTIFY)
    wall.advance(2)
    assert (await refused(verifier, bearer(token))).reason == "expired"


async def test_verified_cache_is_bounded(
    cache: JWKSCache, identity: SageIdentity, wall: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    v = SageTokenVerifier(cache, issuer=SANDBOX_ISSUER, audience=SANDBOX_AUDIENCE, clock=wall, cache_size=2)
    calls = 0
    real_decode = tokens.jwt.decode

    def counting_decode(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(tokens.jwt, "decode", counting_decode)
    t1, t2, t3 = (identity.notification_token(jti=str(i)) for i in range(3))
    for t in (t1, t2, t3, t1):  # t1 was dropped as the oldest when t3 arrived
        await v.verify(bearer(t), NOTIFY)
    assert calls == 4


async def test_failures_are_not_cached(
    verifier: SageTokenVerifier, identity: SageIdentity, jwks: Server, mono: FakeClock
) -> None:
    jwks.document = {"keys": []}
    token = identity.notification_token()
    assert (await refused(verifier, bearer(token))).reason == "kid_unknown"
    jwks.document = None
    mono.advance(60)
    await verifier.verify(bearer(token), NOTIFY)  # same token passes once its key can be fetched


def test_www_authenticate() -> None:
    assert www_authenticate(TokenError(401, "invalid_token", "m", "signature")) == 'Bearer error="invalid_token"'
    assert www_authenticate(TokenError(403, "insufficient_scope", "m", "scope")) == (
        'Bearer error="insufficient_scope"'
    )
