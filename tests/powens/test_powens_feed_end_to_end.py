"""Powens → the statement feed → Sage, end to end, as a third party would test it: only the public fixtures of
``connector.testing.fixtures`` (``sage``, ``connector_factory``, ``sage_calls``, ``browser``, ``feed``) plus the Powens
emulator, everything over real HTTP.

Accounts are linked through the real credentials journey, Sage's bank-account-created notification starts their
feed, and ``feed.run_once()`` reads Powens (paged, ``coming`` rows left out) and posts statements to the Sage
emulator, which enforces Sage's statement rules. Powens webhooks arrive through the core's
``/providers/powens/webhook`` and make the feed read inside the provider's poll interval.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs, urlsplit

import pytest

from connector.feed import unique_id
from connector.testing.fixtures import DEMO_BANK_ID
from connector.testing.powens import CREDENTIALS_BANK, PowensEmulator

CREDENTIALS = "6d7c3c1e-0001-4a00-8000-00000000c0de"
BANKS = [
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
    {"sage_bank_id": CREDENTIALS, "name": "Credentials Bank", "provider": "powens", "provider_bank": CREDENTIALS_BANK},
]
CHOOSE = "Choose the accounts to share with Sage"
PASSWORD = "s3cret pass"
WEBHOOK_PATH = "/providers/powens/webhook"
START = "2020-01-01T00:00:00Z"  # covers every transaction the emulator holds
BATCH = 3


@pytest.fixture
async def powens_api() -> AsyncIterator[PowensEmulator]:
    async with PowensEmulator() as emulator:
        emulator.page_size = 2  # every read pages
        yield emulator


@pytest.fixture
async def connector(connector_factory, powens_api):
    config = powens_api.config(requests_per_minute=100_000, sync_timeout_seconds=5, timeout_seconds=5)
    running = await connector_factory(banks=BANKS, providers={"demobank": {}, "powens": config},
                                      extra={"sage": {"statement_batch_size": BATCH}})
    powens_api.webhook_url = f"{running.url}{WEBHOOK_PATH}"  # registered in Powens's console
    return running


@pytest.fixture
def browser(browser, powens_api):
    browser.foreign = (powens_api.root,)
    return browser


# --- helpers ----------------------------------------------------------------------------------------------------


def back_with_state(page, state: str) -> None:
    assert page.left_to is not None, (page.status, page.h1, page.text)
    assert parse_qs(urlsplit(page.left_to).query)["state"] == [state]


async def open_auth(browser, sage_calls, **auth):
    authorisation_id = await sage_calls.announce(CREDENTIALS)
    state = "st-" + authorisation_id
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=CREDENTIALS, state=state, **auth))
    return state, page


async def link_all(sage, sage_calls, browser, powens: PowensEmulator) -> dict[int, tuple[str, str]]:
    """Sign in, share every account, then Sage's bank-account-created notification for each:
    Powens account id → (externalId, bankAccountId)."""
    state, page = await open_auth(browser, sage_calls)
    page = await browser.submit(page, {"Customer number": "alice", "Password": PASSWORD}, button="Continue")
    assert page.h1 == CHOOSE, page.text
    ids = [c.value for f in page.forms for c in f.controls if c.name == "account"]
    back_with_state(await browser.submit(page, {"account": ids}, button="Share with Sage"), state)
    by_name = {a.name: a.id for a in powens.accounts.values()}
    linked = {}
    for account in sage.patches[-1].body["data"]["bankAccounts"]:
        external_id = account["bankAccountExternalId"]
        linked[by_name[account["accountName"].split(" ••")[0]]] = (
            external_id, await sage_calls.account_created(external_id, requested_start_date=START,
                                                          bank_id=CREDENTIALS))
    assert len(linked) == 2
    return linked


def add(powens: PowensEmulator, account_id: int, value: str, wording: str, *, days_ago: int = 0,
        coming: bool = False) -> int:
    """A new transaction at the bank; a booked one moves the account's balance."""
    if not coming:
        powens.accounts[account_id].balance += Decimal(value)
    today = datetime.now(UTC).date()  # Sage's today (the emulator's clock may have been moved on)
    return powens.add_transaction(account_id, value, wording, on=today - timedelta(days=days_ago), coming=coming)


def book(powens: PowensEmulator, transaction_id: int) -> None:
    tx = powens.transactions[transaction_id]
    powens.book(transaction_id)
    powens.accounts[tx.account_id].balance += tx.value


def notices(sage, bank_account_id: str) -> int:
    return sum(1 for s in sage.statements_for(bank_account_id) if s["accountDetails"][0]["status"] == "authRequired")


def check_delivered(sage, powens: PowensEmulator, account_id: int, bank_account_id: str) -> None:
    """Every booked Powens transaction of the account reached Sage exactly once, ``coming`` ones never; statements
    chain their balances, oldest first, ending at Powens's balance of the account."""
    got = sage.transactions_by_account.get(bank_account_id, [])
    assert len(got) == len(set(got)), "a transaction was sent twice"
    booked = [t for t in powens.transactions.values() if t.account_id == account_id and not t.coming
              and t.deleted is None]
    assert set(got) == {unique_id(bank_account_id, "powens", str(t.id)) for t in booked}
    previous = None
    for data in (s for s in sage.statements_for(bank_account_id) if s["transactionDetails"]):
        txs = data["transactionDetails"]
        assert 1 <= len(txs) <= BATCH
        balances = data["accountDetails"][0]["balances"]
        if previous is not None:
            assert balances["ledgerBalance"] == previous + sum((t["transactionAmount"] for t in txs), Decimal(0))
        previous = balances["ledgerBalance"]
    assert previous == powens.accounts[account_id].balance


def transaction_reads(powens: PowensEmulator) -> list:
    return [c for c in powens.calls if c.method == "GET" and c.path.endswith("/transactions")]


# --- tests ------------------------------------------------------------------------------------------------------


async def test_paged_history_then_only_new_transactions_after_a_webhook(sage, sage_calls, browser, feed, powens_api):
    linked = await link_all(sage, sage_calls, browser, powens_api)
    current = next(a.id for a in powens_api.accounts.values() if a.name == "Business current account")
    for days_ago in (30, 21, 20, 9):  # more history than one page, more than one statement
        add(powens_api, current, f"-{days_ago}.40", f"CB SHOP {days_ago}", days_ago=days_ago)
    assert any(t.coming for t in powens_api.transactions.values())  # "CB PENDING FUEL" waits at the bank

    report = await feed.run_once()
    assert report.ok, report.lines()
    for account_id, (_, bank_account_id) in linked.items():
        check_delivered(sage, powens_api, account_id, bank_account_id)
        assert report.outcomes[bank_account_id].state == "live"
        assert sage.account_status[bank_account_id] == "active"
    assert report.outcomes[linked[current][1]].transactions == 7
    first = transaction_reads(powens_api)
    assert any("cursor" in c.query for c in first)  # followed Powens's next links
    assert all("min_date" in c.query and "last_update" not in c.query for c in first)

    # New rows at the bank: two booked, one coming, and a pending one booked since. Inside the poll interval with
    # no webhook, the feed does not read Powens and sends nothing.
    powens_api.advance(600)
    pending = next(t.id for t in powens_api.transactions.values() if t.account_id == current and t.coming)
    book(powens_api, pending)
    new = [add(powens_api, current, "-18.90", "CB BAKERY"), add(powens_api, current, "250.00", "VIR CLIENT"),
           add(powens_api, current, "-7.00", "CB PARKING", coming=True)]
    posts = len(sage.requests_to("/v1/statements", "POST"))
    report = await feed.run_once()
    assert report.ok and len(sage.requests_to("/v1/statements", "POST")) == posts
    assert len(transaction_reads(powens_api)) == len(first)

    # Powens's CONNECTION_SYNCED webhook: the next run reads incrementally and sends exactly the new booked rows.
    [connection_id] = powens_api.connections
    assert await powens_api.send_webhook("CONNECTION_SYNCED", connection_id) == 200
    report = await feed.run_once()
    assert report.ok, report.lines()
    outcome = report.outcomes[linked[current][1]]
    assert (outcome.state, outcome.transactions) == ("live", 3)
    later = transaction_reads(powens_api)[len(first):]
    assert later and all("last_update" in c.query and "min_date" not in c.query for c in later)
    last = sage.statements_for(linked[current][1])[-1]["transactionDetails"]
    assert {t["uniqueId"] for t in last} == {unique_id(linked[current][1], "powens", str(i))
                                             for i in (pending, *new[:2])}
    for account_id, (_, bank_account_id) in linked.items():
        check_delivered(sage, powens_api, account_id, bank_account_id)


async def test_sca_required_sends_one_auth_required_then_authrefresh_catches_up(
    sage, sage_calls, browser, feed, powens_api
):
    linked = await link_all(sage, sage_calls, browser, powens_api)
    current = next(a.id for a in powens_api.accounts.values() if a.name == "Business current account")
    external_id, bank_account_id = linked[current]
    assert (await feed.run_once()).ok
    [connection_id] = powens_api.connections

    # Powens's background sync lands in SCARequired and says so by webhook; the bank keeps booking meanwhile.
    powens_api.advance(600)
    add(powens_api, current, "-64.00", "CB TRAIN")
    assert await powens_api.background_sync(connection_id, state="SCARequired") == 200
    report = await feed.run_once()
    assert not report.ok
    for _, other in linked.values():
        outcome = report.outcomes[other]
        assert (outcome.state, outcome.notices, outcome.statements) == ("auth_required", 1, 0), outcome.line()
        assert "authRequired sent" in outcome.line()
        assert notices(sage, other) == 1 and sage.account_status[other] == "authRequired"

    # Still lost: reported again, nothing more sent.
    posts = len(sage.requests_to("/v1/statements", "POST"))
    report = await feed.run_once()
    assert report.outcomes[bank_account_id].state == "auth_required" and not report.ok
    assert len(sage.requests_to("/v1/statements", "POST")) == posts

    # /authrefresh clears the SCA at Powens (same connection); the next run catches up.
    state, page = await open_auth(browser, sage_calls, path="/authrefresh", externalId=external_id,
                                  bankaccount=bank_account_id)
    back_with_state(page, state)
    assert powens_api.connections[connection_id].state is None
    report = await feed.run_once()
    assert report.ok, report.lines()
    assert report.outcomes[bank_account_id].transactions == 1
    for account_id, (_, other) in linked.items():
        check_delivered(sage, powens_api, account_id, other)
        assert notices(sage, other) == 1
    assert sage.account_status[bank_account_id] == "active"
