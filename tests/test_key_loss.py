"""A connector whose keys can't open what is stored answers clearly (503, key id logged), never with a crash."""

from __future__ import annotations

import logging

from connector.security.crypto import key_id
from connector.testing.connector import new_encryption_key


def _raw(key: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))


async def test_available_accounts_with_a_dropped_key(sage, connector_factory, database_url, http, caplog):
    from connector.testing.fixtures import SageCalls
    from connector.testing.driver import Driver

    key_a, key_b = new_encryption_key(), new_encryption_key()
    first = await connector_factory(extra={"security": {"encryption_keys": [key_a]}})
    calls = SageCalls(sage, first.endpoints, first.url, http)
    browser = Driver(http, stop_at=(sage.base_url,))
    page = await browser.get(calls.auth_url(await calls.announce()))
    page = await browser.submit(page, {"User name": "frank", "Password": "x"}, button="Sign in")
    await browser.submit(page, button="Share with Sage")
    external_id = sage.patches[0].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    await first.stop()

    second = await connector_factory(database=database_url, extra={"security": {"encryption_keys": [key_b]}})
    token = sage.identity.provider_api_token()
    with caplog.at_level(logging.ERROR):
        async with http.get(f"{second.url}/availableaccounts", params={"externalId": external_id},
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            body = await resp.json()
    assert resp.status == 503
    assert body["error"] == "temporarily_unavailable"
    assert any(key_id(_raw(key_a)).hex() in r.getMessage() for r in caplog.records)
