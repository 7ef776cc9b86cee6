"""The feed inside ``connector serve``: woken by a bank-account notification, not waiting for its interval."""
# ruff: noqa: F811  (pytest fixtures imported from feed_provider are parameters of the tests)

from __future__ import annotations

from datetime import timedelta

import pytest
from feed_provider import (  # noqa: F401 - fixtures
    FEED_BANK_ID,
    connector,
    link_accounts,
    plugins,
    today,
    world,
)

from connector.storage import models
from connector.testing.connector import eventually


@pytest.fixture
def connector_extra():
    return {"feed": {"enabled": True, "interval_seconds": 3600}}


async def test_a_linked_account_is_fed_at_once(sage, sage_calls, browser, world, connector):
    [account] = world.open_user("gina")
    start = today() - timedelta(days=10)
    world.daily(account.provider_account_id, start, 6)
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "gina", start=start)

    async def fed():
        return len(sage.transactions_by_account.get(bank_account_id, [])) == 6 and await models.LinkedAccount.exists(
            bank_account_id=bank_account_id, feed_state="live")

    await eventually(fed, timeout=10)
    assert connector.app.ctx.feed.lease.held

    async def metrics():
        async with sage_calls.http.get(f"{connector.url}/metrics") as resp:
            text = await resp.text()
        return text if 'connector_feed_accounts{reason="",state="live"} 1.0' in text else None

    text = await eventually(metrics, timeout=5)  # spec 7.41: feed states in the metrics
    assert 'connector_statements_total{outcome="sent"} 1.0' in text
    assert f'connector_feed_lag_seconds{{bank_account="{bank_account_id}"}}' in text
    # Deleted in Sage: the feed is woken, and the account is stopped for good.
    external_id = (await models.Account.get(provider_account_id=account.provider_account_id)).external_id
    await sage_calls.account_deleted(bank_account_id, external_id, bank_id=FEED_BANK_ID)
    await eventually(lambda: models.LinkedAccount.exists(bank_account_id=bank_account_id, feed_state="stopped"))
