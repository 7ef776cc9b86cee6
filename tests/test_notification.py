"""``POST /notification`` over real HTTP against a running connector (spec 2.2-2.3, security.md T1-T7, W1-W2, R1).

Every refused request is checked for its status, its JSON error code, and that nothing stored changed. Accepted
notifications are checked by the rows they leave behind once the after-the-answer work has run.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict

from connector.journey.consents import secrets_aad
from connector.storage import models
from connector.testing.fixtures import DEMO_BANK_ID
from connector.testing.sage_id import SigningKey

CAP = 64 * 1024
OTHER_BANK_ID = "5e0c1a55-0b6b-4c0e-9d6e-3b7f3c9e2a11"
ATTACKER = SigningKey.generate("attacker")  # made once: RSA key generation is the slow part


# --- helpers --------------------------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def authorisation(authorisation_id: str | None = None, bank_id: str = DEMO_BANK_ID) -> dict[str, Any]:
    return {"type": "resourceCreated",
            "resource": {"id": authorisation_id or str(uuid.uuid4()), "type": "authorisation", "url": "NA"},
            "additionalData": {"bankId": bank_id}}


def account_created(external_id: str, bank_account_id: str | None = None, **extra: str) -> dict[str, Any]:
    return {"type": "resourceCreated",
            "resource": {"id": bank_account_id or str(uuid.uuid4()), "type": "bankAccount", "url": ""},
            "additionalData": {"externalId": external_id, **extra}}


async def snapshot() -> dict[str, Any]:
    """Everything a notification could change, to compare before and after a refused request."""
    return {
        "notifications": await models.Notification.all().order_by("id").values(),
        "authorisations": await models.Authorisation.all().order_by("id").values(),
        "links": await models.LinkedAccount.all().order_by("id").values(),
        "consents": await models.Consent.all().order_by("id").values("id", "status", "secrets_sealed"),
    }


async def post(sage_calls, body: Any = None, *, headers: Any = None, raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    async with sage_calls.http.post(f"{sage_calls.connector_url}/notification", data=data,
                                    headers=headers if headers is not None else sage_calls.headers()) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None), resp.headers


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 exchange on a plain socket, for what a client library won't send (raw bytes in a header)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def processed(sage_calls, key: str) -> models.Notification:
    """The notification row once its after-the-answer work has run."""
    if sage_calls.settle is not None:
        await sage_calls.settle()
    row = await models.Notification.get_or_none(dedupe_key=key)
    assert row is None or row.outcome != "error", f"processing notification {key} failed"
    assert row is not None and row.processed_at is not None and row.outcome, \
        f"notification {key} was not processed: {row and row.outcome!r}"
    return row


# --- Sage ID token on /notification ---------------------------------------------------------------------------------


def _bad_tokens(sage) -> dict[str, str]:
    ident = sage.identity
    key = ident.keys[0]
    claims = ident.claims("WebhooksLambda")
    now = int(time.time())
    pem = key.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)
    hs_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": key.kid}, claims)
    hs256 = f"{hs_input}.{b64(hmac.new(pem, hs_input.encode(), hashlib.sha256).digest())}"
    good = ident.notification_token()
    head, payload, sig = good.split(".")
    flipped = sig[:-2] + ("A" if sig[-2] != "A" else "B") + sig[-1]
    return {
        "alg none": unsigned({"alg": "none", "typ": "JWT", "kid": key.kid}, claims) + ".",
        "HS256 signed with the public key": hs256,
        "expired": ident.notification_token(exp=now - 120, iat=now - 3600),
        "not yet valid (nbf)": ident.notification_token(nbf=now + 600),
        "issued in the future (iat)": ident.notification_token(iat=now + 600),
        "wrong issuer": ident.notification_token(iss="https://id.sage.com/"),
        "issuer without the trailing slash": ident.notification_token(iss=ident.issuer.rstrip("/")),
        "wrong audience": ident.notification_token(aud="sfdsbanking/sfdsBankingProvider"),
        "no audience": ident.notification_token(aud=None),
        "no exp": ident.notification_token(exp=None),
        "unknown kid": ident.mint("WebhooksLambda", key=ATTACKER),
        "attacker key behind a known kid": ident.mint("WebhooksLambda", key=ATTACKER, headers={"kid": key.kid}),
        "bad signature": f"{head}.{payload}.{flipped}",
        "payload changed": f"{head}.{b64(json.dumps({**claims, 'sub': 'x'}).encode())}.{sig}",
        "not a JWS": "not-a-token",
        "RS384": ident.mint("WebhooksLambda", algorithm="RS384"),
    }


def logged(caplog) -> str:
    """Every captured log record with its structured fields, as one string to search."""
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)


async def test_every_bad_token_gets_401_with_www_authenticate_and_stores_nothing(sage, sage_calls, caplog):
    caplog.set_level("DEBUG")
    before = await snapshot()
    bad = _bad_tokens(sage)
    for name, token in bad.items():
        status, body, headers = await post(sage_calls, authorisation(), headers=sage_calls.headers(token))
        assert status == 401, name
        assert body["error"] == "invalid_token", name
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', name
        assert token not in json.dumps(body), name
    refused = {"missing": None, "Basic scheme": "Basic dXNlcjpwYXNz", "empty bearer": "Bearer "}
    for name, authorization in refused.items():
        headers = sage_calls.headers()
        if authorization is None:
            del headers["Authorization"]
        else:
            headers["Authorization"] = authorization
        status, body, resp_headers = await post(sage_calls, authorisation(), headers=headers)
        assert (status, body["error"]) == (401, "invalid_token"), name
        assert resp_headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', name
    assert await snapshot() == before
    text = logged(caplog)
    assert "token refused" in text
    for token in bad.values():
        for segment in token.split("."):
            assert len(segment) < 8 or segment not in text  # no token, nor any part of one, in a log line


async def test_missing_or_wrong_scope_gets_403_insufficient_scope(sage, sage_calls):
    ident = sage.identity
    before = await snapshot()
    for name, token in {
        "ProviderAPI token": ident.provider_api_token(),
        "no scope": ident.mint(None),
        "our own client-credentials shape": ident.mint("banking:read"),
        "scope as a prefix": ident.mint("WebhooksLambdaX"),
    }.items():
        status, body, headers = await post(sage_calls, authorisation(), headers=sage_calls.headers(token))
        assert (status, body["error"]) == (403, "insufficient_scope"), name
        assert headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"', name
    assert await snapshot() == before


async def test_scope_accepted_in_scope_scp_or_permissions(sage, sage_calls):
    ident = sage.identity
    for token in (ident.mint("openid WebhooksLambda"), ident.mint(["WebhooksLambda"]),
                  ident.mint(None, scp="WebhooksLambda"), ident.mint(None, permissions=["WebhooksLambda"])):
        status, body, _ = await post(sage_calls, authorisation(), headers=sage_calls.headers(token))
        assert (status, body) == (200, {"status": "accepted"})


# --- the custom header (W1) -----------------------------------------------------------------------------------------


async def test_custom_header_missing_wrong_twice_or_non_ascii_gets_401_and_stores_nothing(sage_calls, connector,
                                                                                           caplog):
    caplog.set_level("DEBUG")
    name, value = connector.endpoints.notification_header_name, connector.endpoints.notification_header_value
    before = await snapshot()
    wrong_same_length = ("A" if value[0] != "A" else "B") + value[1:]
    wrong_last_byte = value[:-1] + ("A" if value[-1] != "A" else "B")
    cases: dict[str, Any] = {
        "missing": None,
        "empty": "",
        "wrong, same length": wrong_same_length,
        "wrong last byte": wrong_last_byte,
        "shorter": value[:-1],
        "longer": value + "A",
    }
    for case, given in cases.items():
        headers = sage_calls.headers()
        if given is None:
            del headers[name]
        else:
            headers[name] = given
        status, body, _ = await post(sage_calls, authorisation(), headers=headers)
        assert (status, body["error"]) == (401, "invalid_notification_header"), case
    # Sent twice, even with the right value both times.
    twice = CIMultiDict(sage_calls.headers())
    twice.add(name, value)
    status, body, _ = await post(sage_calls, authorisation(), headers=twice)
    assert (status, body["error"]) == (401, "invalid_notification_header")
    # Non-ASCII bytes in the value (a client library won't send them, so a plain socket does).
    payload = json.dumps(authorisation()).encode()
    for bad in (value.encode() + "é".encode(), "é".encode() + value.encode()[1:], b"\xff" + value.encode()[1:]):
        head = (b"POST /notification HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                b"Content-Type: application/json\r\n"
                + f"Authorization: Bearer {sage_calls.sage.identity.notification_token()}\r\n".encode()
                + name.encode() + b": " + bad + b"\r\n"
                + f"Content-Length: {len(payload)}\r\n\r\n".encode())
        status, raw = await raw_request(connector.port, head, payload)
        assert status == 401 and json.loads(raw)["error"] == "invalid_notification_header"
    assert await snapshot() == before
    assert value not in logged(caplog) and value[:12] not in logged(caplog)


async def test_custom_header_name_matches_in_any_case(sage_calls, connector):
    name = connector.endpoints.notification_header_name
    for spelled in (name.lower(), name.upper(), name.swapcase()):
        headers = sage_calls.headers()
        headers[spelled] = headers.pop(name)
        status, body, _ = await post(sage_calls, authorisation(), headers=headers)
        assert (status, body) == (200, {"status": "accepted"}), spelled


async def test_header_is_checked_before_the_token(sage_calls, connector):
    headers = sage_calls.headers("not-a-token")
    del headers[connector.endpoints.notification_header_name]
    status, body, _ = await post(sage_calls, authorisation(), headers=headers)
    assert (status, body["error"]) == (401, "invalid_notification_header")


# --- body: size, content type, JSON, envelope (R1, spec 2.3) --------------------------------------------------------


def _padded(size: int) -> bytes:
    body = json.dumps(authorisation()).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


async def test_body_of_exactly_64_kib_is_accepted_and_one_byte_more_gets_413(sage_calls):
    before = await snapshot()
    status, body, _ = await post(sage_calls, raw=_padded(CAP + 1))
    assert (status, body["error"]) == (413, "payload_too_large")
    # The size is checked first: no header, no token, still 413.
    status, body, _ = await post(sage_calls, raw=_padded(CAP + 1), headers={"Content-Type": "application/json"})
    assert (status, body["error"]) == (413, "payload_too_large")
    assert await snapshot() == before
    status, body, _ = await post(sage_calls, raw=_padded(CAP))
    assert (status, body) == (200, {"status": "accepted"})


async def test_chunked_body_over_the_cap_gets_413(sage_calls):
    before = await snapshot()
    data = _padded(CAP + 10)

    async def chunks():
        for i in range(0, len(data), 4096):
            yield data[i:i + 4096]

    async with sage_calls.http.post(f"{sage_calls.connector_url}/notification", data=chunks(),
                                    headers=sage_calls.headers()) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"] == "payload_too_large"
    assert await snapshot() == before


async def test_content_type_not_json_gets_415(sage_calls):
    before = await snapshot()
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx", "", "text/json"):
        headers = sage_calls.headers()
        headers["Content-Type"] = content_type
        status, body, _ = await post(sage_calls, authorisation(), headers=headers)
        assert (status, body["error"]) == (415, "unsupported_media_type"), content_type
    assert await snapshot() == before
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        headers = sage_calls.headers()
        headers["Content-Type"] = content_type
        status, _, _ = await post(sage_calls, authorisation(), headers=headers)
        assert status == 200, content_type


MALFORMED = {
    "empty body": b"",
    "not JSON": b"type=resourceCreated",
    "truncated": b'{"type": "resourceCreated", "resource": {',
    "not UTF-8": b'{"type": "\xff\xfe"}',
    "deeply nested": b"[" * 30000 + b"]" * 30000,
    "NaN": b'{"type": "resourceCreated", "resource": {"id": "x", "type": "y"}, "additionalData": {"n": NaN}}',
    "huge integer": b'{"type": "resourceCreated", "resource": {"id": "x", "type": "y"}, "n": ' + b"9" * 5000 + b"}",
}


def _wrong_types() -> dict[str, Any]:
    auth = authorisation()
    return {
        "an array": [auth],
        "a string": "resourceCreated",
        "null": None,
        "type missing": {k: v for k, v in auth.items() if k != "type"},
        "type a number": {**auth, "type": 1},
        "type empty": {**auth, "type": ""},
        "type too long": {**auth, "type": "resourceCreated" * 5},
        "resource missing": {k: v for k, v in auth.items() if k != "resource"},
        "resource a string": {**auth, "resource": "authorisation"},
        "resource.id a number": {**auth, "resource": {"id": 12, "type": "authorisation"}},
        "resource.id empty": {**auth, "resource": {"id": "", "type": "authorisation"}},
        "resource.id too long": {**auth, "resource": {"id": "a" * 65, "type": "authorisation"}},
        "resource.type missing": {**auth, "resource": {"id": str(uuid.uuid4())}},
        "authorisation id not a UUID": {**auth, "resource": {"id": "not-a-uuid", "type": "authorisation"}},
        "additionalData a list": {**auth, "additionalData": [DEMO_BANK_ID]},
        "bankId a number": {**auth, "additionalData": {"bankId": 7}},
        "bankId missing": {**auth, "additionalData": {}},
        "bankId too long": {**auth, "additionalData": {"bankId": DEMO_BANK_ID * 2}},
        "externalId missing": account_created("x") | {"additionalData": {"bankId": DEMO_BANK_ID}},
        "externalId a number": account_created("x") | {"additionalData": {"externalId": 5}},
        "requestedStartDate not a date": account_created(str(uuid.uuid4()), requestedStartDate="yesterday"),
        "requestedStartDate a number": account_created(str(uuid.uuid4()), requestedStartDate=20250101),
    }


async def test_malformed_or_wrongly_typed_json_gets_400_and_stores_nothing(sage_calls):
    before = await snapshot()
    for name, raw in MALFORMED.items():
        status, body, _ = await post(sage_calls, raw=raw)
        assert (status, body["error"]) == (400, "invalid_request"), name
        assert "Traceback" not in body["message"], name
    for name, envelope in _wrong_types().items():
        status, body, _ = await post(sage_calls, envelope)
        assert (status, body["error"]) == (400, "invalid_request"), name
    assert await snapshot() == before


# --- the notification types -----------------------------------------------------------------------------------------


async def test_authorisation_created_is_stored_before_the_answer(sage_calls, connector):
    authorisation_id = str(uuid.uuid4())
    before = datetime.now(UTC)
    status, body, _ = await post(sage_calls, authorisation(authorisation_id))
    assert (status, body) == (200, {"status": "accepted"})
    # No waiting: both rows exist as soon as the 200 has arrived.
    assert await models.Notification.exists(dedupe_key=f"resourceCreated:authorisation:{authorisation_id}")
    row = await models.Authorisation.get(id=authorisation_id)
    assert row.sage_bank_id == DEMO_BANK_ID and row.used_at is None
    ttl = connector.settings.security["authorisation_ttl_seconds"]
    assert before + timedelta(seconds=ttl - 5) <= row.expires_at <= datetime.now(UTC) + timedelta(seconds=ttl)
    assert (await processed(sage_calls, f"resourceCreated:authorisation:{authorisation_id}")).outcome == "stored"


async def test_authorisation_id_in_capitals_is_stored_canonically(sage_calls, browser):
    authorisation_id = str(uuid.uuid4())
    status, _, _ = await post(sage_calls, authorisation(authorisation_id.upper()))
    assert status == 200
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")


async def test_one_authorisation_id_in_two_spellings_at_once_is_one_authorisation_used_once(sage_calls, browser):
    authorisation_id = str(uuid.uuid4())
    results = await asyncio.gather(*(post(sage_calls, authorisation(spelling))
                                     for spelling in (authorisation_id.upper(), authorisation_id) * 2))
    assert [(s, b) for s, b, _ in results] == [(200, {"status": "accepted"})] * 4
    assert await models.Notification.filter(resource_id__in=[authorisation_id, authorisation_id.upper()]).count() == 2
    assert await models.Authorisation.filter(id=authorisation_id).count() == 1
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    assert (page.status, page.h1) == (200, "Sign in to Demo Bank")
    # A later repeat, in either spelling, gives the used authorisation no second life.
    for spelling in (authorisation_id, authorisation_id.upper()):
        assert (await post(sage_calls, authorisation(spelling)))[0] == 200
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    assert page.status == 410


async def test_a_new_notification_and_repeats_of_a_stored_one_at_once(sage_calls, caplog):
    stored, fresh = authorisation(), authorisation()
    assert (await post(sage_calls, stored))[0] == 200
    changed = stored | {"additionalData": {"bankId": DEMO_BANK_ID, "note": "changed"}}
    results = await asyncio.gather(*(post(sage_calls, body) for body in (stored, fresh, changed, fresh)))
    assert [s for s, _, _ in results] == [200] * 4
    for body in (stored, fresh):
        rid = body["resource"]["id"]
        assert await models.Notification.filter(resource_id=rid).count() == 1
        assert await models.Authorisation.filter(id=rid).count() == 1
    row = await models.Notification.get(resource_id=stored["resource"]["id"])
    assert row.payload == stored  # the first is kept
    assert "repeated notification differs from the first" in caplog.text


async def test_authorisation_for_an_unconfigured_bank_is_stored_and_auth_refused(sage_calls, browser):
    bank = str(uuid.uuid4())
    authorisation_id = str(uuid.uuid4())
    status, _, _ = await post(sage_calls, authorisation(authorisation_id, bank))
    assert status == 200
    assert await models.Authorisation.exists(id=authorisation_id)
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=bank))
    assert page.status == 403 and page.h1 == "This bank isn't available here"
    page.link("Back to Sage")


async def test_a_nul_character_gets_400_on_every_database_and_spoils_no_neighbour(sage_calls):
    # PostgreSQL can store no U+0000 in text or JSON: refused up front, the same on SQLite, and a notification
    # written in the same group commit is stored all the same.
    before = await snapshot()
    bad = [authorisation() | {"additionalData": {"bankId": DEMO_BANK_ID, "note": "a\u0000b"}},
           {"type": "resourceCreated", "resource": {"id": "a\u0000b", "type": "somethingNew", "url": "NA"}},
           {"type": "resourceCreated", "resource": {"id": "x", "type": "somethingNew", "url": "NA"},
            "additionalData": {"\u0000": 1}}]
    good = authorisation()
    results = await asyncio.gather(*(post(sage_calls, body) for body in [*bad, good]))
    assert [(s, b["error"]) for s, b, _ in results[:-1]] == [(400, "invalid_request")] * len(bad)
    assert results[-1][:2] == (200, {"status": "accepted"})
    assert await models.Authorisation.exists(id=good["resource"]["id"])
    assert len((await snapshot())["notifications"]) == len(before["notifications"]) + 1


async def test_the_same_notification_five_times_concurrently_gives_one_row(sage_calls):
    body = authorisation()
    results = await asyncio.gather(*(post(sage_calls, body) for _ in range(5)))
    assert [(s, b) for s, b, _ in results] == [(200, {"status": "accepted"})] * 5
    rid = body["resource"]["id"]
    assert await models.Notification.filter(resource_id=rid).count() == 1
    assert await models.Authorisation.filter(id=rid).count() == 1


async def test_repeat_with_other_additional_data_keeps_the_first(sage_calls):
    authorisation_id = str(uuid.uuid4())
    first = authorisation(authorisation_id, DEMO_BANK_ID)
    assert (await post(sage_calls, first))[0] == 200
    second = authorisation(authorisation_id, OTHER_BANK_ID)
    status, body, _ = await post(sage_calls, second)
    assert (status, body) == (200, {"status": "accepted"})
    [row] = await models.Notification.filter(resource_id=authorisation_id)
    assert row.payload == first
    assert (await models.Authorisation.get(id=authorisation_id)).sage_bank_id == DEMO_BANK_ID


async def test_unknown_types_are_stored_and_ignored(sage_calls):
    before = await snapshot()
    cases = [
        {"type": "resourceUpdated", "resource": {"id": str(uuid.uuid4()), "type": "authorisation"},
         "additionalData": {"bankId": DEMO_BANK_ID}},
        {"type": "resourceDeleted", "resource": {"id": str(uuid.uuid4()), "type": "authorisation", "url": "NA"}},
        {"type": "resourceCreated", "resource": {"id": "anything-at-all", "type": "statement"}},
        {"type": "somethingNew", "resource": {"id": str(uuid.uuid4()), "type": "somethingElse"}, "extra": [1, 2]},
    ]
    for body in cases:
        status, answer, _ = await post(sage_calls, body)
        assert (status, answer) == (200, {"status": "accepted"})
        key = f"{body['type']}:{body['resource']['type']}:{body['resource']['id']}"
        assert (await processed(sage_calls, key)).outcome == "ignored"
    after = await snapshot()
    assert len(after["notifications"]) == len(before["notifications"]) + len(cases)
    assert {k: v for k, v in after.items() if k != "notifications"} == \
        {k: v for k, v in before.items() if k != "notifications"}


async def test_bank_account_created_links_once_even_when_sent_five_times_concurrently(sage, sage_calls, browser):
    external_id, _ = (await sage_calls.onboard(browser)).external_ids
    body = account_created(external_id, requestedStartDate="2025-01-01T00:00:00Z", bankId=DEMO_BANK_ID)
    results = await asyncio.gather(*(post(sage_calls, body) for _ in range(5)))
    assert [s for s, _, _ in results] == [200] * 5
    bank_account_id = body["resource"]["id"]
    row = await processed(sage_calls, f"resourceCreated:bankAccount:{bank_account_id}")
    assert row.outcome == "linked"
    assert await models.Notification.filter(resource_id=bank_account_id).count() == 1
    [link] = await models.LinkedAccount.filter(bank_account_id=bank_account_id).prefetch_related("account")
    assert link.account.external_id == external_id
    assert link.requested_start_date == date(2025, 1, 1)
    assert link.sage_bank_id == DEMO_BANK_ID and link.deleted_at is None


async def test_bank_account_from_candidate_without_start_date_or_bank_starts_today(sage, sage_calls, browser):
    _, external_id = (await sage_calls.onboard(browser)).external_ids
    body = account_created(external_id)  # no requestedStartDate, no bankId
    status, _, _ = await post(sage_calls, body)
    assert status == 200
    bank_account_id = body["resource"]["id"]
    assert (await processed(sage_calls, f"resourceCreated:bankAccount:{bank_account_id}")).outcome == "linked"
    link = await models.LinkedAccount.get(bank_account_id=bank_account_id)
    assert link.requested_start_date == datetime.now(UTC).date()


async def test_compound_external_id_matches_the_known_part(sage, sage_calls, browser):
    external_id, _ = (await sage_calls.onboard(browser)).external_ids
    for compound in (f"{uuid.uuid4()}:{external_id}", f"{external_id}:{uuid.uuid4()}"):
        body = account_created(compound, requestedStartDate="2025-02-01T00:00:00Z")
        assert (await post(sage_calls, body))[0] == 200
        bank_account_id = body["resource"]["id"]
        assert (await processed(sage_calls, f"resourceCreated:bankAccount:{bank_account_id}")).outcome == "linked"
        link = await models.LinkedAccount.get(bank_account_id=bank_account_id).prefetch_related("account")
        assert link.account.external_id == external_id


async def test_bank_account_for_an_unknown_external_id_is_stored_and_links_nothing(sage, sage_calls, browser):
    a, b = (await sage_calls.onboard(browser)).external_ids
    for external_id in (str(uuid.uuid4()), f"{uuid.uuid4()}:{uuid.uuid4()}", f"{a}:{b}"):
        body = account_created(external_id)
        assert (await post(sage_calls, body))[0] == 200
        key = f"resourceCreated:bankAccount:{body['resource']['id']}"
        assert (await processed(sage_calls, key)).outcome == "unmatched"
    assert await models.LinkedAccount.all().count() == 0


async def test_bank_account_deleted_stops_the_feed_and_the_last_one_erases_the_consent(sage, sage_calls, browser):
    first, second = (await sage_calls.onboard(browser)).external_ids
    one = await sage_calls.account_created(first)
    two = await sage_calls.account_created(second)
    for bank_account_id in (one, two):
        await processed(sage_calls, f"resourceCreated:bankAccount:{bank_account_id}")
    consent = await models.Consent.get(accounts__external_id=first)
    assert consent.status == "active" and consent.secrets_sealed

    # Deleting the first: its feed stops, the consent keeps its secrets (the other account still feeds).
    body = {"type": "resourceDeleted", "resource": {"id": one, "type": "bankAccount", "url": "NA"},
            "additionalData": {"externalId": first, "bankId": DEMO_BANK_ID}}
    results = await asyncio.gather(*(post(sage_calls, body) for _ in range(5)))
    assert [s for s, _, _ in results] == [200] * 5
    assert (await processed(sage_calls, f"resourceDeleted:bankAccount:{one}")).outcome == "stopped"
    link = await models.LinkedAccount.get(bank_account_id=one)
    assert link.feed_state == "stopped" and link.deleted_at is not None
    assert (await models.LinkedAccount.get(bank_account_id=two)).feed_state != "stopped"
    consent = await models.Consent.get(id=consent.id)
    assert consent.status == "active" and consent.secrets_sealed

    # Deleting the last: the consent is revoked and its secrets erased.
    await sage_calls.account_deleted(two, second)
    assert (await processed(sage_calls, f"resourceDeleted:bankAccount:{two}")).outcome == "stopped"
    consent = await models.Consent.get(id=consent.id)
    assert consent.secrets_sealed is None
    assert consent.status == "revoked"


async def test_bank_account_deleted_for_an_unknown_account_changes_nothing(sage_calls):
    before = await snapshot()
    bank_account_id = str(uuid.uuid4())
    await sage_calls.account_deleted(bank_account_id, str(uuid.uuid4()))
    assert (await processed(sage_calls, f"resourceDeleted:bankAccount:{bank_account_id}")).outcome == "unknown_account"
    after = await snapshot()
    assert after["links"] == before["links"] and after["consents"] == before["consents"]


async def test_secrets_of_an_offboarded_consent_cannot_be_read_back(sage, sage_calls, browser, connector):
    first, second = (await sage_calls.onboard(browser, "frank")).external_ids
    consent = await models.Consent.get(accounts__external_id=first)
    assert connector.app.ctx.box.open_json(consent.secrets_sealed, secrets_aad(consent.id))["user"] == "frank"
    ids = [await sage_calls.account_created(first), await sage_calls.account_created(second)]
    for bank_account_id, external_id in zip(ids, (first, second)):
        await processed(sage_calls, f"resourceCreated:bankAccount:{bank_account_id}")
        await sage_calls.account_deleted(bank_account_id, external_id)
        await processed(sage_calls, f"resourceDeleted:bankAccount:{bank_account_id}")
    assert (await models.Consent.get(id=consent.id)).secrets_sealed is None


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_other_methods_get_405_json(sage_calls, method):
    async with sage_calls.http.request(method, f"{sage_calls.connector_url}/notification",
                                       headers=sage_calls.headers()) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"


async def test_storage_unavailable_gets_503_and_a_retry_is_stored(sage_calls):
    from tortoise import Tortoise

    body = authorisation()
    db = Tortoise.get_connection("default")
    await db.execute_script("ALTER TABLE authorisation RENAME TO authorisation_away")
    try:
        status, answer, headers = await post(sage_calls, body)
        assert (status, answer["error"]) == (503, "temporarily_unavailable")
        assert "Retry-After" in headers
    finally:
        await db.execute_script("ALTER TABLE authorisation_away RENAME TO authorisation")
    assert not await models.Notification.exists(resource_id=body["resource"]["id"])  # rolled back with the rest
    status, answer, _ = await post(sage_calls, body)
    assert (status, answer) == (200, {"status": "accepted"})
    assert await models.Authorisation.exists(id=body["resource"]["id"])


async def test_last_two_deletions_at_once_erase_the_consent_once(sage, sage_calls, browser):
    for user in ("gina", "hal", "ines"):
        first, second = (await sage_calls.onboard(browser, user)).external_ids
        ids = [await sage_calls.account_created(first), await sage_calls.account_created(second)]
        for bank_account_id in ids:
            await processed(sage_calls, f"resourceCreated:bankAccount:{bank_account_id}")
        await asyncio.gather(sage_calls.account_deleted(ids[0], first), sage_calls.account_deleted(ids[1], second))
        # "revoked" is never seen while secrets are still stored.
        consent = await models.Consent.get(accounts__external_id=first)
        assert consent.status == "revoked"
        assert consent.secrets_sealed is None
        for bank_account_id in ids:
            await processed(sage_calls, f"resourceDeleted:bankAccount:{bank_account_id}")
        assert (await models.Consent.get(id=consent.id)).secrets_sealed is None
