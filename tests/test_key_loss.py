"""A connector whose keys can't open what is stored answers clearly (503, key id logged), never with a crash."""

from __future__ import annotations

import logging

from connector.security.crypto import key_id
from connector.testing.connector import new_encryption_key
from connector.testing.fixtures import SageCalls


def _raw(key: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))


async def test_available_accounts_with_a_dropped_key(sage, connector_factory, database_url, http, browser, caplog):
    key_a, key_b = new_encryption_key(), new_encryption_key()
    first = await connector_factory(extra={"security": {"encryption_keys": [key_a]}})
    external_id = (await SageCalls.for_connector(sage, first, http).onboard(browser, "frank")).external_ids[0]
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
