"""ConnectPay → the statement feed → Sage, end to end, as a third party would test it: only the public fixtures of
``connector.testing.fixtures`` (``sage``, ``connector_factory``, ``sage_calls``, ``browser``, ``feed``) plus the
ConnectPay emulator, everything over real HTTP.

Accounts are linked through the real journey (PSD2 on ConnectPay's page, BaaS with email, password and SMS code),
Sage's bank-account-created notification starts their feed, and ``feed.run_once()`` reads ConnectPay and posts
statements to the Sage emulator, which enforces Sage's statement rules.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from connector.feed import unique_id
from connector.feed.testing import settings_to_config
from connector.testing.connector import write_config
from connector.testing.connectpay import ConnectPayEmulator, entry
from connector.testing.fixtures import DEMO_BANK_ID

PSD2_BANK = "8e7f9a2c-0000-4000-8000-0000000000e1"
BAAS_BANK = "8e7f9a2c-0000-4000-8000-0000000000e2"
BANKS = [
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
    {"sage_bank_id": PSD2_BANK, "name": "ConnectPay", "provider": "connectpay", "options": {"mode": "psd2"}},
    {"sage_bank_id": BAAS_BANK, "name": "ConnectPay Business", "provider": "connectpay",
     "options": {"mode": "baas"}},
]
CHOOSE = "Choose the accounts to share with Sage"
SHARE = "Share with Sage"
START = "2020-01-01T00:00:00Z"  # covers every booked entry the emulator holds
BATCH = 2  # small statements, so balances must chain from one statement to the next
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def cp() -> AsyncIterator[ConnectPayEmulator]:
    async with ConnectPayEmulator() as emulator:
        yield emulator


@pytest.fixture
async def connector(connector_factory, cp, tmp_path):
    """Demo Bank plus one ConnectPay bank per mode, ConnectPay pointing at the emulator; statements of two."""
    key_file = tmp_path / "connectpay-rsa-public.pem"
    key_file.write_bytes(cp.public_key_pem())
    running = await connector_factory(banks=BANKS, providers={"demobank": {}, "connectpay": cp.provider_config(key_file)},
                                      extra={"sage": {"statement_batch_size": BATCH}})
    cp.redirect_urls.append(f"{running.url}/providers/connectpay/callback")
    return running


@pytest.fixture
def browser(browser, cp):
    browser.foreign = (cp.tls_base_url,)
    return browser


# --- helpers ----------------------------------------------------------------------------------------------------


def back_with_state(page, state: str) -> None:
    assert page.left_to is not None, (page.h1, page.text)
    assert parse_qs(urlsplit(page.left_to).query)["state"] == [state]


def offered(page) -> list[str]:
    return [c.value for f in page.forms for c in f.controls if c.name == "account"]


async def open_psd2(browser, sage_calls, **auth):
    """Sage's notification, /auth (or /authrefresh), our 'Continue to ConnectPay' page, then ConnectPay's page."""
    authorisation_id = await sage_calls.announce(PSD2_BANK)
    state = "st-" + authorisation_id
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=PSD2_BANK, state=state, **auth))
    assert page.h1 == "Continue to ConnectPay", page.text
    url, _ = page.link("Continue to ConnectPay")
    page = await browser.get(url)
    assert page.has_button("Allow")
    return state, page


async def link_all(sage, sage_calls, browser, bank: str, page, state: str) -> dict[str, tuple[str, str]]:
    """Share every offered account, then Sage's bank-account-created notification for each (``requestedStartDate``
    before every booked entry): accountIdentifier → (externalId, bankAccountId)."""
    assert page.h1 == CHOOSE, page.text
    back = await browser.submit(page, {"account": offered(page)}, button=SHARE)
    back_with_state(back, state)
    linked: dict[str, tuple[str, str]] = {}
    for account in sage.patches[-1].body["data"]["bankAccounts"]:
        external_id = account["bankAccountExternalId"]
        linked[account["accountIdentifier"]] = (
            external_id, await sage_calls.account_created(external_id, requested_start_date=START, bank_id=bank))
    return linked


def expected_ids(cp: ConnectPayEmulator, bank_account_id: str, resource_id: str, currency: str) -> set[str]:
    return {unique_id(bank_account_id, "connectpay", e["transactionId"]) for e in cp.accounts[resource_id].booked
            if e["transactionAmount"]["currency"] == currency and e.get("status", "booked") == "booked"}


def current_balance(cp: ConnectPayEmulator, resource_id: str, currency: str) -> Decimal:
    account = cp.accounts[resource_id]
    [money] = [b["balanceAmount"] for b in account.balances if b["balanceAmount"]["currency"] == currency]
    amount = Decimal(money["amount"])
    closing = [b for b in account.balances if b["balanceType"] == "closingBooked"]
    if closing:  # a closing balance plus what was booked after its reference date
        amount += sum((Decimal(e["transactionAmount"]["amount"]) for e in account.booked
                       if e["bookingDate"] > closing[0]["referenceDate"] and e.get("status", "booked") == "booked"),
                      Decimal(0))
    return amount


async def feed_run_cli(connector, tmp_path) -> tuple[int | None, str, str]:
    """``connector feed run --once`` as an operator runs it, against the same database and Sage emulator."""
    config = write_config(tmp_path / "config.toml", settings_to_config(connector.settings, logging={"level": "ERROR"}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", "feed", "run", "--once", "--config", str(config), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(), err.decode()


def check_delivered(sage, cp, bank_account_id: str, resource_id: str, currency: str) -> list[dict]:
    """Every booked entry of this account and currency reached Sage exactly once, pending ones never; statements
    chain their balances, oldest first, ending at ConnectPay's current balance."""
    got = sage.transactions_by_account.get(bank_account_id, [])
    assert len(got) == len(set(got)), "a transaction was sent twice"
    assert set(got) == expected_ids(cp, bank_account_id, resource_id, currency)
    statements = [s for s in sage.statements_for(bank_account_id) if s["transactionDetails"]]
    previous = None
    for data in statements:
        txs = data["transactionDetails"]
        assert 1 <= len(txs) <= BATCH
        balances = data["accountDetails"][0]["balances"]
        if previous is not None:
            assert balances["ledgerBalance"] == previous + sum((t["transactionAmount"] for t in txs), Decimal(0))
        previous = balances["ledgerBalance"]
        assert data["accountDetails"][0]["status"] == "active"
    assert previous == current_balance(cp, resource_id, currency)
    return statements


# --- psd2 -------------------------------------------------------------------------------------------------------


async def test_psd2_history_reaches_sage_once_and_balances_chain(sage, sage_calls, browser, feed, cp):
    state, page = await open_psd2(browser, sage_calls)
    linked = await link_all(sage, sage_calls, browser, PSD2_BANK, await browser.submit(page, button="Allow"), state)
    accounts = {"LT601010012345678901": ("LT-ACC-0001", "EUR"),
                "EUR:LT601010012345678902": ("LT-ACC-0002-XXX", "EUR"),
                "USD:LT601010012345678902": ("LT-ACC-0002-XXX", "USD")}
    assert sorted(linked) == sorted(accounts)  # the blocked account is not offered

    report = await feed.run_once()
    assert report.ok, report.lines()
    for identifier, (resource_id, currency) in accounts.items():
        bank_account_id = linked[identifier][1]
        statements = check_delivered(sage, cp, bank_account_id, resource_id, currency)
        outcome = report.outcomes[bank_account_id]
        assert outcome.state == "live" and outcome.statements == len(statements)
        assert sage.account_status[bank_account_id] == "active"
    main = linked["LT601010012345678901"][1]
    assert report.outcomes[main].transactions == 5  # the pending card payment is not among them
    descriptions = [t["description"] for s in sage.statements_for(main) for t in s["transactionDetails"]]
    assert "Pending card payment" not in " ".join(descriptions)

    # Nothing new at ConnectPay: the next run sends nothing.
    posts = len(sage.requests_to("/v1/statements", "POST"))
    report = await feed.run_once()
    assert report.ok and len(sage.requests_to("/v1/statements", "POST")) == posts


@pytest.mark.parametrize("lapse", ["expired", "revoked"])
async def test_psd2_lost_consent_sends_one_auth_required_then_authrefresh_catches_up(
    sage, sage_calls, browser, connector, feed, cp, tmp_path, lapse
):
    state, page = await open_psd2(browser, sage_calls)
    page = await browser.submit(page, button="Allow")
    linked = await link_all(sage, sage_calls, browser, PSD2_BANK, page, state)
    external_id, bank_account_id = linked["LT601010012345678901"]
    assert (await feed.run_once()).ok
    check_delivered(sage, cp, bank_account_id, "LT-ACC-0001", "EUR")
    assert sage.account_status[bank_account_id] == "active"

    # The refresh token lapses (or the person withdraws consent) at ConnectPay; new entries are booked meanwhile.
    cp.expire_grants() if lapse == "expired" else cp.revoke_all()
    cp.book("LT-ACC-0001", "tx-new-1", "-42.00", text="Train tickets")
    cp.book("LT-ACC-0001", "tx-new-2", "310.00", text="Invoice 1003")
    code, out, err = await feed_run_cli(connector, tmp_path)  # `feed run` exits 1 and names the account
    assert code == 1, (out, err)
    [line] = [line for line in out.splitlines() if line.startswith(bank_account_id)]
    assert "auth_required" in line and "authRequired sent" in line, line
    notices = [s for s in sage.statements_for(bank_account_id)
               if s["accountDetails"][0]["status"] == "authRequired"]
    assert len(notices) == 1 and notices[0]["transactionDetails"] == []
    assert sage.account_status[bank_account_id] == "authRequired"
    # Every account of the lost consent gets its own single notice, in the same run.
    for _, other in linked.values():
        assert other in out
        assert sum(1 for s in sage.statements_for(other) if s["accountDetails"][0]["status"] == "authRequired") == 1

    # A second run while the consent is still lost: reported again, nothing more sent.
    posts = len(sage.requests_to("/v1/statements", "POST"))
    report = await feed.run_once()
    assert not report.ok
    outcome = report.outcomes[bank_account_id]
    assert (outcome.state, outcome.notices, outcome.statements) == ("auth_required", 0, 0)
    assert len(sage.requests_to("/v1/statements", "POST")) == posts

    # /authrefresh: ConnectPay's page again, back to Sage, consent active; the next run catches up.
    state, page = await open_psd2(browser, sage_calls, path="/authrefresh", externalId=external_id,
                                  bankaccount=bank_account_id)
    back_with_state(await browser.submit(page, button="Allow"), state)
    assert sage.patches[-1].body == {"data": {"status": "success"}}
    report = await feed.run_once()
    assert report.ok, report.lines()
    assert report.outcomes[bank_account_id].transactions == 2
    check_delivered(sage, cp, bank_account_id, "LT-ACC-0001", "EUR")
    assert sage.account_status[bank_account_id] == "active"
    assert sum(1 for s in sage.statements_for(bank_account_id)
               if s["accountDetails"][0]["status"] == "authRequired") == 1


# --- baas -------------------------------------------------------------------------------------------------------


async def test_baas_booked_entries_reach_sage_pending_ones_do_not(sage, sage_calls, browser, feed, cp):
    authorisation_id = await sage_calls.announce(BAAS_BANK)
    state = "st-" + authorisation_id
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=BAAS_BANK, state=state))
    page = await browser.submit(page, {"Email address": "anna@example.com", "Password": "correct horse battery"},
                                button="Sign in")
    page = await browser.submit(page, {"Code": cp.last_otp}, button="Confirm")
    linked = await link_all(sage, sage_calls, browser, BAAS_BANK, page, state)
    [(_, bank_account_id)] = linked.values()

    report = await feed.run_once()
    assert report.ok, report.lines()
    check_delivered(sage, cp, bank_account_id, "BAAS-ACC-1", "EUR")
    assert report.outcomes[bank_account_id].transactions == 3  # pe-pend-1 is pending: not sent
    assert current_balance(cp, "BAAS-ACC-1", "EUR") == Decimal("1200.00")  # closing 1000 + 250 − 50 after it

    # A new booked entry at ConnectPay, and two pending ones (one among the booked, marked by its status): the next
    # run sends exactly the booked one.
    cp.book("BAAS-ACC-1", "pe-0004", "80.00", text="Refund", counterparty="Shop")
    cp.accounts["BAAS-ACC-1"].pending.append(entry("pe-pend-2", cp.clock.now().date(), "-9.00", status="pending"))
    cp.accounts["BAAS-ACC-1"].booked.append(entry("pe-pend-3", cp.clock.now().date(), "-5.00", status="pending"))
    report = await feed.run_once()
    assert report.ok, report.lines()
    assert report.outcomes[bank_account_id].transactions == 1
    check_delivered(sage, cp, bank_account_id, "BAAS-ACC-1", "EUR")
