"""A Sage stand-in for tests and the demo: Sage ID (token endpoint, JWKS) and the Provider API under ``/v1``.

It is a real aiohttp server on 127.0.0.1 and checks what Sage is documented to check, plus the rules our spec
derives from Sage's (spec 3.4–3.7), so a connector that passes against it sends what Sage expects:

- ``POST /oauth/token``: form-encoded client credentials and audience; answers an opaque random ``access_token``;
- ``GET /.well-known/jwks.json``: the keys of :attr:`SageEmulator.identity` (issuer: the base URL + ``/``);
- every ``/v1`` call needs the ``x-api-key`` and a bearer token this emulator issued, not expired or revoked;
- ``PATCH /v1/authorisations/{id}``, ``POST /v1/statements``, ``GET /v1/statements/{id}``, ``POST /v1/banks``;
- more than ``rate`` ``/v1`` requests within any one second get 429 with ``Retry-After``.

Decisions where Sage is silent (spec 7.19–7.23), so tests can rely on them:

- errors are ``{"error": code, "message": text}`` with a 4xx;
- a statement whose bytes are identical to one already accepted gets that statement's ``_id`` again (200 instead of
  201): that is the "safe resend after an uncertain delivery" of spec 3.5.7. Any other statement repeating a
  ``uniqueId`` gets 400 ``duplicate_unique_id``. A statement that ends ``failed`` releases its ``uniqueId``s, so
  the identical batch can be resent (spec 3.6);
- a statement is ``processing`` for ``processing_polls`` GETs, then ``complete`` (or ``failed`` when a failure was
  injected); while it is processing, another POST for the same account gets 409 ``statement_in_flight``;
- ``POST /v1/banks`` answers ``{"data": {"created": [...], "updated": [...]}}``, each bank with its ``principalId``;
- the PATCH answers ``patch_status`` (default 204) and accepts the same authorisation id more than once, because a
  PATCH whose answer was lost is resent.

Every secret (client secret, API key, tokens) is random per instance and never recorded: recorded headers show
``<redacted>`` in their place.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web

from connector.testing.sage_id import SANDBOX_AUDIENCE, SageIdentity

MAX_BATCH_SIZE = 1000  # Sage's current page (spec 3.5.1 rule 2)
MAX_DATE_SPAN = timedelta(days=14)  # spec 3.5.1 rule 9
TOKEN_LIFETIME = 480 * 60  # Sage ID tokens live about 480 minutes (spec 3.2)
REDACTED = "<redacted>"

BANK_ACCOUNT_FIELDS = ("bankAccountExternalId", "accountName", "bankIdentifier", "branchIdentifier",
                       "accountIdentifier")
BANK_ACCOUNT_REQUIRED = ("bankAccountExternalId", "bankIdentifier", "accountIdentifier")
BALANCE_FIELDS = ("ledgerBalance", "ledgerBalanceDate", "availableBalance", "availableBalanceDate")
EXPECTED_FIELDS = ("transactionDetailsCount", "accountDetailsCount", "transactionCreditSum", "transactionDebitSum")
TRANSACTION_REQUIRED = ("uniqueId", "bankAccountId", "transactionAmount", "transactionType", "transactionStatus",
                        "datePosted", "description")
ACCOUNT_STATUSES = ("active", "authRequired")
CALLBACK_KEYS = ("notification", "availableAccounts", "auth", "reAuth")
BANK_REQUIRED = ("name", "countryCode", "url", "externalRef", "callbackURLs")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")


# -- records ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the emulator saw it, secrets replaced by ``<redacted>``.

    ``json`` is the parsed body (numbers as ``Decimal``, so amounts compare exactly); for the token endpoint it is
    the form without the client secret, and ``body`` is empty.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    json: Any
    body: bytes
    at: float = 0.0  # arrival time on the emulator's clock


@dataclass(frozen=True)
class RecordedPatch:
    authorisation_id: str
    body: Any


@dataclass
class StatementRecord:
    id: str
    bank_account_id: str
    body: Any
    digest: str
    unique_ids: tuple[str, ...]
    status: str = "processing"
    polls: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    fail_with: list[dict[str, str]] | None = None


@dataclass
class _Fault:
    remaining: int
    prefix: str
    status: int = 0
    delay: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: Any = None


class Problem(Exception):
    """A request the emulator refuses: HTTP ``status`` with ``{"error": code, "message": message}``."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status

    def response(self) -> web.Response:
        return web.json_response({"error": self.code, "message": self.message}, status=self.status)


# -- statement rules (pure, so feed tests can check a body without a server) ---------------------------------------


def parse_json(raw: bytes) -> Any:
    """JSON as Sage should receive it: numbers as ``Decimal``, no exponent notation, no NaN/Infinity (spec 3.5.4)."""

    def plain_decimal(text: str) -> Decimal:
        if "e" in text or "E" in text:
            raise Problem("number_format", f"number {text} uses exponent notation")
        return Decimal(text)

    def no_constant(text: str) -> Any:
        raise Problem("number_format", f"{text} is not a JSON number Sage accepts")

    try:
        return json.loads(raw, parse_float=plain_decimal, parse_int=Decimal, parse_constant=no_constant)
    except Problem:
        raise
    except ValueError as exc:
        raise Problem("invalid_json", f"body is not JSON: {exc.__class__.__name__}") from None


def check_statement(body: Any, *, batch_size: int = 100, today: date | None = None) -> None:
    """Raise :class:`Problem` for the first rule of spec 3.5 that ``body`` (parsed by :func:`parse_json`) breaks.

    Stateful rules (duplicate ``uniqueId``, one statement in flight per account) are the emulator's.
    """
    data = _object(body, "data") if isinstance(body, dict) else None
    if data is None:
        raise Problem("invalid_body", 'body must be {"data": {...}}')
    principal = _string(data, "principalId", "invalid_body")
    _string(data, "bankId", "invalid_body")
    accounts = data.get("accountDetails")
    if not isinstance(accounts, list) or len(accounts) != 1 or not isinstance(accounts[0], dict):
        raise Problem("account_details_count", "accountDetails must hold exactly one account")
    account = accounts[0]
    account_id = _string(account, "bankAccountId", "invalid_account_details")
    if principal != account_id:
        raise Problem("principal_mismatch", "principalId must equal accountDetails[0].bankAccountId")
    if account.get("status") not in ACCOUNT_STATUSES:
        raise Problem("invalid_account_status", f"accountDetails[0].status must be one of {ACCOUNT_STATUSES}")
    transactions = data.get("transactionDetails")
    if not isinstance(transactions, list):
        raise Problem("invalid_body", "transactionDetails must be a list (it may be empty)")
    if len(transactions) > batch_size:
        raise Problem("too_many_transactions", f"at most {batch_size} transactionDetails per statement")

    credit, debit, posted = Decimal(0), Decimal(0), []
    for index, transaction in enumerate(transactions):
        amount, when = _check_transaction(index, transaction, account_id, today)
        if amount > 0:
            credit += amount
        else:
            debit += amount
        posted.append(when)
    if any(later < earlier for earlier, later in zip(posted, posted[1:])):
        raise Problem("transaction_order", "transactions must be sent oldest first")
    if posted and posted[-1] - posted[0] > MAX_DATE_SPAN:
        raise Problem("date_span", "newest and oldest datePosted are more than 14 days apart")

    _check_expected(data.get("expected"), len(transactions), credit, debit)
    _check_balances(account.get("balances"), posted[-1] if posted else None)


def _check_transaction(index: int, transaction: Any, account_id: str, today: date | None) -> tuple[Decimal, datetime]:
    where = f"transactionDetails[{index}]"
    if not isinstance(transaction, dict):
        raise Problem("invalid_transaction", f"{where} must be an object")
    for key in TRANSACTION_REQUIRED:
        if key not in transaction:
            raise Problem("invalid_transaction", f"{where}.{key} is required")
    for key, value in transaction.items():
        if value is None or value == "":
            raise Problem("empty_field", f"{where}.{key} is empty; leave optional fields out instead")
    for key in ("uniqueId", "bankAccountId", "transactionType", "transactionStatus", "datePosted", "description"):
        if not isinstance(transaction[key], str):
            raise Problem("invalid_transaction", f"{where}.{key} must be a string")
    if transaction["bankAccountId"] != account_id:
        raise Problem("transaction_account_mismatch", f"{where}.bankAccountId differs from accountDetails")
    amount = transaction["transactionAmount"]
    if not isinstance(amount, Decimal):
        raise Problem("invalid_transaction", f"{where}.transactionAmount must be a number")
    if amount == 0:
        raise Problem("zero_amount", f"{where}.transactionAmount is zero")
    kind = "CREDIT" if amount > 0 else "DEBIT"
    if transaction["transactionType"] != kind:
        raise Problem("transaction_type_mismatch", f"{where}: a {'positive' if amount > 0 else 'negative'} amount "
                                                   f"must be {kind}")
    if transaction["transactionStatus"] != "posted":
        raise Problem("invalid_transaction", f"{where}.transactionStatus must be posted")
    exchange = transaction.get("exchangeAmount")
    if exchange is not None and (not isinstance(exchange, Decimal) or (exchange > 0) != (amount > 0)):
        raise Problem("invalid_transaction", f"{where}.exchangeAmount must have the sign of transactionAmount")
    when = _date_time(transaction["datePosted"], f"{where}.datePosted")
    if "dateUserInitiated" in transaction:
        _date_time(transaction["dateUserInitiated"], f"{where}.dateUserInitiated")
    if today is not None and when.date() > today:
        raise Problem("future_date", f"{where}.datePosted is after today (UTC)")
    return amount, when


def _check_expected(expected: Any, count: int, credit: Decimal, debit: Decimal) -> None:
    if count == 0 and expected in (None, {}):
        return  # Sage's own status-only example sends "expected": {} (spec 3.5.6)
    if not isinstance(expected, dict) or any(key not in expected for key in EXPECTED_FIELDS):
        raise Problem("expected_mismatch", f"expected must hold {', '.join(EXPECTED_FIELDS)}")
    wanted = {"transactionDetailsCount": count, "accountDetailsCount": 1,
              "transactionCreditSum": credit, "transactionDebitSum": debit}
    for key, value in wanted.items():
        sent = expected[key]
        if not isinstance(sent, Decimal) or sent != value:
            raise Problem("expected_mismatch", f"expected.{key} is {sent}, the statement gives {value}")


def _check_balances(balances: Any, newest: datetime | None) -> None:
    if not isinstance(balances, dict):
        raise Problem("balances_missing", "accountDetails[0].balances must be an object")
    if newest is None and balances == {}:
        return  # status-only statement (spec 3.5.6)
    for key in BALANCE_FIELDS:
        if key not in balances:
            raise Problem("balances_missing", f"balances.{key} is required with transactions")
    for key in ("ledgerBalance", "availableBalance"):
        if not isinstance(balances[key], Decimal):
            raise Problem("balances_missing", f"balances.{key} must be a number")
    for key in ("ledgerBalanceDate", "availableBalanceDate"):
        when = _date_time(balances[key], f"balances.{key}")
        if newest is not None and when < newest:
            raise Problem("balance_date", f"balances.{key} is older than the newest transaction")


def _object(parent: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = parent.get(key)
    return value if isinstance(value, dict) else None


def _string(parent: dict[str, Any], key: str, code: str) -> str:
    value = parent.get(key)
    if not isinstance(value, str) or not value:
        raise Problem(code, f"{key} must be a non-empty string")
    return value


def _date_time(value: Any, where: str) -> datetime:
    if not isinstance(value, str) or not _DATE_TIME.match(value):
        raise Problem("invalid_date", f"{where} must be an ISO 8601 UTC date-time like 2025-01-02T12:00:00.000Z")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise Problem("invalid_date", f"{where} is not a real date") from None


# -- the server ------------------------------------------------------------------------------------------------------


class SageEmulator:
    """Sage ID plus the Provider API on ``http://127.0.0.1:<port>``; see the module docstring for its contract.

    ``rate`` (``None``: no limit) is the Provider API's requests per second; ``expires_in`` the token lifetime it
    announces (``None``: the field is left out and tokens live 480 minutes); ``batch_size`` the most
    ``transactionDetails`` per statement; ``processing_polls`` how many GETs see a statement ``processing``.
    ``clock`` drives token expiry and the rate window; ``today`` the "no future dates" rule.
    """

    def __init__(
        self,
        *,
        rate: float | None = 10,
        expires_in: int | None = TOKEN_LIFETIME,
        batch_size: int = 100,
        processing_polls: int = 1,
        audience: str = SANDBOX_AUDIENCE,
        identity: SageIdentity | None = None,
        patch_status: int = 204,
        clock: Callable[[], float] = time.monotonic,
        today: Callable[[], date] = lambda: datetime.now(UTC).date(),
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}")
        self.rate = rate
        self.expires_in = expires_in
        self.batch_size = batch_size
        self.processing_polls = processing_polls
        self.audience = audience
        self.patch_status = patch_status
        self.identity = identity or SageIdentity(issuer="")
        self.client_id = f"emulator-{secrets.token_hex(8)}"
        self.client_secret = secrets.token_urlsafe(32)
        self.api_key = secrets.token_urlsafe(32)
        self.base_url = ""
        #: ``None``: any authorisation id is accepted; else only these (see :meth:`expect_authorisation`).
        self.known_authorisations: set[str] | None = None
        self._clock = clock
        self._today = today

        self.requests: list[RecordedRequest] = []
        self.patches: list[RecordedPatch] = []
        self.statements: list[Any] = []  # accepted bodies, in order (parsed with Decimal numbers)
        self.transactions_by_account: dict[str, list[str]] = {}  # accepted uniqueIds per bankAccountId
        self.account_status: dict[str, str] = {}  # bankAccountId -> status after its last completed statement
        self.banks: dict[str, dict[str, Any]] = {}  # principalId -> bank
        self.count_429 = 0
        self.throttled_at: list[float] = []  # when each 429 was answered, on ``clock`` (steady-state counts)
        self.replayed_statements = 0  # identical resends answered with the original _id
        self.issued_tokens: list[str] = []  # every access token handed out, so leak tests can look for them

        self._tokens: dict[str, float] = {}  # access token -> expiry on ``clock``
        self._window: deque[float] = deque()
        self._faults: list[_Fault] = []
        self._delays: list[_Fault] = []
        self._rejection: _Fault | None = None
        self._failures: deque[list[dict[str, str]]] = deque()
        self._records: dict[str, StatementRecord] = {}
        self._by_digest: dict[str, str] = {}
        self._accepted_ids: set[str] = set()  # uniqueIds of every accepted statement, all accounts
        self._in_flight: dict[str, str] = {}
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def start(self) -> str:
        app = web.Application(middlewares=[self._gateway], client_max_size=8 * 1024 * 1024)
        app.router.add_post("/oauth/token", self._token)
        app.router.add_get("/.well-known/jwks.json", self._jwks)
        app.router.add_patch("/v1/authorisations/{authorisation_id}", self._patch_authorisation)
        app.router.add_post("/v1/statements", self._post_statement)
        app.router.add_get("/v1/statements/{statement_id}", self._get_statement)
        app.router.add_post("/v1/banks", self._post_banks)
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        self.identity.issuer = self.base_url + "/"
        return self.base_url

    async def stop(self) -> None:
        self._closing.set()  # ends injected delays at once, so a hung request cannot hold up shutdown
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SageEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def token_url(self) -> str:
        return self.base_url + "/oauth/token"

    @property
    def jwks_url(self) -> str:
        return self.base_url + "/.well-known/jwks.json"

    @property
    def api_url(self) -> str:
        return self.base_url  # Provider API paths continue with /v1 directly after the base (spec 3.1)

    def client_settings(self) -> dict[str, str]:
        """The :class:`connector.sage.SageClient` keyword arguments that reach this emulator."""
        return {
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret,
            "token_audience": self.audience,
            "api_url": self.api_url,
            "api_key": self.api_key,
        }

    # -- controls for tests ------------------------------------------------------------------------------------

    def fail_next(
        self,
        status: int,
        count: int = 1,
        path_prefix: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ) -> None:
        """Answer the next ``count`` requests under ``path_prefix`` (default ``/v1``) with ``status``."""
        payload = body if body is not None else {"error": "injected", "message": f"injected {status}"}
        self._faults.append(_Fault(count, path_prefix or "/v1", status=status, headers=dict(headers or {}),
                                   body=payload))

    def delay_next(self, seconds: float, count: int = 1, path_prefix: str | None = None) -> None:
        """Hold the next ``count`` requests under ``path_prefix`` (default ``/v1``) for ``seconds`` before handling
        them as usual: a client that times out meanwhile sees an uncertain delivery.
        """
        self._delays.append(_Fault(count, path_prefix or "/v1", delay=seconds))

    def throttle(self, count: int, retry_after: float | str | None = 1) -> None:
        """Answer the next ``count`` ``/v1`` requests with 429 (``Retry-After`` left out when ``None``)."""
        headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
        self._faults.append(_Fault(count, "/v1", status=429, headers=headers,
                                   body={"error": "rate_limited", "message": "too many requests"}))

    def expire_tokens(self) -> None:
        """Revoke every access token issued so far: their next use gets 401."""
        self._tokens.clear()

    def reject_statements(self, code: str | None, message: str = "rejected", *, count: int | None = None,
                          status: int = 400) -> None:
        """Refuse the next ``count`` statements (``None``: all, until ``reject_statements(None)``)."""
        self._rejection = None if code is None else _Fault(
            -1 if count is None else count, "/v1/statements", status=status, body={"error": code, "message": message})

    def fail_statements(self, errors: list[dict[str, str]] | None = None, count: int = 1) -> None:
        """Accept the next ``count`` statements but let them end ``failed`` with ``errors`` (spec 3.6)."""
        for _ in range(count):
            self._failures.append(errors or [{"code": "processing_failed", "message": "injected failure"}])

    def expect_authorisation(self, *authorisation_ids: str) -> None:
        """Accept PATCHes only for these ids (and others expected later); any other id gets 404."""
        if self.known_authorisations is None:
            self.known_authorisations = set()
        self.known_authorisations.update(authorisation_ids)

    def statement(self, statement_id: str) -> StatementRecord:
        return self._records[statement_id]

    def statements_for(self, bank_account_id: str) -> list[dict[str, Any]]:
        """The ``data`` of every statement accepted for this bankAccountId, oldest first."""
        return [s["data"] for s in self.statements if s["data"]["principalId"] == bank_account_id]

    def requests_to(self, path_prefix: str, method: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.startswith(path_prefix) and method in (None, r.method)]

    @property
    def token_requests(self) -> int:
        return len(self.requests_to("/oauth/token"))

    @property
    def jwks_fetches(self) -> int:
        return len(self.requests_to("/.well-known/jwks.json"))

    # -- the gateway: recording, faults, rate limit, credentials -------------------------------------------------

    @web.middleware
    async def _gateway(self, request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        await self._record(request)
        response = await self._screen(request)
        if response is None:
            try:
                response = await handler(request)
            except Problem as problem:
                response = problem.response()
        if response.status == 429:
            self.count_429 += 1
            self.throttled_at.append(self._clock())
        return response

    async def _screen(self, request: web.Request) -> web.StreamResponse | None:
        path = request.path
        delay = _take(self._delays, path)
        if delay is not None:
            try:
                await asyncio.wait_for(self._closing.wait(), delay.delay)
            except TimeoutError:
                pass
        fault = _take(self._faults, path)
        if fault is not None:
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        if not path.startswith("/v1/"):
            return None  # Sage ID does not count against the Provider API rate (spec 3.2)
        throttled = self._rate_limited()
        if throttled is not None:
            return throttled
        try:
            self._authenticate(request)
        except Problem as problem:
            return problem.response()
        return None

    def _rate_limited(self) -> web.Response | None:
        if self.rate is None:
            return None
        now = self._clock()
        while self._window and self._window[0] <= now - 1.0:
            self._window.popleft()
        if len(self._window) >= self.rate:
            wait = max(1, math.ceil(self._window[0] + 1.0 - now))
            return web.json_response({"error": "rate_limited", "message": f"more than {self.rate:g} requests "
                                                                           "in one second"},
                                     status=429, headers={"Retry-After": str(wait)})
        self._window.append(now)
        return None

    def _authenticate(self, request: web.Request) -> None:
        key = request.headers.get("x-api-key", "")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise Problem("invalid_api_key", "x-api-key is missing or wrong", 401)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expiry = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if expiry is None or expiry <= self._clock():
            raise Problem("invalid_token", "the bearer token is missing, expired or revoked", 401)

    async def _record(self, request: web.Request) -> None:
        headers = {k: v for k, v in request.headers.items()}
        for name in list(headers):
            if name.lower() == "x-api-key":
                headers[name] = REDACTED
            elif name.lower() == "authorization":
                scheme = headers[name].partition(" ")[0]
                headers[name] = f"{scheme} {REDACTED}"
        if request.path == "/oauth/token":
            form = dict(await request.post()) if request.content_type == "application/x-www-form-urlencoded" else {}
            if "client_secret" in form:
                form["client_secret"] = REDACTED
            self.requests.append(RecordedRequest(request.method, request.path, headers, form, b"", self._clock()))
            return
        raw = await request.read()
        try:
            parsed = parse_json(raw) if raw else None
        except Problem:
            parsed = None
        self.requests.append(RecordedRequest(request.method, request.path, headers, parsed, raw, self._clock()))

    # -- Sage ID -----------------------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-www-form-urlencoded":
            raise Problem("invalid_request", "the token request must be form-encoded")
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            raise Problem("unsupported_grant_type", "grant_type must be client_credentials")
        client_id, client_secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
        if not (hmac.compare_digest(client_id.encode(), self.client_id.encode())
                and hmac.compare_digest(client_secret.encode(), self.client_secret.encode())):
            raise Problem("access_denied", "Unauthorized", 401)
        if form.get("audience") != self.audience:
            raise Problem("access_denied", "Service not enabled within domain", 403)
        token = secrets.token_urlsafe(32)
        self.issued_tokens.append(token)
        self._tokens[token] = self._clock() + (self.expires_in if self.expires_in is not None else TOKEN_LIFETIME)
        answer: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            answer["expires_in"] = self.expires_in
        return web.json_response(answer, headers={"Cache-Control": "no-store"})

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response(self.identity.jwks())

    # -- Provider API ------------------------------------------------------------------------------------------

    async def _patch_authorisation(self, request: web.Request) -> web.StreamResponse:
        authorisation_id = request.match_info["authorisation_id"]
        if self.known_authorisations is not None and authorisation_id not in self.known_authorisations:
            raise Problem("unknown_authorisation", "no such authorisation", 404)
        body = await _json_body(request)
        data = _object(body, "data") if isinstance(body, dict) else None
        if data is None:
            raise Problem("invalid_body", 'body must be {"data": {...}}')
        if data.get("status") != "success":
            raise Problem("invalid_status", 'data.status must be "success"')
        unknown = set(data) - {"status", "bankAccounts"}
        if unknown:
            raise Problem("unknown_field", f"unexpected data fields: {', '.join(sorted(unknown))}")
        if "bankAccounts" in data:
            _check_bank_accounts(data["bankAccounts"])
        self.patches.append(RecordedPatch(authorisation_id, body))
        if self.patch_status == 204:
            return web.Response(status=204)
        return web.json_response({"data": {"_id": authorisation_id, "status": "success"}}, status=self.patch_status)

    async def _post_statement(self, request: web.Request) -> web.Response:
        raw = await request.read()
        digest = hashlib.sha256(raw).hexdigest()
        if digest in self._by_digest:
            # The same bytes again: a resend after an uncertain delivery, which Sage says is safe (spec 3.5.7).
            self.replayed_statements += 1
            return web.json_response({"data": {"_id": self._by_digest[digest]}}, status=200)
        rejection = self._rejection
        if rejection is not None:
            if rejection.remaining > 0:
                rejection.remaining -= 1
                if rejection.remaining == 0:
                    self._rejection = None
            return web.json_response(rejection.body, status=rejection.status)

        body = parse_json(raw)
        check_statement(body, batch_size=self.batch_size, today=self._today())
        data = body["data"]
        account_id: str = data["principalId"]
        if account_id in self._in_flight:
            raise Problem("statement_in_flight", "a statement for this account is still processing", 409)
        unique_ids = [t["uniqueId"] for t in data["transactionDetails"]]
        seen: set[str] = set()
        for unique_id in unique_ids:
            if unique_id in seen or unique_id in self._accepted_ids:
                raise Problem("duplicate_unique_id", f"uniqueId {unique_id} was already sent")
            seen.add(unique_id)

        record = StatementRecord(str(uuid.uuid4()), account_id, body, digest, tuple(unique_ids))
        if self._failures:
            record.fail_with = self._failures.popleft()
        self._records[record.id] = record
        self._by_digest[digest] = record.id
        self._in_flight[account_id] = record.id
        self.statements.append(body)
        self.transactions_by_account.setdefault(account_id, []).extend(unique_ids)
        self._accepted_ids.update(unique_ids)
        if self.processing_polls <= 0:
            self._finish(record)
        return web.json_response({"data": {"_id": record.id}}, status=201)

    async def _get_statement(self, request: web.Request) -> web.Response:
        record = self._records.get(request.match_info["statement_id"])
        if record is None:
            raise Problem("not_found", "no such statement", 404)
        record.polls += 1
        if record.status == "processing" and record.polls > self.processing_polls:
            self._finish(record)
        return web.json_response({"data": {"_id": record.id, "status": record.status, "errors": record.errors}})

    def _finish(self, record: StatementRecord) -> None:
        self._in_flight.pop(record.bank_account_id, None)
        if record.fail_with is None:
            record.status = "complete"
            account = record.body["data"]["accountDetails"][0]
            if account["status"] == "authRequired" or record.unique_ids:
                self.account_status[record.bank_account_id] = account["status"]
            return
        # A failed statement was not processed: its uniqueIds and bytes may come again (spec 3.6).
        record.status = "failed"
        record.errors = record.fail_with
        self._by_digest.pop(record.digest, None)
        sent = self.transactions_by_account.get(record.bank_account_id, [])
        released = set(record.unique_ids)
        self._accepted_ids -= released
        self.transactions_by_account[record.bank_account_id] = [u for u in sent if u not in released]

    async def _post_banks(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        data = _object(body, "data") if isinstance(body, dict) else None
        if data is None:
            raise Problem("invalid_body", 'body must be {"data": {...}} (an object, spec 7.29)')
        unknown = set(data) - {"toCreate", "toUpdate", "toRemove"}
        if unknown or not data:
            raise Problem("invalid_body", "data holds toCreate, toUpdate and/or toRemove")
        to_create, to_update = data.get("toCreate", []), data.get("toUpdate", [])
        to_remove = data.get("toRemove", [])
        for name, banks in (("toCreate", to_create), ("toUpdate", to_update), ("toRemove", to_remove)):
            if not isinstance(banks, list) or not all(isinstance(b, dict) for b in banks):
                raise Problem("invalid_body", f"{name} must be a list of objects")
        for index, bank in enumerate(to_create):
            _check_bank(bank, f"toCreate[{index}]")
        for index, bank in enumerate(to_update):
            _check_bank(bank, f"toUpdate[{index}]")
            if self.banks.get(bank.get("principalId"), {}).get("externalRef") != bank["externalRef"]:
                raise Problem("unknown_bank", f"toUpdate[{index}]: no bank with this principalId and externalRef",
                              404)
        for index, bank in enumerate(to_remove):
            if bank.get("principalId") not in self.banks:
                raise Problem("unknown_bank", f"toRemove[{index}]: no bank with this principalId", 404)

        created = []
        for bank in to_create:
            stored = {**_plain(bank), "principalId": str(uuid.uuid4())}
            self.banks[stored["principalId"]] = stored
            created.append(stored)
        updated = []
        for bank in to_update:
            stored = {**self.banks[bank["principalId"]], **_plain(bank)}
            self.banks[stored["principalId"]] = stored
            updated.append(stored)
        for bank in to_remove:
            self.banks.pop(bank["principalId"], None)
        return web.json_response({"data": {"created": created, "updated": updated}})


# -- helpers -----------------------------------------------------------------------------------------------------


def _take(faults: list[_Fault], path: str) -> _Fault | None:
    for fault in faults:
        if path.startswith(fault.prefix):
            fault.remaining -= 1
            if fault.remaining <= 0:
                faults.remove(fault)
            return fault
    return None


async def _json_body(request: web.Request) -> Any:
    if request.content_type != "application/json":
        raise Problem("unsupported_media_type", "Content-Type must be application/json", 415)
    return parse_json(await request.read())


def _check_bank_accounts(accounts: Any) -> None:
    if not isinstance(accounts, list):
        raise Problem("invalid_bank_accounts", "bankAccounts must be a list")
    seen: set[str] = set()
    for index, account in enumerate(accounts):
        where = f"bankAccounts[{index}]"
        if not isinstance(account, dict):
            raise Problem("invalid_bank_accounts", f"{where} must be an object")
        for key in BANK_ACCOUNT_FIELDS:
            if not isinstance(account.get(key), str):
                raise Problem("invalid_bank_accounts", f"{where}.{key} must be a string")
        for key in BANK_ACCOUNT_REQUIRED:
            if not account[key].strip():
                raise Problem("invalid_bank_accounts", f"{where}.{key} must not be empty")
        if account["bankAccountExternalId"] in seen:
            raise Problem("invalid_bank_accounts", f"{where}.bankAccountExternalId repeats another account's")
        seen.add(account["bankAccountExternalId"])


def _check_bank(bank: dict[str, Any], where: str) -> None:
    for key in BANK_REQUIRED:
        if key not in bank:
            raise Problem("invalid_bank", f"{where}.{key} is required")
    for key in ("name", "countryCode", "url", "externalRef"):
        if not isinstance(bank[key], str) or not bank[key].strip():
            raise Problem("invalid_bank", f"{where}.{key} must be a non-empty string")
    if "supportiframe" in bank and not isinstance(bank["supportiframe"], bool):
        raise Problem("invalid_bank", f"{where}.supportiframe must be true or false")
    urls = bank["callbackURLs"]
    if not isinstance(urls, dict) or set(urls) != set(CALLBACK_KEYS):
        raise Problem("invalid_callback_urls", f"{where}.callbackURLs must hold exactly {', '.join(CALLBACK_KEYS)}")
    for key in CALLBACK_KEYS:
        if not isinstance(urls[key], str) or not urls[key].startswith(("https://", "http://")):
            raise Problem("invalid_callback_urls", f"{where}.callbackURLs.{key} must be an absolute URL")


def _plain(value: Any) -> Any:
    """Decimals back to JSON-friendly numbers for answers."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


__all__ = ["Problem", "RecordedPatch", "RecordedRequest", "SageEmulator", "StatementRecord",
                          "check_statement", "parse_json"]
