"""A Powens API emulator for tests and ``connector demo`` (powens.md §15): a real aiohttp server on loopback.

Everything secret is made at run time: the RSA key behind ``/publickey``, the client secret, the webhook HMAC secret,
user tokens and codes. Field values arrive as compact JWEs and are decrypted with ``joserfc``; a clear or
non-conforming value is refused with ``400 invalidValue``, a known ``kid`` that does not decrypt with ``keymanager``.

Scripted banks: the login typed picks what the bank does (lessons.md, "scripted sandbox banks")::

    wrongpass        400 wrongpass; a new connection (or a new source) is not kept
    otp              additionalInformationNeeded with an OTP field; the code is ``emulator.otp``
    decoupled        decoupled → (resume) validating → after ``validating_polls`` reads, synced
    sca              SCARequired; a person-present ``{}`` POST clears it
    webauthreq       webauthRequired; a webauth round trip clears it
    actionneeded     actionNeeded until :meth:`PowensEmulator.resolve` is called
    passwordexpired  passwordExpired with a ``new_password`` field
    ratelimiting / unavailable / bug / notsupported   the matching state, for good
    weird            a state no spec knows
    anything else    synced at once

Fault injection: :meth:`fail_next`, :meth:`malformed_next`, :meth:`delay_next`, ``rate_limit_per_minute``,
:meth:`publish_mismatched_key`, :meth:`rotate_key`, and the switches of §16 (``creation_status``,
``wrongpass_spelling``, ``token_response``, ``publickey_shape``, ``foreign_next_link``).
"""

from __future__ import annotations

import asyncio
import base64
import gzip as gzip_module
import hashlib
import hmac
import html
import itertools
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiohttp import web
from joserfc import jwe
from joserfc.errors import JoseError
from joserfc.jwk import RSAKey

API = "/2.0"
CLIENT_ID = "1234567"

TWO_SOURCE_BANK = "5f0c1e2a-8a3b-4c5d-9e6f-7a8b9c0d1e2f"
CREDENTIALS_BANK = "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
WEBAUTH_BANK = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
WEBAUTH_FIELDS_BANK = "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e"
RESTRICTED_BANK = "7c6b5a4f-3e2d-4c1b-8a9f-8e7d6c5b4a3f"

SCRIPTS: dict[str, str] = {
    "otp": "additionalInformationNeeded",
    "decoupled": "decoupled",
    "sca": "SCARequired",
    "webauthreq": "webauthRequired",
    "actionneeded": "actionNeeded",
    "passwordexpired": "passwordExpired",
    "ratelimiting": "rateLimiting",
    "unavailable": "websiteUnavailable",
    "bug": "bug",
    "notsupported": "notSupported",
    "weird": "quantumFlux",
}
CLEAR_KEYS = frozenset({"connector_uuid", "id_connector", "source", "resume", "active", "expire", "refresh_auth"})
WEBAUTH_KEYS = frozenset(
    {"client_id", "redirect_uri", "connector_uuid", "id_connector", "id_connection", "source", "state", "token"}
)
TEMP_USER_SECONDS = 30 * 60
JWE_REGISTRY = jwe.JWERegistry(algorithms=["RSA-OAEP-256", "A256GCM"])

def _new_key(kid: str | None = None) -> RSAKey:
    """A fresh 2048-bit RSA key (made at run time; never stored)."""
    return RSAKey.generate_key(2048, parameters={"kid": kid or secrets.token_hex(8), "use": "enc",
                                                 "alg": "RSA-OAEP-256"})


def fmt(value: datetime | None) -> str | None:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else None


def parse_dt(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed


class ApiError(Exception):
    def __init__(self, status: int, code: str, description: str = "", message: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(code)
        self.status, self.code, self.description, self.message = status, code, description, message
        self.headers = dict(headers or {})


# --- fixtures ------------------------------------------------------------------------------------------------------


def _field(name: str, label: str, type_: str = "text", *, required: bool = True, regex: str | None = None,
           mechanisms: Iterable[str] = ("credentials",), sources: Iterable[str] = (),
           values: Iterable[tuple[str, str]] = (), description: str | None = None) -> dict[str, Any]:
    return {"name": name, "label": label, "type": type_, "required": required, "regex": regex,
            "description": description, "values": [{"label": lab, "value": val} for val, lab in values],
            "auth_mechanisms": list(mechanisms), "connector_sources": list(sources)}


LOGIN_REGEX = r"^[a-z0-9._-]{3,32}$"


def default_connectors() -> dict[str, dict[str, Any]]:
    """A credentials-only bank, a webauth-only bank, a webauth bank with a field, a two-source bank shaped like the
    §2.6 example (``directaccess`` credentials first, ``openapi`` webauth second, a disabled ``fallback``), and a
    restricted one."""

    def source(sid: int, cid: int, name: str, mech: str, priority: int, disabled: str | None = None) -> dict[str, Any]:
        return {"id": sid, "id_connector": cid, "name": name, "auth_mechanism": mech,
                "available_auth_mechanisms": [mech], "disabled": disabled, "priority": priority,
                "capabilities": ["bank"], "account_usages": ["PRIV", "ORGA"]}

    def connector(cid: int, uuid: str, name: str, mech: str, sources: list[dict[str, Any]],
                  fields: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": cid, "uuid": uuid, "name": name, "hidden": False, "restricted": False, "beta": False,
                "charged": True, "code": None, "color": "0055aa", "slug": name.upper()[:4], "months_to_fetch": 24,
                "auth_mechanism": mech, "capabilities": ["bank"], "account_usages": ["PRIV", "ORGA"],
                "products": ["bank"], "sources": sources, "fields": fields, **extra}

    login = _field("login", "Customer number", regex=LOGIN_REGEX, sources=("directaccess",),
                   description="The number on your bank card letter")
    password = _field("password", "Password", "password", sources=("directaccess",))
    website = _field("website", "Customer type", "list", mechanisms=("credentials", "webauth"),
                     sources=("directaccess", "openapi"), values=(("par", "Personal"), ("pro", "Business")))
    return {
        TWO_SOURCE_BANK: connector(
            40, TWO_SOURCE_BANK, "Two Source Bank", "credentials",
            [source(401, 40, "directaccess", "credentials", 1), source(402, 40, "openapi", "webauth", 2),
             source(403, 40, "fallback", "credentials", 3, disabled="2024-01-01 00:00:00")],
            [login, password, website]),
        CREDENTIALS_BANK: connector(
            41, CREDENTIALS_BANK, "Credentials Bank", "credentials",
            [source(411, 41, "directaccess", "credentials", 1)], [login, password]),
        WEBAUTH_BANK: connector(42, WEBAUTH_BANK, "Webauth Bank", "webauth",
                                [source(421, 42, "openapi", "webauth", 1)], []),
        WEBAUTH_FIELDS_BANK: connector(
            43, WEBAUTH_FIELDS_BANK, "Webauth Region Bank", "webauth", [source(431, 43, "openapi", "webauth", 1)],
            [_field("region", "Region", "list", mechanisms=("webauth",),
                    values=(("north", "North"), ("south", "South")))]),
        RESTRICTED_BANK: connector(44, RESTRICTED_BANK, "Closed Bank", "credentials",
                                   [source(441, 44, "directaccess", "credentials", 1)], [login, password],
                                   restricted=True),
    }


# Accounts each source brings: (name, type, usage, balance, currency).
ACCOUNTS_BY_SOURCE: dict[str, list[tuple[str, str, str, str, str]]] = {
    "directaccess": [("Business current account", "checking", "ORGA", "1520.35", "EUR"),
                     ("Business card", "card", "ORGA", "-120.00", "EUR")],
    "openapi": [("Savings account", "savings", "PRIV", "8000.00", "EUR")],
}


# --- state ---------------------------------------------------------------------------------------------------------


@dataclass
class User:
    id: int
    temporary: bool
    created: datetime
    deleted: bool = False


@dataclass
class Token:
    value: str
    user_id: int
    permanent: bool
    revoked: bool = False


@dataclass
class Source:
    id: int
    name: str
    id_connector_source: int
    created: datetime
    state: str | None = None
    access_expire: datetime | None = None


@dataclass
class Connection:
    id: int
    user_id: int
    connector_uuid: str
    created: datetime
    sources: list[Source] = field(default_factory=list)
    state: str | None = None
    error_message: str | None = None
    fields: list[dict[str, Any]] | None = None
    last_update: datetime | None = None
    validating_left: int = 0
    resolved: bool = False  # actionNeeded fixed at the bank (see PowensEmulator.resolve)


@dataclass
class Account:
    id: int
    connection_id: int
    user_id: int
    source_id: int
    name: str
    type: str
    usage: str
    balance: Decimal
    currency: str
    number: str
    iban: str
    disabled: datetime | None
    deleted: datetime | None = None
    last_update: datetime | None = None


@dataclass
class Transaction:
    id: int
    account_id: int
    on: date  # the posting date ("date" in Powens's JSON)
    value: Decimal
    wording: str
    last_update: datetime
    coming: bool = False
    deleted: datetime | None = None
    vdate: date | None = None
    type: str = "card"
    counterparty: str | None = None


@dataclass
class Fault:
    kind: str  # "status" | "malformed" | "delay"
    path: str | None
    method: str | None
    status: int = 500
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    seconds: float = 0.0


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]


@dataclass
class WebauthSession:
    user_id: int
    connector_uuid: str
    connection_id: int | None
    source: str
    state: str | None
    redirect_uri: str


class PowensEmulator:
    """``async with PowensEmulator() as powens:`` then point ``providers.powens.base_url`` at ``powens.base_url``."""

    def __init__(self, *, client_id: str = CLIENT_ID, host: str = "127.0.0.1", port: int = 0) -> None:
        """``port=0`` picks a free port (tests); ``connector demo`` may fix one."""
        self.client_id = client_id
        self.client_secret = secrets.token_urlsafe(24)
        self.webhook_secret = secrets.token_urlsafe(32)
        self.otp = f"{secrets.randbelow(10**6):06d}"
        self.host = host
        self.connectors = default_connectors()
        # --- switches (§16) ---
        self.creation_status = 201  # OP-1: 200, 201 or 202
        self.wrongpass_spelling = "wrongpass"  # OP-2: or "wrongPass"
        self.token_response = "access_token"  # OP-4: or "token"
        self.code_only_exchange = False  # OP-4: refuse a temporary token as `code`, accept only /auth/token/code
        self.publickey_shape = "jwk"  # OP-3: or "jwks"
        self.publickey_without_kid = False
        self.foreign_next_link = False
        self.page_size = 1000  # cap on page length, below `limit`, to force paging in tests
        self.validating_polls = 1
        self.webauth_outcome: str | None = None  # state of a connection/source made by a webauth round trip
        self.webauth_error: tuple[str, str] | None = None  # force (error, error_description) on "Allow"
        self.allowed_redirect_uris: set[str] | None = None  # console whitelist; None accepts any
        self.rate_limit_per_minute: int | None = None
        self.webhook_url: str | None = None  # where background syncs POST their CONNECTION_SYNCED
        self.webhook_signed_path: str | None = None  # the registered URL's path, if a proxy changes it
        # --- state ---
        self._now = datetime.now(UTC).replace(microsecond=0)
        self.key = _new_key()
        self._old_keys: dict[str, RSAKey] = {}
        self._published_override: RSAKey | None = None
        self.users: dict[int, User] = {}
        self.tokens: dict[str, Token] = {}
        self.codes: dict[str, int] = {}
        self.connections: dict[int, Connection] = {}
        self.accounts: dict[int, Account] = {}
        self.transactions: dict[int, Transaction] = {}
        self.webauth_sessions: dict[str, WebauthSession] = {}
        self.calls: list[Call] = []
        self.activation_calls: list[list[int]] = []
        self.connection_posts = 0  # creations and updates that carried field values
        self.received_fields: list[dict[str, str]] = []  # decrypted values, for assertions only
        self.webhooks_sent: list[tuple[dict[str, str], bytes]] = []
        self._faults: list[Fault] = []
        self._hits: deque[float] = deque()
        self._ids = itertools.count(100)
        self._webhook_ids = itertools.count(900_000)
        self._runner: web.AppRunner | None = None
        self.port = port

    # --- life cycle --------------------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root + API

    def config(self, **extra: Any) -> dict[str, Any]:
        """A ``[providers.powens]`` table (without ``enabled``) pointing at this emulator."""
        return {"base_url": self.base_url, "client_id": self.client_id, "client_secret": self.client_secret,
                "webhook_secret": self.webhook_secret, **extra}

    async def start(self) -> PowensEmulator:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_post(API + "/auth/init", self._auth_init)
        r.add_get(API + "/auth/token/code", self._auth_code)
        r.add_post(API + "/auth/token/access", self._auth_access)
        r.add_post(API + "/auth/renew", self._auth_renew)
        r.add_delete(API + "/auth/token", self._auth_revoke)
        r.add_get(API + "/users/me", self._me)
        r.add_delete(API + "/users/me", self._delete_me)
        r.add_get(API + "/publickey", self._publickey)
        r.add_get(API + "/connectors", self._connectors)
        r.add_get(API + "/connectors/{uuid}", self._connector)
        r.add_get(API + "/connectors/{uuid}/sources", self._connector_sources)
        r.add_get(API + "/connectors/{uuid}/fields", self._connector_fields)
        r.add_get(API + "/users/me/connections", self._list_connections)
        r.add_post(API + "/users/me/connections", self._create_connection)
        r.add_get(API + "/users/me/connections/{cid}", self._get_connection)
        r.add_post(API + "/users/me/connections/{cid}", self._update_connection)
        r.add_put(API + "/users/me/connections/{cid}", self._force_sync)
        r.add_delete(API + "/users/me/connections/{cid}", self._delete_connection)
        r.add_get(API + "/users/me/connections/{cid}/sources", self._connection_sources)
        r.add_get(API + "/users/me/connections/{cid}/accounts", self._connection_accounts)
        r.add_put(API + "/users/me/connections/{cid}/accounts/{ids}", self._activate)
        r.add_get(API + "/users/me/accounts", self._user_accounts)
        r.add_get(API + "/users/me/accounts/{aid}", self._account)
        r.add_post(API + "/users/me/accounts/{aid}", self._update_account)
        r.add_get(API + "/users/me/accounts/{aid}/transactions", self._account_transactions)
        r.add_get(API + "/users/me/transactions", self._user_transactions)
        r.add_get(API + "/webauth-url", self._webauth_url)
        r.add_get(API + "/webauth", self._webauth_redirect)
        r.add_get("/bank/authorize", self._bank_page)
        r.add_post("/bank/decide", self._bank_decide)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> PowensEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- test controls -----------------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move the emulator's clock (temporary users expire after 30 minutes of it)."""
        self._now += timedelta(seconds=seconds)

    def fail_next(self, status: int, *, code: str | None = None, path: str | None = None,
                  method: str | None = None, times: int = 1, message: str | None = None,
                  retry_after: str | None = None) -> None:
        """The next ``times`` API calls matching ``path`` (a regex on the path after ``/2.0``) and ``method``
        answer ``status`` with an error body, without doing anything."""
        for _ in range(times):
            self._faults.append(Fault("status", path, method, status=status, code=code, message=message,
                                      retry_after=retry_after))

    def malformed_next(self, *, path: str | None = None, method: str | None = None) -> None:
        """The next matching call answers 200 with a body that is not JSON, without doing anything."""
        self._faults.append(Fault("malformed", path, method))

    def delay_next(self, seconds: float, *, path: str | None = None, method: str | None = None) -> None:
        """The next matching call is carried out, then its answer waits ``seconds`` (a slow bank check)."""
        self._faults.append(Fault("delay", path, method, seconds=seconds))

    def publish_mismatched_key(self, on: bool = True) -> None:
        """``/publickey`` serves a key with the right ``kid`` that does not match our private key."""
        self._published_override = _new_key(self.key.kid) if on else None

    def rotate_key(self) -> str:
        """A new key pair with a new ``kid``; values under the old ``kid`` are refused as unknown (§15)."""
        self.key = _new_key()
        return str(self.key.kid)

    def resolve(self, connection_id: int) -> None:
        """The person did what the bank asked (actionNeeded): the next sync clears the state."""
        self.connections[connection_id].resolved = True

    def set_state(self, connection_id: int, state: str | None, *, source: str | None = None,
                  error_message: str | None = None, fields: list[dict[str, Any]] | None = None) -> None:
        """Put a connection (and one of its sources) in ``state``, as a background sync would."""
        conn = self.connections[connection_id]
        target = next((s for s in conn.sources if s.name == source), conn.sources[0]) if conn.sources else None
        if target is not None:
            target.state = state
        conn.error_message = error_message
        if fields is None and state and state.casefold() in ("wrongpass",):
            fields = [_field("login", "Customer number", regex=LOGIN_REGEX), _field("password", "Password", "password")]
        conn.fields = fields
        self._recompute(conn)

    def add_transaction(self, account_id: int, value: str, wording: str, *, on: date | None = None,
                        coming: bool = False) -> int:
        tx = Transaction(next(self._ids), account_id, on or self._now.date(), Decimal(value), wording,
                         last_update=self._now, coming=coming)
        self.transactions[tx.id] = tx
        return tx.id

    def book(self, transaction_id: int) -> None:
        tx = self.transactions[transaction_id]
        tx.coming, tx.last_update = False, self._now

    def delete_transaction(self, transaction_id: int) -> None:
        tx = self.transactions[transaction_id]
        tx.deleted = tx.last_update = self._now

    def seed_transactions(self, account_id: int, count: int, *, start: date | None = None) -> list[int]:
        first = start or (self._now.date() - timedelta(days=count))
        return [self.add_transaction(account_id, f"-{i + 1}.25", f"CARD PAYMENT {i + 1}", on=first + timedelta(days=i))
                for i in range(count)]

    def connection_for(self, user_token: str) -> Connection | None:
        token = self.tokens.get(user_token)
        if token is None:
            return None
        return next((c for c in self.connections.values() if c.user_id == token.user_id), None)

    # --- webhooks ----------------------------------------------------------------------------------------------

    def payload(self, event: str, connection_id: int) -> dict[str, Any]:
        conn = self.connections[connection_id]
        if event == "ACCOUNT_SYNCED":
            account = next(a for a in self.accounts.values() if a.connection_id == connection_id and not a.disabled)
            return {**self._account_json(account),
                    "transactions": [self._tx_json(t) for t in self.transactions.values()
                                     if t.account_id == account.id]}
        body = {"user": {"id": conn.user_id}, "connection": self._connection_json(conn, {"sources"})}
        if event == "CONNECTION_SYNCED":
            body["connection"]["accounts"] = [
                {**self._account_json(a),
                 "transactions": [self._tx_json(t) for t in self.transactions.values() if t.account_id == a.id]}
                for a in self.accounts.values() if a.connection_id == connection_id and not a.disabled]
            body["connection"]["connector"] = {"uuid": conn.connector_uuid}
        return body

    def sign(self, path: str, body: bytes, *, date_header: str | None = None, secret: str | None = None,
             method: str = "POST") -> dict[str, str]:
        signing_date = date_header or self._now.strftime("%Y-%m-%dT%H:%M:%SZ")
        message = f"{method.upper()}.{path}.{signing_date}.".encode() + body
        digest = hmac.new((secret or self.webhook_secret).encode(), message, hashlib.sha256).digest()
        return {"BI-Signature": base64.b64encode(digest).decode(), "BI-Signature-Date": signing_date,
                "Content-Type": "application/json"}

    def build_webhook(self, event: str, connection_id: int, *, path: str, id_webhook_data: int | None = None,
                      date_header: str | None = None, gzip: bool = False) -> tuple[dict[str, str], bytes]:
        """Headers and raw body of one signed delivery of ``event`` for a connection, over ``path`` (§9.3).
        With ``gzip`` the body is compressed and the signature covers the uncompressed text (§16 OP-9)."""
        payload = {"id_webhook_data": id_webhook_data or next(self._webhook_ids), **self.payload(event, connection_id)}
        body = dumps(payload)
        headers = self.sign(path, body, date_header=date_header)
        if gzip:
            headers["Content-Encoding"] = "gzip"
            body = gzip_module.compress(body)
        return headers, body

    async def deliver(self, url: str, headers: Mapping[str, str], body: bytes) -> int:
        """POST one delivery; a retry is the same call again (same date, same id)."""
        self.webhooks_sent.append((dict(headers), body))
        async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=dict(headers)) as resp:
            await resp.read()
            return resp.status

    async def send_webhook(self, event: str, connection_id: int, *, url: str | None = None, **kwargs: Any) -> int:
        target = url or self.webhook_url
        if not target:
            raise RuntimeError("no webhook URL")
        path = self.webhook_signed_path or urlsplit(target).path
        headers, body = self.build_webhook(event, connection_id, path=path, **kwargs)
        return await self.deliver(target, headers, body)

    async def background_sync(self, connection_id: int, *, state: str | None = None, source: str | None = None,
                              new_transactions: int = 0, error_message: str | None = None) -> int | None:
        """One of Powens's scheduled syncs (§8.3): the connection lands in ``state`` (null: fine), enabled accounts
        may get new booked transactions, and a signed CONNECTION_SYNCED goes to ``webhook_url`` when set.
        Returns the delivery's HTTP status, or ``None`` when no webhook URL is set."""
        self.set_state(connection_id, state, source=source, error_message=error_message)
        if state is None:
            for account in [a for a in self.accounts.values()
                            if a.connection_id == connection_id and a.disabled is None]:
                for i in range(new_transactions):
                    self.add_transaction(account.id, f"-{i + 3}.10", f"CB SHOP {i + 1}")
        if self.webhook_url is None:
            return None
        return await self.send_webhook("CONNECTION_SYNCED", connection_id)

    # --- plumbing ----------------------------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith(API + "/"):
            return cast(web.StreamResponse, await handler(request))
        rel = request.path[len(API):]
        self.calls.append(Call(request.method, rel, dict(request.query)))
        if self.rate_limit_per_minute is not None:
            now = time.monotonic()
            while self._hits and now - self._hits[0] >= 60:
                self._hits.popleft()
            if len(self._hits) >= self.rate_limit_per_minute:
                limited = ApiError(429, "tooManyRequests", "rate limit", headers={"Retry-After": "1"})
                return self._error_response(limited)
            self._hits.append(now)
        fault = self._take_fault(request.method, rel)
        if fault is not None and fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            code = fault.code or {409: "conflict", 429: "tooManyRequests", 503: "maintenance"}.get(fault.status, "bug")
            return self._error_response(ApiError(fault.status, code, "injected fault", fault.message, headers))
        if fault is not None and fault.kind == "malformed":
            return web.Response(status=200, text="<html>Service temporarily unavailable",
                                content_type="application/json")
        try:
            response = cast(web.StreamResponse, await handler(request))
        except ApiError as exc:
            response = self._error_response(exc)
        if fault is not None and fault.kind == "delay":
            await asyncio.sleep(fault.seconds)
        return response

    def _take_fault(self, method: str, rel: str) -> Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.method and fault.method.upper() != method:
                continue
            if fault.path and not re.search(fault.path, rel):
                continue
            return self._faults.pop(i)
        return None

    def _error_response(self, exc: ApiError) -> web.Response:
        body: dict[str, Any] = {"code": exc.code, "description": exc.description,
                                "request_id": secrets.randbelow(10**9)}
        if exc.message:
            body["message"] = exc.message
        return web.json_response(body, status=exc.status, headers=exc.headers)

    def _json(self, data: Any, status: int = 200) -> web.Response:
        return web.Response(status=status, text=json.dumps(data, default=_json_default),
                            content_type="application/json")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise ApiError(400, "invalidValue", "body is not JSON") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalidValue", "body is not an object")
        return data

    def _user(self, request: web.Request) -> User:
        header = request.headers.get("Authorization", "")
        value = header[7:] if header.startswith("Bearer ") else ""
        token = self.tokens.get(value)
        if token is None or token.revoked:
            raise ApiError(401, "invalidToken", "unknown or revoked token")
        user = self.users.get(token.user_id)
        if user is None or user.deleted:
            raise ApiError(401, "invalidToken", "user deleted")
        if user.temporary and (self._now - user.created).total_seconds() > TEMP_USER_SECONDS:
            self._delete_user(user)  # Powens deletes a temporary user after 30 minutes (§1.2)
            raise ApiError(401, "invalidToken", "temporary user expired")
        return user

    def _new_token(self, user_id: int, permanent: bool) -> str:
        value = secrets.token_urlsafe(32)
        self.tokens[value] = Token(value, user_id, permanent)
        return value

    def _delete_user(self, user: User) -> None:
        user.deleted = True
        for token in self.tokens.values():
            if token.user_id == user.id:
                token.revoked = True
        for conn in [c for c in self.connections.values() if c.user_id == user.id]:
            self._drop_connection(conn)

    def _drop_connection(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        for account in [a for a in self.accounts.values() if a.connection_id == conn.id]:
            self.accounts.pop(account.id, None)
            for tx in [t for t in self.transactions.values() if t.account_id == account.id]:
                self.transactions.pop(tx.id, None)

    def _check_client(self, body: Mapping[str, Any]) -> None:
        if str(body.get("client_id")) != self.client_id or body.get("client_secret") != self.client_secret:
            raise ApiError(401, "invalidClient", "client credentials refused")

    # --- auth and users ----------------------------------------------------------------------------------------

    async def _auth_init(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        permanent = "client_id" in body or "client_secret" in body
        if permanent:
            self._check_client(body)
        user = User(next(self._ids), temporary=not permanent, created=self._now)
        self.users[user.id] = user
        return self._json({"auth_token": self._new_token(user.id, permanent),
                           "type": "permanent" if permanent else "temporary", "id_user": user.id,
                           "expires_in": None if permanent else TEMP_USER_SECONDS})

    async def _auth_code(self, request: web.Request) -> web.Response:
        user = self._user(request)
        code = secrets.token_urlsafe(24)
        self.codes[code] = user.id
        single = request.query.get("type") == "singleAccess"
        return self._json({"code": code, "type": "temporary", "access": "single" if single else "standard",
                           "expires_in": 1800})

    async def _auth_access(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._check_client(body)
        if body.get("grant_type", "authorization_code") != "authorization_code":
            raise ApiError(400, "invalidValue", "grant_type")
        code = str(body.get("code") or "")
        user_id = self.codes.pop(code, None)
        if user_id is None and not self.code_only_exchange:
            token = self.tokens.get(code)
            if token is not None and not token.revoked and not token.permanent:
                user_id = token.user_id
                token.revoked = True  # the temporary token is spent once exchanged
        user = self.users.get(user_id) if user_id is not None else None
        if user is None or user.deleted:
            raise ApiError(400, "invalidValue", "unknown code")
        user.temporary = False
        value = self._new_token(user.id, True)
        if self.token_response == "token":
            return self._json({"token": value})
        return self._json({"access_token": value, "token_type": "Bearer"})

    async def _auth_renew(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        self._check_client(body)
        user = self.users.get(int(body.get("id_user") or 0))
        if user is None or user.deleted or user.temporary:
            raise ApiError(404, "userNotFound", "no such user")
        if body.get("revoke_previous"):
            for token in self.tokens.values():
                if token.user_id == user.id:
                    token.revoked = True
        return self._json({"access_token": self._new_token(user.id, True), "token_type": "Bearer"})

    async def _auth_revoke(self, request: web.Request) -> web.Response:
        self._user(request)
        self.tokens[request.headers["Authorization"][7:]].revoked = True
        return web.Response(status=204)

    async def _me(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return self._json({"id": user.id, "signin": fmt(user.created), "platform": "emulator"})

    async def _delete_me(self, request: web.Request) -> web.Response:
        self._delete_user(self._user(request))
        return web.Response(status=204)

    # --- keys and encryption -----------------------------------------------------------------------------------

    async def _publickey(self, request: web.Request) -> web.Response:
        key = self._published_override or self.key
        jwk = key.as_dict(private=False)
        if self.publickey_without_kid:
            jwk.pop("kid", None)
        if self.publickey_shape == "jwks":
            return self._json({"keys": [{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "kid": "sig"}, jwk]})
        return self._json(jwk)

    def _decrypt(self, name: str, value: Any) -> str:
        if not isinstance(value, str) or value.count(".") != 4:
            raise ApiError(400, "invalidValue", f"{name}: not a compact JWE")
        try:
            header = json.loads(base64.urlsafe_b64decode(value.split(".")[0] + "=="))
        except ValueError:
            raise ApiError(400, "invalidValue", f"{name}: unreadable header") from None
        if header.get("alg") != "RSA-OAEP-256" or header.get("enc") != "A256GCM":
            raise ApiError(400, "invalidValue", f"{name}: wrong alg or enc")
        kid = header.get("kid")
        if not kid:
            raise ApiError(400, "invalidValue", f"{name}: no kid")
        if kid != self.key.kid:
            raise ApiError(400, "invalidValue", f"{name}: unknown kid")
        try:
            plaintext = jwe.decrypt_compact(value, self.key, registry=JWE_REGISTRY).plaintext
            return (plaintext or b"").decode("utf-8")
        except (JoseError, ValueError):
            raise ApiError(400, "keymanager", f"{name}: cannot decrypt") from None

    def _decrypt_all(self, values: Mapping[str, Any], skip: frozenset[str]) -> dict[str, str]:
        clear = {name: self._decrypt(name, value) for name, value in values.items() if name not in skip}
        self.received_fields.append(clear)
        return clear

    # --- connectors --------------------------------------------------------------------------------------------

    def _connector_json(self, connector: Mapping[str, Any], expand: set[str]) -> dict[str, Any]:
        out = {k: v for k, v in connector.items() if k not in ("sources", "fields")}
        for key in ("sources", "fields"):
            if key in expand:
                out[key] = connector[key]
        return out

    def _find_connector(self, key: str) -> dict[str, Any]:
        for connector in self.connectors.values():
            if connector["uuid"] == key or str(connector["id"]) == key:
                return connector
        raise ApiError(404, "notFound", "no such connector")

    async def _connectors(self, request: web.Request) -> web.Response:
        expand = _expand(request)
        return self._json({"connectors": [self._connector_json(c, expand) for c in self.connectors.values()]})

    async def _connector(self, request: web.Request) -> web.Response:
        return self._json(self._connector_json(self._find_connector(request.match_info["uuid"]), _expand(request)))

    async def _connector_sources(self, request: web.Request) -> web.Response:
        return self._json({"sources": self._find_connector(request.match_info["uuid"])["sources"]})

    async def _connector_fields(self, request: web.Request) -> web.Response:
        return self._json({"fields": self._find_connector(request.match_info["uuid"])["fields"]})

    def _fields_for(self, connector: Mapping[str, Any], source: str, mechanism: str,
                    added: Iterable[str]) -> list[dict[str, Any]]:
        added = set(added)
        out = []
        for f in connector["fields"]:
            if f["auth_mechanisms"] and mechanism not in f["auth_mechanisms"]:
                continue
            if f["connector_sources"] and source not in f["connector_sources"]:
                continue
            if added and (not f["connector_sources"] or set(f["connector_sources"]) & added):
                continue
            out.append(f)
        return out

    def _check_values(self, fields: Iterable[Mapping[str, Any]], values: Mapping[str, str]) -> None:
        for f in fields:
            value = values.get(f["name"], "")
            if not value:
                if f["required"]:
                    raise ApiError(400, "missingParameter", f"{f['name']} is required")
                continue
            if f.get("regex") and not re.fullmatch(f["regex"], value):
                raise ApiError(400, "invalidValue", f"{f['name']} does not match")
            if f["type"] == "list" and value not in {v["value"] for v in f["values"]}:
                raise ApiError(400, "invalidValue", f"{f['name']} is not a choice")

    def _source_of(self, connector: Mapping[str, Any], name: str) -> dict[str, Any]:
        source = next((s for s in connector["sources"] if s["name"] == name), None)
        if source is None or source["disabled"]:
            raise ApiError(400, "invalidValue", "unknown or disabled source")
        return dict(source)

    # --- connections -------------------------------------------------------------------------------------------

    def _recompute(self, conn: Connection) -> None:
        conn.state = next((s.state for s in conn.sources if s.state), None)
        if conn.state is None:
            conn.error_message, conn.fields = None, None
        conn.last_update = self._now

    def _connection_json(self, conn: Connection, expand: set[str]) -> dict[str, Any]:
        connector = self.connectors[conn.connector_uuid]
        out: dict[str, Any] = {
            "id": conn.id, "id_user": conn.user_id, "id_connector": connector["id"],
            "connector_uuid": conn.connector_uuid, "state": conn.state, "error": conn.state,
            "error_message": conn.error_message, "fields": conn.fields, "active": True, "created": fmt(conn.created),
            "last_update": fmt(conn.last_update), "last_push": None, "next_try": None,
            "expire": None,
        }
        if "sources" in expand:
            out["sources"] = [{"id": s.id, "id_connection": conn.id, "id_connector_source": s.id_connector_source,
                               "name": s.name, "state": s.state, "disabled": None, "created": fmt(s.created),
                               "last_update": fmt(conn.last_update), "next_try": None,
                               "access_expire": fmt(s.access_expire), "expire": None} for s in conn.sources]
        mine = [a for a in self.accounts.values() if a.connection_id == conn.id and not a.deleted]
        if "accounts" in expand:
            out["accounts"] = [self._account_json(a) for a in mine if not a.disabled]
        if "all_accounts" in expand:
            out["all_accounts"] = [self._account_json(a) for a in mine]
        return out

    def _connection(self, request: web.Request, user: User) -> Connection:
        try:
            conn = self.connections[int(request.match_info["cid"])]
        except (KeyError, ValueError):
            raise ApiError(404, "notFound", "no such connection") from None
        if conn.user_id != user.id:
            raise ApiError(404, "notFound", "no such connection")
        return conn

    def _apply_outcome(self, conn: Connection, source: Source, outcome: str | None) -> None:
        """Put a new source in the state its script asks for, or sync it."""
        source.state = outcome
        if outcome == "additionalInformationNeeded":
            conn.fields = [{**_field("otp", "Code received by text message", regex=r"^\d{6}$"), "ephemeral": True}]
            conn.error_message = "Enter the 6-digit code we sent to your phone ending in 42."
        elif outcome == "passwordExpired":
            conn.fields = [_field("new_password", "New password", "password")]
            conn.error_message = "Your password has expired."
        elif outcome == "actionNeeded":
            conn.error_message = "Please accept the new terms and conditions in your banking app."
        elif outcome is not None:
            conn.error_message = f"Emulated state {outcome}."
        if outcome is None:
            self._sync_source(conn, source)
        self._recompute(conn)

    def _sync_source(self, conn: Connection, source: Source) -> None:
        source.state = None
        source.access_expire = self._now + timedelta(days=180)
        if any(a.source_id == source.id for a in self.accounts.values()):
            return
        kinds = ACCOUNTS_BY_SOURCE.get(source.name, ACCOUNTS_BY_SOURCE["directaccess"])
        for name, kind, usage, balance, currency in kinds:
            aid = next(self._ids)
            digits = f"{secrets.randbelow(10**10):010d}"
            self.accounts[aid] = Account(
                aid, conn.id, conn.user_id, source.id, name, kind, usage, Decimal(balance), currency,
                number=f"XXXXXX{digits[-4:]}", iban=f"FR7630001007941234567890{aid % 1000:03d}",
                disabled=self._now, last_update=self._now)

    def _script(self, values: Mapping[str, str]) -> str | None:
        login = values.get("login", "").casefold()
        return "wrongpass" if login == "wrongpass" else SCRIPTS.get(login)

    async def _list_connections(self, request: web.Request) -> web.Response:
        user = self._user(request)
        expand = _expand(request)
        return self._json({"connections": [self._connection_json(c, expand) for c in self.connections.values()
                                           if c.user_id == user.id]})

    async def _create_connection(self, request: web.Request) -> web.Response:
        user = self._user(request)
        body = await self._body(request)
        connector = self._find_connector(str(body.get("connector_uuid") or body.get("id_connector") or ""))
        name = request.query.get("source") or body.get("source")
        if not name:
            raise ApiError(400, "missingParameter", "source")
        spec = self._source_of(connector, name)
        if spec["auth_mechanism"] != "credentials":
            raise ApiError(400, "invalidValue", "this source is webauth")
        self.connection_posts += 1
        values = self._decrypt_all(body, CLEAR_KEYS)
        self._check_values(self._fields_for(connector, name, "credentials", ()), values)
        outcome = self._script(values)
        if outcome == "wrongpass":
            # Created with invalid credentials, deleted at once (§3.2): nothing is kept.
            raise ApiError(400, self.wrongpass_spelling, "wrong credentials", "Identifiant ou mot de passe incorrect")
        conn = Connection(next(self._ids), user.id, connector["uuid"], created=self._now)
        self.connections[conn.id] = conn
        source = Source(next(self._ids), name, spec["id"], created=self._now)
        conn.sources.append(source)
        self._apply_outcome(conn, source, outcome)
        return self._json(self._connection_json(conn, _expand(request) | {"sources"}), status=self.creation_status)

    async def _get_connection(self, request: web.Request) -> web.Response:
        conn = self._connection(request, self._user(request))
        if conn.state == "validating":
            conn.validating_left -= 1
            if conn.validating_left <= 0:
                for source in conn.sources:
                    if source.state == "validating":
                        self._sync_source(conn, source)
                self._recompute(conn)
        return self._json(self._connection_json(conn, _expand(request)))

    async def _update_connection(self, request: web.Request) -> web.Response:
        user = self._user(request)
        conn = self._connection(request, user)
        body = await self._body(request)
        connector = self.connectors[conn.connector_uuid]
        name = request.query.get("source") or body.get("source")
        background = request.query.get("background", "").casefold() in ("1", "true")
        field_values = {k: v for k, v in body.items() if k not in CLEAR_KEYS}
        if name and name not in {s.name for s in conn.sources}:
            spec = self._source_of(connector, name)
            if spec["auth_mechanism"] != "credentials":
                raise ApiError(400, "invalidValue", "this source is webauth")
            self.connection_posts += 1
            values = self._decrypt_all(body, CLEAR_KEYS)
            added = [s.name for s in conn.sources]
            self._check_values(self._fields_for(connector, name, "credentials", added), values)
            outcome = self._script(values) if "login" in values else None
            if outcome == "wrongpass":
                # Only the new source is dropped; the connection stays (§16 OP-10).
                raise ApiError(400, self.wrongpass_spelling, "wrong credentials")
            source = Source(next(self._ids), name, spec["id"], created=self._now)
            conn.sources.append(source)
            self._apply_outcome(conn, source, outcome)
        elif body.get("resume"):
            if conn.state == "decoupled":
                for source in conn.sources:
                    if source.state == "decoupled":
                        source.state = "validating"
                conn.validating_left = self.validating_polls
                if not background:
                    for source in conn.sources:
                        if source.state == "validating":
                            self._sync_source(conn, source)
                self._recompute(conn)
        elif field_values:
            self.connection_posts += 1
            values = self._decrypt_all(body, CLEAR_KEYS)
            state = (conn.state or "").casefold()
            if state == "additionalinformationneeded":
                if values.get("otp") != self.otp:
                    raise ApiError(400, self.wrongpass_spelling, "wrong code", "Code incorrect")
            elif state in ("wrongpass", "passwordexpired"):
                if "wrongpass" in values.values():
                    raise ApiError(400, self.wrongpass_spelling, "wrong credentials")
            for source in conn.sources:
                if source.state:
                    self._sync_source(conn, source)
            self._recompute(conn)
        else:
            # {}: a person-present sync (§3.4). Clears SCARequired on credentials sources, and actionNeeded once
            # the person fixed it at the bank.
            for source in conn.sources:
                if source.state == "SCARequired" or (source.state == "actionNeeded" and conn.resolved):
                    self._sync_source(conn, source)
            self._recompute(conn)
        return self._json(self._connection_json(conn, _expand(request) | {"sources"}))

    async def _force_sync(self, request: web.Request) -> web.Response:
        self._connection(request, self._user(request))
        raise ApiError(409, "tooManySync", "Can't force synchronization")  # §16 OP-6

    async def _delete_connection(self, request: web.Request) -> web.Response:
        self._drop_connection(self._connection(request, self._user(request)))
        return web.Response(status=204)

    async def _connection_sources(self, request: web.Request) -> web.Response:
        conn = self._connection(request, self._user(request))
        return self._json({"sources": self._connection_json(conn, {"sources"})["sources"]})

    # --- accounts ----------------------------------------------------------------------------------------------

    def _account_json(self, a: Account) -> dict[str, Any]:
        enabled = a.disabled is None
        return {"id": a.id, "id_connection": a.connection_id, "id_user": a.user_id, "id_source": a.source_id,
                "id_parent": None, "name": a.name, "original_name": a.name, "number": a.number,
                "iban": a.iban if enabled else None,  # §16 OP-11: the IBAN comes only after activation
                "balance": a.balance if enabled else None, "coming": Decimal("-42.00") if enabled else None,
                "currency": {"id": a.currency, "symbol": "€", "precision": 2}, "type": a.type, "usage": a.usage,
                "display": True, "bookmarked": False, "disabled": fmt(a.disabled), "deleted": fmt(a.deleted),
                "last_update": fmt(a.last_update), "error": None}

    def _accounts_of(self, user: User, request: web.Request, connection_id: int | None = None) -> list[Account]:
        everything = "all" in request.query
        return [a for a in self.accounts.values()
                if a.user_id == user.id and (connection_id is None or a.connection_id == connection_id)
                and (everything or (a.disabled is None and a.deleted is None))]

    async def _connection_accounts(self, request: web.Request) -> web.Response:
        user = self._user(request)
        conn = self._connection(request, user)
        accounts = self._accounts_of(user, request, conn.id)
        return self._json({"accounts": [self._account_json(a) for a in accounts],
                           "balances": {}, "coming_balances": {}})

    async def _user_accounts(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return self._json({"accounts": [self._account_json(a) for a in self._accounts_of(user, request)]})

    def _account_of(self, request: web.Request, user: User) -> Account:
        try:
            account = self.accounts[int(request.match_info["aid"])]
        except (KeyError, ValueError):
            raise ApiError(404, "notFound", "no such account") from None
        if account.user_id != user.id or (account.disabled and "all" not in request.query):
            raise ApiError(404, "notFound", "no such account")
        return account

    async def _account(self, request: web.Request) -> web.Response:
        return self._json(self._account_json(self._account_of(request, self._user(request))))

    def _enable(self, account: Account) -> None:
        if account.disabled is None:
            return
        account.disabled = None
        account.last_update = self._now
        if not any(t.account_id == account.id for t in self.transactions.values()):
            today = self._now.date()
            for days, value, wording, coming in ((12, "2500.00", "VIR SEPA ACME SALARY", False),
                                                 (5, "-45.90", "CB SUPERMARKET 05/01", False),
                                                 (2, "-12.50", "CB CAFE DE LA GARE", False),
                                                 (0, "-60.00", "CB PENDING FUEL", True)):
                tx = Transaction(next(self._ids), account.id, today - timedelta(days=days), Decimal(value), wording,
                                 last_update=self._now, coming=coming, vdate=today - timedelta(days=days))
                self.transactions[tx.id] = tx

    async def _update_account(self, request: web.Request) -> web.Response:
        user = self._user(request)
        account = self._account_of(request, user)
        body = await self._body(request)
        if body.get("disabled") is False:
            self._enable(account)
        elif body.get("disabled") is True:
            account.disabled = self._now  # disabling deletes the account's data (§7.1)
            for tx in [t for t in self.transactions.values() if t.account_id == account.id]:
                self.transactions.pop(tx.id, None)
        return self._json(self._account_json(account))

    async def _activate(self, request: web.Request) -> web.Response:
        user = self._user(request)
        conn = self._connection(request, user)
        body = await self._body(request)
        try:
            ids = [int(i) for i in request.match_info["ids"].split(",")]
        except ValueError:
            raise ApiError(400, "invalidValue", "account ids") from None
        targets = [self.accounts.get(i) for i in ids]
        if any(a is None or a.connection_id != conn.id for a in targets):
            raise ApiError(404, "notFound", "no such account")
        if body.get("disabled") is not False:
            raise ApiError(400, "invalidValue", "only activation is emulated here")
        self.activation_calls.append(ids)
        for account in targets:
            assert account is not None
            self._enable(account)
        return self._json({"accounts": [self._account_json(a) for a in targets if a is not None]})

    # --- transactions ------------------------------------------------------------------------------------------

    def _tx_json(self, t: Transaction) -> dict[str, Any]:
        return {"id": t.id, "id_account": t.account_id, "date": t.on.isoformat(), "rdate": t.on.isoformat(),
                "vdate": t.vdate.isoformat() if t.vdate else None, "datetime": None, "value": t.value,
                "gross_value": t.value, "original_wording": t.wording, "simplified_wording": t.wording.title(),
                "wording": t.wording.title(), "coming": t.coming, "deleted": fmt(t.deleted), "active": True,
                "last_update": fmt(t.last_update), "type": t.type, "original_value": None,
                "original_currency": None,
                "counterparty": {"label": t.counterparty} if t.counterparty else None}

    async def _account_transactions(self, request: web.Request) -> web.Response:
        user = self._user(request)
        account = self._account_of(request, user)
        return self._transactions(request, [account.id])

    async def _user_transactions(self, request: web.Request) -> web.Response:
        user = self._user(request)
        ids = [a.id for a in self.accounts.values() if a.user_id == user.id and a.disabled is None]
        if not ids:
            raise ApiError(409, "noAccount", "no activated account")
        return self._transactions(request, ids)

    def _transactions(self, request: web.Request, account_ids: list[int]) -> web.Response:
        q = request.query
        try:
            limit = int(q["limit"])
        except (KeyError, ValueError):
            raise ApiError(400, "missingParameter", "limit is required") from None
        if not 1 <= limit <= 1000:
            raise ApiError(400, "invalidValue", "limit must be 1..1000")
        rows = [t for t in self.transactions.values() if t.account_id in account_ids]
        if "deleted" in q:
            wanted = q["deleted"].casefold() in ("1", "true")
            rows = [t for t in rows if (t.deleted is not None) == wanted]
        elif "all" not in q:
            rows = [t for t in rows if t.deleted is None]
        try:
            if "last_update" in q:
                mark = parse_dt(q["last_update"])
                rows = [t for t in rows if t.last_update > mark]
            if "min_date" in q:
                rows = [t for t in rows if t.on >= date.fromisoformat(q["min_date"])]
            if "max_date" in q:
                rows = [t for t in rows if t.on <= date.fromisoformat(q["max_date"])]
            offset = int(base64.urlsafe_b64decode(q["cursor"]).decode()) if "cursor" in q else 0
        except ValueError:
            raise ApiError(400, "invalidValue", "bad date, datetime or cursor") from None
        rows.sort(key=lambda t: t.id)
        size = min(limit, self.page_size)
        page = rows[offset:offset + size]
        next_link = None
        if offset + size < len(rows):
            params = {k: v for k, v in q.items() if k != "cursor"}
            params["cursor"] = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
            origin = "http://evil.invalid:81" if self.foreign_next_link else self.root
            next_link = {"href": f"{origin}{request.path}?{urlencode(params)}"}
        dates = [t.on for t in page]
        return self._json({
            "transactions": [self._tx_json(t) for t in page],
            "first_date": min(dates).isoformat() if dates else None,
            "last_date": max(dates).isoformat() if dates else None,
            "_links": {"self": {"href": str(request.url)}, "prev": None, "next": next_link},
        })

    # --- webauth -----------------------------------------------------------------------------------------------

    async def _webauth_url(self, request: web.Request) -> web.Response:
        user = self._user(request)
        return self._json({"url": self._open_webauth(request, user)})

    async def _webauth_redirect(self, request: web.Request) -> web.StreamResponse:
        """The ``/webauth`` redirect service: a browser URL carrying a temporary code (not used by the plugin)."""
        user_id = self.codes.pop(request.query.get("token", ""), None)
        user = self.users.get(user_id) if user_id is not None else None
        if user is None:
            raise ApiError(401, "invalidToken", "unknown code")
        raise web.HTTPTemporaryRedirect(self._open_webauth(request, user))

    def _open_webauth(self, request: web.Request, user: User) -> str:
        q = request.query
        if q.get("client_id") != self.client_id:
            raise ApiError(400, "invalidValue", "client_id")
        redirect_uri = q.get("redirect_uri", "")
        if not redirect_uri or "?" in redirect_uri:
            raise ApiError(400, "invalidValue", "redirect_uri must have no query string")
        if self.allowed_redirect_uris is not None and redirect_uri not in self.allowed_redirect_uris:
            raise ApiError(400, "invalidValue", "redirect_uri is not whitelisted")
        conn: Connection | None = None
        if "id_connection" in q:
            conn = self.connections.get(int(q["id_connection"])) if q["id_connection"].isdigit() else None
            if conn is None or conn.user_id != user.id:
                raise ApiError(404, "notFound", "no such connection")
            connector = self.connectors[conn.connector_uuid]
        else:
            connector = self._find_connector(q.get("connector_uuid") or q.get("id_connector") or "")
        source_name = q.get("source") or next(s["name"] for s in connector["sources"] if not s["disabled"])
        spec = self._source_of(connector, source_name)
        existing = {s.name for s in conn.sources} if conn else set()
        if conn is not None and source_name in existing and not any(s.state for s in conn.sources):
            raise ApiError(409, "invalidValue", "connection already up to date")
        if source_name not in existing and spec["auth_mechanism"] != "webauth":
            raise ApiError(400, "invalidValue", "this source is not webauth")
        if source_name not in existing:
            # §16 OP-8: webauth field values arrive as extra query parameters, each a JWE.
            values = self._decrypt_all({k: v for k, v in q.items() if k not in WEBAUTH_KEYS}, frozenset())
            self._check_values(self._fields_for(connector, source_name, "webauth", existing), values)
        sid = secrets.token_urlsafe(16)
        self.webauth_sessions[sid] = WebauthSession(user.id, connector["uuid"], conn.id if conn else None,
                                                    source_name, q.get("state"), redirect_uri)
        return f"{self.root}/bank/authorize?{urlencode({'session': sid})}"

    async def _bank_page(self, request: web.Request) -> web.Response:
        sid = request.query.get("session", "")
        if sid not in self.webauth_sessions:
            return web.Response(status=404, text="Unknown session")
        name = html.escape(self.connectors[self.webauth_sessions[sid].connector_uuid]["name"])
        page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{name}</title></head>
<body><main><h1>{name}</h1><p>Allow Sage to read your accounts?</p>
<form method="post" action="/bank/decide"><input type="hidden" name="session" value="{html.escape(sid)}">
<button type="submit" name="decision" value="allow">Allow</button>
<button type="submit" name="decision" value="deny">Deny</button></form></main></body></html>"""
        return web.Response(text=page, content_type="text/html")

    async def _bank_decide(self, request: web.Request) -> web.Response:
        form = await request.post()
        session = self.webauth_sessions.pop(str(form.get("session", "")), None)
        if session is None:
            return web.Response(status=404, text="Unknown session")
        params: dict[str, str] = {}
        if form.get("decision") != "allow":
            params.update(error="access_denied", error_description="The user refused access.")
        elif self.webauth_error is not None:
            params.update(error=self.webauth_error[0], error_description=self.webauth_error[1])
        else:
            params["id_connection"] = str(self._webauth_done(session))
        if session.state is not None:
            params["state"] = session.state  # §16 OP-7: always returned when given
        raise web.HTTPFound(f"{session.redirect_uri}?{urlencode(params)}")

    def _webauth_done(self, session: WebauthSession) -> int:
        connector = self.connectors[session.connector_uuid]
        spec = self._source_of(connector, session.source)
        if session.connection_id is None:
            conn = Connection(next(self._ids), session.user_id, connector["uuid"], created=self._now)
            self.connections[conn.id] = conn
        else:
            conn = self.connections[session.connection_id]
        source = next((s for s in conn.sources if s.name == session.source), None)
        if source is None:
            source = Source(next(self._ids), session.source, spec["id"], created=self._now)
            conn.sources.append(source)
            self._apply_outcome(conn, source, self.webauth_outcome)
        else:
            for each in conn.sources:
                if each.state in ("SCARequired", "webauthRequired"):
                    self._sync_source(conn, each)
            self._recompute(conn)
        return conn.id


def dumps(data: Any) -> bytes:
    """JSON as the emulator sends it (money as JSON numbers)."""
    return json.dumps(data, default=_json_default).encode()


def _expand(request: web.Request) -> set[str]:
    return {part.strip() for part in request.query.get("expand", "").split(",") if part.strip()}


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value)  # Powens sends JSON numbers; the plugin reads them back as Decimal
    raise TypeError(type(value).__name__)
