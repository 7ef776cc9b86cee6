"""``GET /availableaccounts`` over real HTTP (spec 2.8; security.md T1-T7): who may call it, what it refuses, and
that it lists every account of the consent exactly as the onboarding PATCH named them.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest

from connector.storage import models
from connector.testing.sage_id import SigningKey

FIELDS = {"accountType", "accountName", "externalId", "bankIdentifier", "accountIdentifier", "branchIdentifier"}
ATTACKER = SigningKey.generate("attacker")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def call(sage_calls, query: str | None, token: str | None = None, *, authorization: str | None = None):
    url = f"{sage_calls.connector_url}/availableaccounts" + (f"?{query}" if query is not None else "")
    headers = {"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"}
    if authorization is not None:
        headers["Authorization"] = authorization
    elif token is not None:
        headers["Authorization"] = f"Bearer {token}"
    async with sage_calls.http.get(url, headers=headers, allow_redirects=False) as resp:
        assert resp.headers["Content-Type"].startswith("application/json")
        return resp.status, await resp.json(), resp.headers


def expected(patched: list[dict]) -> list[dict]:
    """What Sage should get back: the PATCH's own values, keyed as spec 2.8 names them."""
    return [{"accountType": t, "accountName": a["accountName"], "externalId": a["bankAccountExternalId"],
             "bankIdentifier": a["bankIdentifier"], "accountIdentifier": a["accountIdentifier"],
             "branchIdentifier": a["branchIdentifier"]} for a, t in zip(patched, ("business", "savings"))]


async def test_valid_external_id_gets_every_account_of_its_consent(sage, sage_calls, browser):
    alice = (await sage_calls.onboard(browser, "alice")).bank_accounts
    bob = (await sage_calls.onboard(browser, "bob")).bank_accounts
    token = sage.identity.provider_api_token()
    for account in alice:
        status, body, _ = await call(sage_calls, f"externalId={account['bankAccountExternalId']}", token)
        assert status == 200
        assert isinstance(body, list)  # a bare array, no "data" wrapper
        assert all(set(item) == FIELDS for item in body)
        assert body == expected(alice)
    status, body, _ = await call(sage_calls, f"externalId={bob[1]['bankAccountExternalId']}", token)
    assert (status, body) == (200, expected(bob))
    # Unknown parameters are ignored.
    status, body, _ = await call(sage_calls, f"externalId={bob[0]['bankAccountExternalId']}&page=2", token)
    assert (status, body) == (200, expected(bob))


async def test_already_linked_accounts_are_still_listed(sage, sage_calls, browser):
    accounts = (await sage_calls.onboard(browser, "carol")).bank_accounts
    await sage_calls.account_created(accounts[0]["bankAccountExternalId"])
    status, body, _ = await call(sage_calls, f"externalId={accounts[1]['bankAccountExternalId']}",
                                 sage.identity.provider_api_token())
    assert (status, body) == (200, expected(accounts))


async def test_stored_list_is_served_when_the_provider_cannot_answer(sage, sage_calls, browser):
    # Demo Bank: the consent is lost at the next read
    accounts = (await sage_calls.onboard(browser, "expire")).bank_accounts
    status, body, _ = await call(sage_calls, f"externalId={accounts[0]['bankAccountExternalId']}",
                                 sage.identity.provider_api_token())
    assert (status, body) == (200, expected(accounts))


@pytest.mark.parametrize("query", [None, "", "externalId", "externalId=", "externalid=x", "externalId=a&externalId=a",
                                   "externalId=" + "a" * 201])
async def test_missing_empty_or_repeated_external_id_gets_400(sage, sage_calls, query):
    status, body, _ = await call(sage_calls, query, sage.identity.provider_api_token())
    assert (status, body["error"]) == (400, "invalid_request")


@pytest.mark.parametrize("value", [str(uuid.uuid4()), "x", "a" * 37, "a" * 200, "%00", "' OR 1=1 --", "%2e%2e%2f"])
async def test_unknown_external_id_gets_404(sage, sage_calls, browser, value):
    await sage_calls.onboard(browser, "dan")
    status, body, _ = await call(sage_calls, f"externalId={value}", sage.identity.provider_api_token())
    assert (status, body["error"]) == (404, "unknown_external_id")


async def test_offboarded_consent_gets_404(sage, sage_calls, browser):
    accounts = (await sage_calls.onboard(browser, "erin")).bank_accounts
    token = sage.identity.provider_api_token()
    ids = [a["bankAccountExternalId"] for a in accounts]
    links = [await sage_calls.account_created(external_id) for external_id in ids]
    assert await models.LinkedAccount.filter(bank_account_id__in=links).count() == 2  # before Sage deletes them
    for bank_account_id, external_id in zip(links, ids):
        await sage_calls.account_deleted(bank_account_id, external_id)
    consent = await models.Consent.get(accounts__external_id=ids[0])
    assert consent.status == "revoked" and consent.secrets_sealed is None
    for external_id in ids:
        status, body, _ = await call(sage_calls, f"externalId={external_id}", token)
        assert (status, body["error"]) == (404, "unknown_external_id")


async def test_tokens_are_checked_like_on_notification(sage, sage_calls, browser):
    [account, _] = (await sage_calls.onboard(browser, "finn")).bank_accounts
    query = f"externalId={account['bankAccountExternalId']}"
    ident = sage.identity
    now = int(time.time())
    claims = ident.claims("ProviderAPI")
    refused = {
        "no token": None,
        "alg none": f"{b64(json.dumps({'alg': 'none', 'kid': ident.keys[0].kid}).encode())}."
                    f"{b64(json.dumps(claims).encode())}.",
        "expired": ident.provider_api_token(exp=now - 120),
        "not yet valid": ident.provider_api_token(nbf=now + 600),
        "wrong issuer": ident.provider_api_token(iss="https://id.sage.com/"),
        "wrong audience": ident.provider_api_token(aud="someone-else"),
        "unknown kid": ident.mint("ProviderAPI", key=ATTACKER),
        "bad signature": ident.mint("ProviderAPI", key=ATTACKER, headers={"kid": ident.keys[0].kid}),
    }
    for name, token in refused.items():
        status, body, headers = await call(sage_calls, query, token)
        assert (status, body["error"]) == (401, "invalid_token"), name
        assert headers["WWW-Authenticate"] == 'Bearer error="invalid_token"', name
        assert "accountIdentifier" not in json.dumps(body)
    status, body, headers = await call(sage_calls, query, authorization=f"Basic {b64(b'sage:pw')}")
    assert (status, body["error"]) == (401, "invalid_token")
    for name, token in {"WebhooksLambda token": ident.notification_token(), "no scope": ident.mint(None)}.items():
        status, body, headers = await call(sage_calls, query, token)
        assert (status, body["error"]) == (403, "insufficient_scope"), name
        assert headers["WWW-Authenticate"] == 'Bearer error="insufficient_scope"', name
    # The token is checked before the query: a bad token with a bad query is still a 401.
    status, body, _ = await call(sage_calls, "", None)
    assert status == 401
    status, _, _ = await call(sage_calls, query, authorization=f"bearer {ident.provider_api_token()}")
    assert status == 200  # the scheme is case-insensitive


async def test_other_methods_get_405(sage, sage_calls):
    for method in ("POST", "PUT", "DELETE"):
        async with sage_calls.http.request(method, f"{sage_calls.connector_url}/availableaccounts?externalId=x",
                                           headers={"Authorization": f"Bearer {sage.identity.provider_api_token()}"}
                                           ) as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"
