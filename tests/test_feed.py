"""The statement feed end to end: real connector, real Sage emulator (which enforces Sage's statement rules), accounts
linked through the real onboarding journey and bank-account notifications."""
# ruff: noqa: F811  (pytest fixtures imported from feed_provider are parameters of the tests)

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from feed_provider import (  # noqa: F401 - fixtures
    FEED_BANK_ID,
    World,
    connector,
    connector_extra,
    link_accounts,
    make_feed,
    plugins,
    today,
    world,
)

from connector.feed.statements import UNIQUE_ID_NAMESPACE
from connector.storage import models
from connector.testing.connector import eventually
from connector.testing.fixtures import DEMO_BANK_ID
from plugins.demobank import mapping as demo


@pytest.fixture
def connector_extra():
    return {"sage": {"statement_batch_size": 10}}


def check_chain(sage, bank_account_id: str, final_balance: Decimal, batch_size: int = 10) -> list[dict]:
    """Every rule we promise, on top of the emulator's: sizes, spans, order, balances chaining to today's balance."""
    sent = [s for s in sage.statements_for(bank_account_id) if s["transactionDetails"]]
    assert sent
    previous_balance = None
    previous_last = None
    for data in sent:
        txs = data["transactionDetails"]
        assert 1 <= len(txs) <= batch_size
        dates = [t["datePosted"] for t in txs]
        assert dates == sorted(dates)
        assert all(d.endswith("T12:00:00.000Z") for d in dates)
        first, last = (demo_date(dates[0]), demo_date(dates[-1]))
        assert last - first <= timedelta(days=14)
        if previous_last is not None:
            assert first >= previous_last  # oldest first across statements too
        previous_last = last
        balances = data["accountDetails"][0]["balances"]
        total = sum((t["transactionAmount"] for t in txs), Decimal(0))
        if previous_balance is not None:
            assert balances["ledgerBalance"] == previous_balance + total
        assert balances["availableBalance"] == balances["ledgerBalance"]
        assert balances["ledgerBalanceDate"] == dates[-1] == balances["availableBalanceDate"]
        previous_balance = balances["ledgerBalance"]
        expected = data["expected"]
        assert expected["transactionDetailsCount"] == len(txs) and expected["accountDetailsCount"] == 1
        assert expected["transactionCreditSum"] == sum((t["transactionAmount"] for t in txs
                                                        if t["transactionAmount"] > 0), Decimal(0))
        assert expected["transactionDebitSum"] == sum((t["transactionAmount"] for t in txs
                                                       if t["transactionAmount"] < 0), Decimal(0))
        for t in txs:
            assert t["transactionAmount"] != 0
            assert t["transactionType"] == ("CREDIT" if t["transactionAmount"] > 0 else "DEBIT")
            assert t["transactionStatus"] == "posted" and t["bankAccountId"] == bank_account_id
    assert previous_balance == final_balance
    return sent


def demo_date(value: str):
    from datetime import date

    return date.fromisoformat(value[:10])


def assert_exactly_once(sage, bank_account_id: str, expected_ids: set[str]) -> None:
    got = sage.transactions_by_account.get(bank_account_id, [])
    assert len(got) == len(set(got)), "a transaction was sent twice"
    assert set(got) == expected_ids


async def test_demo_bank_history_goes_out_in_checked_batches(sage, sage_calls, browser, make_feed):
    sage.batch_size = 10
    ids = await link_accounts(browser, sage_calls, sage, "alice", bank_id=DEMO_BANK_ID,
                              start="2020-01-01T00:00:00Z")
    feed = make_feed()
    report = await feed.run_once()
    assert report.ok, report.lines()
    yesterday = today() - timedelta(days=1)
    for bank_account_id, suffix in zip(ids, ("current", "savings")):
        pid = f"alice-{suffix}"
        sent = check_chain(sage, bank_account_id, demo.balance_for("alice", pid, yesterday).amount)
        history = demo.transactions_between(pid, today() - timedelta(days=90), yesterday)
        assert len(sent) == 9 and sum(len(s["transactionDetails"]) for s in sent) == 90
        assert_exactly_once(sage, bank_account_id, {
            str(uuid.uuid5(UNIQUE_ID_NAMESPACE, f"{bank_account_id}\ndemobank\n{t.provider_transaction_id}"))
            for t in history})
        assert sage.account_status[bank_account_id] == "active"
        outcome = report.outcomes[bank_account_id]
        assert (outcome.state, outcome.statements, outcome.transactions) == ("live", 9, 90)
        link = await models.LinkedAccount.get(bank_account_id=bank_account_id)
        assert (link.feed_state, link.feed_reason) == ("live", "")
        cursor = await models.FeedCursor.get(linked_account_id=link.id)
        assert cursor.sync_point == today().isoformat() and cursor.sent_transactions == 90
    # Amounts are plain JSON numbers in the bytes Sage received (not strings, no exponent).
    raw = next(r.body for r in sage.requests_to("/v1/statements", "POST"))
    parsed = json.loads(raw, parse_float=lambda text: ("number", text))
    amount = parsed["data"]["transactionDetails"][0]["transactionAmount"]
    assert amount[0] == "number" and "e" not in amount[1].lower()
    # A second run has nothing new: nothing is sent.
    posts = len(sage.requests_to("/v1/statements", "POST"))
    report = await feed.run_once()
    assert report.ok and len(sage.requests_to("/v1/statements", "POST")) == posts
    assert all(o.statements == 0 for o in report.outcomes.values())


async def test_each_run_reads_only_what_is_new(sage, sage_calls, browser, make_feed, world: World):
    [account] = world.open_user("bob")
    start = today() - timedelta(days=40)
    world.daily(account.provider_account_id, start, 30)
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "bob", start=start)
    feed = make_feed()
    assert (await feed.run_once()).ok
    assert len(sage.transactions_by_account[bank_account_id]) == 30
    first_read = world.reads[-1]
    assert first_read["sync_point"] is None and first_read["returned"] == 30

    added = [world.add(account.provider_account_id, today() - timedelta(days=1), "-4.20"),
             world.add(account.provider_account_id, today(), "12.00", description="  Refund \n from   shop ")]
    report = await feed.run_once()
    assert report.ok
    read = world.reads[-1]
    assert read["sync_point"] == "30" and read["returned"] == 4  # the two new ones plus a re-read overlap of two
    last = sage.statements_for(bank_account_id)[-1]
    assert [t["transactionAmount"] for t in last["transactionDetails"]] == [Decimal("-4.20"), Decimal("12.00")]
    assert last["transactionDetails"][1]["description"] == "Refund from shop"
    assert last["accountDetails"][0]["balances"]["ledgerBalance"] == world.books[account.provider_account_id].balance()
    assert report.outcomes[bank_account_id].transactions == 2
    got = sage.transactions_by_account[bank_account_id]
    assert len(got) == len(set(got)) == 32
    assert {a.provider_transaction_id for a in added} <= {
        t.provider_transaction_id for t in world.books[account.provider_account_id].log}


async def test_late_future_removed_and_missing_balance(sage, sage_calls, browser, make_feed, world: World):
    [account] = world.open_user("carol")
    pid = account.provider_account_id
    book = world.books[pid]
    start = today() - timedelta(days=20)
    world.daily(pid, start, 10)
    book.no_balance = True
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "carol", start=start)
    feed = make_feed()

    # No balance: the transactions are kept, nothing is sent, the account is held.
    report = await feed.run_once()
    assert not report.ok
    assert (report.outcomes[bank_account_id].state, report.outcomes[bank_account_id].reason) == \
        ("held", "balance_unavailable")
    assert bank_account_id not in sage.transactions_by_account

    # The bank drops one stored (unsent) transaction and gives a balance again.
    dropped = book.log[3].provider_transaction_id
    world.remove(pid, dropped)
    book.no_balance = False
    assert (await feed.run_once()).ok
    assert len(sage.transactions_by_account[bank_account_id]) == 9
    check_chain(sage, bank_account_id, book.balance())

    # Booked late (dated before what was already sent), one dated tomorrow, one zero, one before the start date.
    late = world.add(pid, start + timedelta(days=2), "-7.00")
    future = world.add(pid, today() + timedelta(days=1), "100.00")
    world.add(pid, today() - timedelta(days=1), "0.00")
    world.add(pid, start - timedelta(days=5), "-1.00")
    normal = world.add(pid, today(), "3.00")
    report = await feed.run_once()
    assert report.ok
    late_stmt, normal_stmt = sage.statements_for(bank_account_id)[-2:]
    assert [t["datePosted"][:10] for t in late_stmt["transactionDetails"]] == [late.booking_date.isoformat()]
    assert late_stmt["accountDetails"][0]["balances"]["ledgerBalanceDate"] >= \
        sage.statements_for(bank_account_id)[-3]["transactionDetails"][-1]["datePosted"]
    assert [t["datePosted"][:10] for t in normal_stmt["transactionDetails"]] == [normal.booking_date.isoformat()]
    # The tomorrow-dated transaction waits; the balance sent is today's balance without it.
    assert normal_stmt["accountDetails"][0]["balances"]["ledgerBalance"] == book.balance() - future.amount
    cursor = await models.FeedCursor.get(linked_account__bank_account_id=bank_account_id)
    assert (cursor.late_booked, cursor.skipped_zero, cursor.skipped_early) == (1, 1, 1)
    waiting = await models.FeedTransaction.filter(linked_account__bank_account_id=bank_account_id,
                                                  statement_id=None).values_list("provider_transaction_id", flat=True)
    assert waiting == [future.provider_transaction_id]
    assert len(sage.transactions_by_account[bank_account_id]) == 11


async def test_a_second_bank_account_for_the_same_account_gets_its_history_again(
        sage, sage_calls, browser, make_feed, world: World):
    [account] = world.open_user("dave")
    start = today() - timedelta(days=30)
    world.daily(account.provider_account_id, start, 25)
    [first] = await link_accounts(browser, sage_calls, sage, "dave", start=start)
    feed = make_feed()
    assert (await feed.run_once()).ok
    external_id = (await models.Account.get(provider_account_id=account.provider_account_id)).external_id

    # Reconnected (or linked in a second Sage company): a new bankAccountId for the same externalId.
    second = await sage_calls.account_created(external_id, requested_start_date=f"{start.isoformat()}T00:00:00Z",
                                              bank_id=FEED_BANK_ID)
    assert await models.LinkedAccount.exists(bank_account_id=second)
    await sage_calls.account_deleted(first, external_id, bank_id=FEED_BANK_ID)
    assert await models.LinkedAccount.exists(bank_account_id=first, deleted_at__isnull=False)
    world.add(account.provider_account_id, today(), "-2.50")
    report = await feed.run_once()
    assert report.ok and first not in report.outcomes
    old, new = sage.transactions_by_account[first], sage.transactions_by_account[second]
    assert len(old) == 25 and len(new) == len(set(new)) == 26
    assert not set(old) & set(new)  # new uniqueIds: derived from the new bankAccountId
    consent = await models.Consent.get(provider_consent_id="dave")
    assert consent.status == "active" and consent.secrets_sealed  # one linked account remains: no offboarding


async def test_consent_lost_sends_one_auth_required_per_account_then_catches_up(
        sage, sage_calls, browser, make_feed, world: World):
    accounts = world.open_user("erin", accounts=3)
    start = today() - timedelta(days=10)
    for account in accounts:
        world.daily(account.provider_account_id, start, 5)
    first_two = await link_accounts(browser, sage_calls, sage, "erin", start=start, only=[0, 1])
    feed = make_feed()
    assert (await feed.run_once()).ok

    world.lost.add("erin")
    missed = [world.add(a.provider_account_id, today(), "-9.99") for a in accounts[:2]]
    report = await feed.run_once()
    assert not report.ok
    notices = [s["data"] for s in sage.statements if s["data"]["accountDetails"][0]["status"] == "authRequired"]
    assert sorted(n["principalId"] for n in notices) == sorted(first_two)
    for notice in notices:  # spec 3.5.6, with zero totals
        account_id = notice["principalId"]
        assert notice == {
            "principalId": account_id, "bankId": FEED_BANK_ID,
            "expected": {"transactionDetailsCount": 0, "accountDetailsCount": 1, "transactionCreditSum": 0,
                         "transactionDebitSum": 0},
            "accountDetails": [{"bankAccountId": account_id, "status": "authRequired", "balances": {}}],
            "transactionDetails": []}
        assert sage.account_status[account_id] == "authRequired"
        assert report.outcomes[account_id].state == "auth_required"
    consent = await models.Consent.get(provider_consent_id="erin")
    assert (consent.status, consent.status_reason) == ("auth_required", "feedtest_consent_lost")

    # Linked while the consent is lost: it gets its notice too; nothing is sent twice on later runs.
    external_ids = [(await models.Account.get(provider_account_id=a.provider_account_id)).external_id
                    for a in accounts]
    third = await sage_calls.account_created(external_ids[2], requested_start_date=f"{start.isoformat()}T00:00:00Z",
                                             bank_id=FEED_BANK_ID)
    assert await models.LinkedAccount.exists(bank_account_id=third)
    reads = len(world.reads)
    report = await feed.run_once()
    assert not report.ok and len(world.reads) == reads  # no provider reads while the consent is lost
    notices = [s["data"]["principalId"] for s in sage.statements
               if s["data"]["accountDetails"][0]["status"] == "authRequired"]
    assert sorted(notices) == sorted(first_two + [third])

    # Re-authorisation: the journey sets the consent active; the feed resumes where it stopped.
    authorisation_id = await sage_calls.announce(FEED_BANK_ID)
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=FEED_BANK_ID, path="/authrefresh",
                                                 externalId=external_ids[0], bankaccount=first_two[0]))
    done = await browser.submit(page, {"User name": "erin"}, button="Sign in")
    assert done.left_to is not None, done.text
    assert sage.patches[-1].body == {"data": {"status": "success"}}
    report = await feed.run_once()
    assert report.ok, report.lines()
    for account_id, tx in zip(first_two, missed):
        got = sage.transactions_by_account[account_id]
        assert len(got) == len(set(got)) == 6
        assert sage.statements_for(account_id)[-1]["accountDetails"][0]["status"] == "active"
    assert len(sage.transactions_by_account[third]) == 5  # its history, after the consent came back
    assert len([s for s in sage.statements if s["data"]["accountDetails"][0]["status"] == "authRequired"]) == 3


async def test_deleted_account_stops_and_the_last_one_offboards_the_consent(
        sage, sage_calls, browser, make_feed, world: World):
    import asyncio

    [account] = world.open_user("frank")
    start = today() - timedelta(days=40)
    world.daily(account.provider_account_id, start, 30)
    [bank_account_id] = await link_accounts(browser, sage_calls, sage, "frank", start=start)
    sage.processing_polls = 10_000  # the first statement stays in flight
    feed = make_feed(batch_size=10)
    run = asyncio.create_task(feed.run_once())
    await eventually(lambda: sage.statements)
    external_id = (await models.Account.get(provider_account_id=account.provider_account_id)).external_id
    await sage_calls.account_deleted(bank_account_id, external_id, bank_id=FEED_BANK_ID)
    report = await asyncio.wait_for(run, 10)
    assert report.outcomes[bank_account_id].state == "stopped"
    assert len(sage.statements) == 1  # nothing more was posted
    link = await models.LinkedAccount.get(bank_account_id=bank_account_id)
    assert (link.feed_state, link.feed_reason) == ("stopped", "deleted_in_sage")
    statuses = await models.FeedStatement.filter(linked_account_id=link.id).values_list("status", flat=True)
    assert set(statuses) == {"abandoned"} and len(statuses) == 3
    # The last linked account of the consent is gone: provider access revoked, secrets erased.
    consent = await models.Consent.get(provider_consent_id="frank")
    assert consent.status == "revoked" and consent.secrets_sealed is None
    assert {"revoked": "frank"} in world.reads
    sage.processing_polls = 0
    report = await feed.run_once()
    assert report.outcomes == {} and len(sage.statements) == 1
