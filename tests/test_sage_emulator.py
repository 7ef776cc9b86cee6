"""The Sage emulator checks what Sage checks: each rule gets a violating request and a 4xx with a clear code."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import jwt
import pytest

from connector.outbound import guarded_session
from connector.testing.sage import Problem, SageEmulator, check_statement, parse_json

ACCOUNT = "acc-1"


def transaction(unique_id: str, amount: str, day: date, account: str = ACCOUNT) -> dict[str, Any]:
    return {
        "uniqueId": unique_id,
        "bankAccountId": account,
        "transactionAmount": Decimal(amount),
        "transactionType": "CREDIT" if Decimal(amount) > 0 else "DEBIT",
        "transactionStatus": "posted",
        "datePosted": f"{day.isoformat()}T12:00:00.000Z",
        "description": "Coffee",
    }


def statement(*amounts: str, account: str = ACCOUNT, start: date = date(2025, 1, 1), prefix: str = "u",
              status: str = "active") -> dict[str, Any]:
    """A valid statement: one transaction a day from ``start``, control totals and closing balance filled in."""
    txs = [transaction(f"{prefix}-{account}-{i}", a, start + timedelta(days=i), account) for i, a in enumerate(amounts)]
    credit = sum((t["transactionAmount"] for t in txs if t["transactionAmount"] > 0), Decimal(0))
    debit = sum((t["transactionAmount"] for t in txs if t["transactionAmount"] < 0), Decimal(0))
    last = txs[-1]["datePosted"] if txs else None
    balances = {"ledgerBalance": Decimal("1000.00") + credit + debit, "ledgerBalanceDate": last,
                "availableBalance": Decimal("1000.00") + credit + debit, "availableBalanceDate": last} if txs else {}
    return {"data": {
        "principalId": account,
        "bankId": "bank-1",
        "expected": {"transactionDetailsCount": len(txs), "accountDetailsCount": 1,
                     "transactionCreditSum": credit, "transactionDebitSum": debit},
        "accountDetails": [{"bankAccountId": account, "status": status, "balances": balances}],
        "transactionDetails": txs,
    }}


def encode(body: Any) -> bytes:
    return json.dumps(body, default=lambda d: float(d) if isinstance(d, Decimal) else str(d)).encode()


def encode_exact(body: Any) -> bytes:
    """JSON with each Decimal written exactly as it is (what the feed must do), never through float."""
    marker = "\u0000dec:"

    def convert(value: Any) -> Any:
        if isinstance(value, Decimal):
            return marker + format(value, "f")
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    text = json.dumps(convert(body))
    return re.sub(r'"\\u0000dec:(-?[0-9.]+)"', r"\1", text).encode()


class Raw:
    """Direct HTTP to the emulator, with valid credentials unless told otherwise."""

    def __init__(self, emulator: SageEmulator, session: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.session = session
        self.token: str | None = None

    async def get_token(self, **overrides: str) -> tuple[int, dict[str, Any]]:
        form = {"grant_type": "client_credentials", "client_id": self.emulator.client_id,
                "client_secret": self.emulator.client_secret, "audience": self.emulator.audience, **overrides}
        async with self.session.post(self.emulator.token_url, data=form) as resp:
            return resp.status, await resp.json()

    async def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:
        if self.token is None:
            status, answer = await self.get_token()
            assert status == 200
            self.token = answer["access_token"]
        sent = {"x-api-key": self.emulator.api_key, "Authorization": f"Bearer {self.token}",
                "Content-Type": "application/json", **(headers or {})}
        data = raw if raw is not None else (encode_exact(body) if body is not None else None)
        async with self.session.request(method, self.emulator.base_url + path, data=data, headers=sent) as resp:
            text = await resp.read()
            return resp.status, (json.loads(text) if text else None), dict(resp.headers)

    async def post_statement(self, body: Any) -> tuple[int, Any]:
        status, answer, _ = await self.call("POST", "/v1/statements", body)
        return status, answer


@pytest.fixture
async def emulator() -> AsyncIterator[SageEmulator]:
    async with SageEmulator(rate=None, today=lambda: date(2025, 6, 1)) as emu:
        yield emu


@pytest.fixture
async def raw(emulator: SageEmulator) -> AsyncIterator[Raw]:
    session = guarded_session([emulator.base_url], timeout=5)
    yield Raw(emulator, session)
    await session.close()


# -- Sage ID ---------------------------------------------------------------------------------------------------------


async def test_token_endpoint_issues_opaque_bearer_tokens(raw: Raw, emulator: SageEmulator) -> None:
    status, answer = await raw.get_token()
    assert status == 200
    assert answer["token_type"] == "Bearer" and answer["expires_in"] == 480 * 60
    assert answer["access_token"].count(".") == 0  # opaque, not a JWT
    recorded = emulator.requests_to("/oauth/token")[0]
    assert recorded.json["client_secret"] == "<redacted>" and recorded.json["grant_type"] == "client_credentials"


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"client_secret": "wrong"}, 401, "access_denied"),
        ({"client_id": "someone-else"}, 401, "access_denied"),
        ({"audience": "sfdsbanking/sfdsBankingProvider"}, 403, "access_denied"),
        ({"grant_type": "client_credential"}, 400, "unsupported_grant_type"),
    ],
)
async def test_token_endpoint_checks_the_form(raw: Raw, overrides: dict[str, str], status: int, code: str) -> None:
    got, answer = await raw.get_token(**overrides)
    assert (got, answer["error"]) == (status, code)


async def test_token_endpoint_wants_a_form_not_json(raw: Raw, emulator: SageEmulator) -> None:
    form = {"grant_type": "client_credentials", "client_id": emulator.client_id,
            "client_secret": emulator.client_secret, "audience": emulator.audience}
    async with raw.session.post(emulator.token_url, json=form) as resp:
        assert resp.status == 400 and (await resp.json())["error"] == "invalid_request"


async def test_jwks_verifies_tokens_minted_by_the_identity(raw: Raw, emulator: SageEmulator) -> None:
    assert emulator.identity.issuer == emulator.base_url + "/"
    async with raw.session.get(emulator.jwks_url) as resp:
        keys = jwt.PyJWKSet.from_dict(await resp.json())
    token = emulator.identity.notification_token()
    kid = jwt.get_unverified_header(token)["kid"]
    claims = jwt.decode(token, keys[kid].key, algorithms=["RS256"], audience=emulator.audience,
                        issuer=emulator.base_url + "/")
    assert claims["scope"] == "WebhooksLambda"
    assert emulator.jwks_fetches == 1


# -- Provider API credentials ----------------------------------------------------------------------------------------


async def test_provider_api_needs_api_key_and_live_token(raw: Raw, emulator: SageEmulator) -> None:
    status, answer, _ = await raw.call("GET", "/v1/statements/x", headers={"x-api-key": "nope"})
    assert (status, answer["error"]) == (401, "invalid_api_key")
    status, answer, _ = await raw.call("GET", "/v1/statements/x", headers={"Authorization": "Bearer forged"})
    assert (status, answer["error"]) == (401, "invalid_token")
    status, _, _ = await raw.call("GET", "/v1/statements/x")
    assert status == 404  # authenticated, unknown statement
    emulator.expire_tokens()
    status, answer, _ = await raw.call("GET", "/v1/statements/x")
    assert (status, answer["error"]) == (401, "invalid_token")
    for request in emulator.requests:  # secrets never recorded
        assert emulator.api_key not in json.dumps(dict(request.headers))
        assert raw.token not in json.dumps(dict(request.headers))


async def test_tokens_expire_on_the_emulator_clock() -> None:
    now = [1000.0]
    async with SageEmulator(expires_in=60, clock=lambda: now[0]) as emulator:
        async with guarded_session([emulator.base_url]) as session:
            raw = Raw(emulator, session)
            assert (await raw.call("GET", "/v1/statements/x"))[0] == 404
            now[0] += 61
            assert (await raw.call("GET", "/v1/statements/x"))[0] == 401


# -- PATCH /v1/authorisations ------------------------------------------------------------------------------------


ACCOUNT_ENTRY = {"bankAccountExternalId": "ext-1", "accountName": "Current ••1234", "bankIdentifier": "200000",
                 "branchIdentifier": "", "accountIdentifier": "12345678"}


async def test_patch_accepts_onboarding_and_reauthorisation(raw: Raw, emulator: SageEmulator) -> None:
    onboarding = {"data": {"status": "success", "bankAccounts": [ACCOUNT_ENTRY]}}
    assert (await raw.call("PATCH", "/v1/authorisations/a-1", onboarding))[0] == 204
    assert (await raw.call("PATCH", "/v1/authorisations/a-2", {"data": {"status": "success"}}))[0] == 204
    assert [(p.authorisation_id, p.body) for p in emulator.patches] == [
        ("a-1", onboarding), ("a-2", {"data": {"status": "success"}})]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({"status": "failed"}, "invalid_status"),
        ({"status": "success", "bankAccounts": {}}, "invalid_bank_accounts"),
        ({"status": "success", "bankAccounts": ["x"]}, "invalid_bank_accounts"),
        ({"status": "success", "bankAccounts": [{**ACCOUNT_ENTRY, "accountName": None}]}, "invalid_bank_accounts"),
        ({"status": "success", "bankAccounts": [{**ACCOUNT_ENTRY, "accountIdentifier": " "}]},
         "invalid_bank_accounts"),
        ({"status": "success", "bankAccounts": [{k: v for k, v in ACCOUNT_ENTRY.items() if k != "bankIdentifier"}]},
         "invalid_bank_accounts"),
        ({"status": "success", "bankAccounts": [ACCOUNT_ENTRY, ACCOUNT_ENTRY]}, "invalid_bank_accounts"),
        ({"status": "success", "accounts": []}, "unknown_field"),
    ],
)
async def test_patch_refuses_bad_bodies(raw: Raw, emulator: SageEmulator, data: dict[str, Any], code: str) -> None:
    status, answer, _ = await raw.call("PATCH", "/v1/authorisations/a-1", {"data": data})
    assert (status, answer["error"]) == (400, code)
    assert emulator.patches == []


async def test_patch_only_known_authorisations_when_told(raw: Raw, emulator: SageEmulator) -> None:
    emulator.expect_authorisation("a-known")
    status, answer, _ = await raw.call("PATCH", "/v1/authorisations/a-other", {"data": {"status": "success"}})
    assert (status, answer["error"]) == (404, "unknown_authorisation")
    assert (await raw.call("PATCH", "/v1/authorisations/a-known", {"data": {"status": "success"}}))[0] == 204


# -- POST /v1/statements: the rules ----------------------------------------------------------------------------------


def _mutate(change: Callable[[dict[str, Any]], None], *amounts: str) -> dict[str, Any]:
    body = statement(*(amounts or ("250.00", "-40.10")))
    change(body["data"])
    return body


def _txs(data: dict[str, Any]) -> list[dict[str, Any]]:
    return data["transactionDetails"]


RULES: list[tuple[str, Callable[[dict[str, Any]], None]]] = [
    ("account_details_count", lambda d: d["accountDetails"].append(copy.deepcopy(d["accountDetails"][0]))),
    ("account_details_count", lambda d: d.update(accountDetails=[])),
    ("principal_mismatch", lambda d: d.update(principalId="acc-2")),
    ("invalid_body", lambda d: d.pop("bankId")),
    ("invalid_account_status", lambda d: d["accountDetails"][0].update(status="pending")),
    ("transaction_account_mismatch", lambda d: _txs(d)[1].update(bankAccountId="acc-2")),
    ("transaction_type_mismatch", lambda d: _txs(d)[0].update(transactionType="DEBIT")),
    ("transaction_type_mismatch", lambda d: _txs(d)[1].update(transactionType="CREDIT")),
    ("zero_amount", lambda d: _txs(d)[0].update(transactionAmount=Decimal(0))),
    ("invalid_transaction", lambda d: _txs(d)[0].pop("uniqueId")),
    ("invalid_transaction", lambda d: _txs(d)[0].update(transactionStatus="pending")),
    ("invalid_transaction", lambda d: _txs(d)[0].update(transactionAmount="250.00")),
    ("empty_field", lambda d: _txs(d)[0].update(narrative1="")),
    ("invalid_date", lambda d: _txs(d)[0].update(datePosted="2025-01-01")),
    ("invalid_date", lambda d: _txs(d)[0].update(datePosted="2025-02-30T12:00:00.000Z")),
    ("future_date", lambda d: _txs(d)[1].update(datePosted="2025-06-02T12:00:00.000Z")),
    ("transaction_order", lambda d: _txs(d).reverse()),
    ("date_span", lambda d: _txs(d)[1].update(datePosted="2025-01-15T12:00:00.001Z")),
    ("expected_mismatch", lambda d: d["expected"].update(transactionDetailsCount=Decimal(3))),
    ("expected_mismatch", lambda d: d["expected"].update(accountDetailsCount=Decimal(2))),
    ("expected_mismatch", lambda d: d["expected"].update(transactionCreditSum=Decimal("250.01"))),
    ("expected_mismatch", lambda d: d["expected"].update(transactionDebitSum=Decimal("40.10"))),
    ("expected_mismatch", lambda d: d.update(expected={})),
    ("balances_missing", lambda d: d["accountDetails"][0].update(balances={})),
    ("balances_missing", lambda d: d["accountDetails"][0]["balances"].pop("availableBalanceDate")),
    ("balances_missing", lambda d: d["accountDetails"][0]["balances"].update(ledgerBalance="1.00")),
    ("balance_date", lambda d: d["accountDetails"][0]["balances"].update(ledgerBalanceDate="2025-01-01T12:00:00.000Z")),
]


@pytest.mark.parametrize(("code", "change"), RULES, ids=[f"{i}-{code}" for i, (code, _) in enumerate(RULES)])
async def test_statement_rules(raw: Raw, emulator: SageEmulator, code: str,
                               change: Callable[[dict[str, Any]], None]) -> None:
    status, answer = await raw.post_statement(_mutate(change))
    assert (status, answer["error"]) == (400, code), answer
    assert emulator.statements == [] and emulator.transactions_by_account == {}


async def test_fourteen_days_exactly_is_fine(raw: Raw) -> None:
    def change(d: dict[str, Any]) -> None:
        _txs(d)[1].update(datePosted="2025-01-15T12:00:00.000Z")
        d["accountDetails"][0]["balances"].update(ledgerBalanceDate="2025-01-15T12:00:00.000Z",
                                                  availableBalanceDate="2025-01-15T12:00:00.000Z")

    body = _mutate(change)
    assert (await raw.post_statement(body))[0] == 201


async def test_batch_size_is_enforced() -> None:
    async with SageEmulator(batch_size=2) as emulator, guarded_session([emulator.base_url]) as session:
        status, answer = await Raw(emulator, session).post_statement(statement("1.00", "2.00", "3.00"))
        assert (status, answer["error"]) == (400, "too_many_transactions")
    with pytest.raises(ValueError):
        SageEmulator(batch_size=1001)


async def test_numbers_in_exponent_notation_are_refused(raw: Raw) -> None:
    body = encode_exact(statement("250.00", "-40.10")).replace(b"250.00", b"2.5E2", 1)
    status, answer, _ = await raw.call("POST", "/v1/statements", raw=body)
    assert (status, answer["error"]) == (400, "number_format")
    status, answer, _ = await raw.call("POST", "/v1/statements", raw=b"{not json")
    assert (status, answer["error"]) == (400, "invalid_json")


async def test_status_only_statement_with_empty_balances(raw: Raw, emulator: SageEmulator) -> None:
    body = statement(status="authRequired")
    assert body["data"]["accountDetails"][0]["balances"] == {}
    assert (await raw.post_statement(body))[0] == 201
    sage_style = statement(status="authRequired", account="acc-2")
    sage_style["data"]["expected"] = {}  # Sage's own example (spec 3.5.6)
    assert (await raw.post_statement(sage_style))[0] == 201


async def test_statement_lifecycle_and_in_flight_rule(raw: Raw, emulator: SageEmulator) -> None:
    status, answer = await raw.post_statement(statement("250.00", "-40.10"))
    assert status == 201
    statement_id = answer["data"]["_id"]
    # A second statement for the same account while the first is processing: 409.
    status, answer = await raw.post_statement(statement("5.00", start=date(2025, 1, 3), prefix="v"))
    assert (status, answer["error"]) == (409, "statement_in_flight")
    # Another account may run in parallel.
    assert (await raw.post_statement(statement("7.00", account="acc-2")))[0] == 201

    status, answer, _ = await raw.call("GET", f"/v1/statements/{statement_id}")
    assert answer["data"] == {"_id": statement_id, "status": "processing", "errors": []}
    status, answer, _ = await raw.call("GET", f"/v1/statements/{statement_id}")
    assert answer["data"]["status"] == "complete"
    assert emulator.account_status[ACCOUNT] == "active"
    assert (await raw.post_statement(statement("5.00", start=date(2025, 1, 3), prefix="v")))[0] == 201
    assert emulator.transactions_by_account[ACCOUNT] == ["u-acc-1-0", "u-acc-1-1", "v-acc-1-0"]
    assert (await raw.call("GET", "/v1/statements/nope"))[0] == 404


async def test_duplicate_unique_id_is_refused_but_identical_resend_is_safe(raw: Raw, emulator: SageEmulator) -> None:
    emulator.processing_polls = 0
    first = encode_exact(statement("250.00", "-40.10"))
    status, answer, _ = await raw.call("POST", "/v1/statements", raw=first)
    assert status == 201
    statement_id = answer["data"]["_id"]
    # The identical bytes again (a resend after a lost answer): the same _id, nothing processed twice.
    status, answer, _ = await raw.call("POST", "/v1/statements", raw=first)
    assert (status, answer["data"]["_id"]) == (200, statement_id)
    assert len(emulator.statements) == 1 and emulator.replayed_statements == 1
    # A different statement repeating one uniqueId: refused.
    again = statement("250.00", start=date(2025, 1, 2))
    status, answer = await raw.post_statement(again)
    assert (status, answer["error"]) == (400, "duplicate_unique_id")
    # Repeats inside one statement, and across accounts, are refused too.
    twice = statement("1.00", "2.00", account="acc-2", prefix="w")
    twice["data"]["transactionDetails"][1]["uniqueId"] = twice["data"]["transactionDetails"][0]["uniqueId"]
    assert (await raw.post_statement(twice))[1]["error"] == "duplicate_unique_id"
    other = statement("1.00", account="acc-2", prefix="w")
    other["data"]["transactionDetails"][0]["uniqueId"] = "u-acc-1-0"
    assert (await raw.post_statement(other))[1]["error"] == "duplicate_unique_id"


async def test_failed_statement_can_be_resent(raw: Raw, emulator: SageEmulator) -> None:
    emulator.processing_polls = 0
    emulator.fail_statements([{"code": "bad_balance", "message": "no"}])
    body = encode_exact(statement("250.00"))
    status, answer, _ = await raw.call("POST", "/v1/statements", raw=body)
    failed_id = answer["data"]["_id"]
    status, answer, _ = await raw.call("GET", f"/v1/statements/{failed_id}")
    assert answer["data"] == {"_id": failed_id, "status": "failed",
                              "errors": [{"code": "bad_balance", "message": "no"}]}
    assert emulator.transactions_by_account[ACCOUNT] == []
    status, answer, _ = await raw.call("POST", "/v1/statements", raw=body)
    assert status == 201 and answer["data"]["_id"] != failed_id
    assert emulator.statement(answer["data"]["_id"]).status == "complete"


async def test_reject_statements(raw: Raw, emulator: SageEmulator) -> None:
    emulator.reject_statements("account_closed", "The bank account is cancelled", count=1, status=422)
    status, answer = await raw.post_statement(statement("1.00"))
    assert (status, answer) == (422, {"error": "account_closed", "message": "The bank account is cancelled"})
    assert (await raw.post_statement(statement("1.00")))[0] == 201
    emulator.reject_statements("nope")
    assert (await raw.post_statement(statement("1.00", account="a3")))[0] == 400
    assert (await raw.post_statement(statement("1.00", account="a4")))[0] == 400
    emulator.reject_statements(None)
    assert (await raw.post_statement(statement("1.00", account="a5")))[0] == 201


def test_check_statement_is_usable_without_a_server() -> None:
    check_statement(parse_json(encode_exact(statement("250.00", "-40.10"))))
    with pytest.raises(Problem) as caught:
        check_statement(parse_json(encode(statement("0.10", "0.20"))), batch_size=1)
    assert caught.value.code == "too_many_transactions"


# -- POST /v1/banks --------------------------------------------------------------------------------------------------


def bank(**overrides: Any) -> dict[str, Any]:
    urls = {k: f"https://connector.example/{k}" for k in ("notification", "availableAccounts", "auth", "reAuth")}
    return {"name": "Example Bank", "countryCode": "GB", "url": "https://bank.example", "externalRef": "agg-1",
            "supportiframe": True, "callbackURLs": urls, **overrides}


async def test_banks_create_and_update(raw: Raw, emulator: SageEmulator) -> None:
    status, answer, _ = await raw.call("POST", "/v1/banks", {"data": {"toCreate": [bank()]}})
    assert status == 200
    created = answer["data"]["created"][0]
    assert created["externalRef"] == "agg-1" and created["principalId"]
    update = bank(principalId=created["principalId"], name="Renamed")
    status, answer, _ = await raw.call("POST", "/v1/banks", {"data": {"toUpdate": [update]}})
    assert answer["data"]["updated"][0]["name"] == "Renamed"
    assert emulator.banks[created["principalId"]]["name"] == "Renamed"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ([{"toCreate": [bank()]}], 400, "invalid_body"),
        ({"data": [{"toCreate": [bank()]}]}, 400, "invalid_body"),
        ({"data": {"toCreate": [bank(name="")]}}, 400, "invalid_bank"),
        ({"data": {"toCreate": [{k: v for k, v in bank().items() if k != "url"}]}}, 400, "invalid_bank"),
        ({"data": {"toCreate": [bank(callbackURLs={"notification": "https://x/n"})]}}, 400, "invalid_callback_urls"),
        ({"data": {"toCreate": [bank(callbackURLs={**bank()["callbackURLs"], "auth": "/auth"})]}}, 400,
         "invalid_callback_urls"),
        ({"data": {"toUpdate": [bank(principalId="unknown")]}}, 404, "unknown_bank"),
    ],
)
async def test_banks_refuses_bad_bodies(raw: Raw, body: Any, status: int, code: str) -> None:
    got, answer, _ = await raw.call("POST", "/v1/banks", body)
    assert (got, answer["error"]) == (status, code)


# -- rate limit and faults -------------------------------------------------------------------------------------------


async def test_rate_limit_window() -> None:
    async with SageEmulator(rate=3) as emulator, guarded_session([emulator.base_url]) as session:
        raw = Raw(emulator, session)
        statuses = [(await raw.call("GET", "/v1/statements/x"))[0] for _ in range(4)]
        assert statuses == [404, 404, 404, 429]
        assert emulator.count_429 == 1
        _, _, headers = await raw.call("GET", "/v1/statements/x")
        assert int(headers["Retry-After"]) >= 1
        assert (await raw.get_token())[0] == 200  # Sage ID does not count


async def test_fault_injection(raw: Raw, emulator: SageEmulator) -> None:
    emulator.fail_next(503, count=2)
    emulator.fail_next(500, path_prefix="/oauth/token")
    assert (await raw.get_token())[0] == 500
    assert [(await raw.call("GET", "/v1/statements/x"))[0] for _ in range(3)] == [503, 503, 404]
    emulator.throttle(1, retry_after=7)
    status, _, headers = await raw.call("GET", "/v1/statements/x")
    assert (status, headers["Retry-After"]) == (429, "7")
    emulator.throttle(1, retry_after=None)
    status, _, headers = await raw.call("GET", "/v1/statements/x")
    assert status == 429 and "Retry-After" not in headers
    assert emulator.count_429 == 2

    emulator.delay_next(0.3)
    started = asyncio.get_running_loop().time()
    assert (await raw.call("GET", "/v1/statements/x"))[0] == 404
    assert asyncio.get_running_loop().time() - started >= 0.29


async def test_stop_does_not_wait_for_a_hung_request() -> None:
    emulator = SageEmulator()
    await emulator.start()
    emulator.delay_next(60)
    async with guarded_session([emulator.base_url], timeout=0.3) as session:
        with pytest.raises(asyncio.TimeoutError):
            await Raw(emulator, session).call("GET", "/v1/statements/x")
    started = datetime.now()
    await emulator.stop()
    assert (datetime.now() - started).total_seconds() < 2
