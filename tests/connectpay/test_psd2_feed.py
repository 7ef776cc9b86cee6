"""psd2 feed reads: paging to the end, booked only, multi-currency, token refresh with rotation, errors, revoke."""

from __future__ import annotations

import asyncio
import json
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from cp_support import MemoryConsent, ProviderFactory, psd2_consent

from connector.testing.connectpay import ConnectPayEmulator, entry
from connector.types import Account, ActionRequired, TemporaryError
from plugins.connectpay import ConnectPay
from plugins.connectpay.client import Endpoint, Pacer

TOKEN = "/auth/v1/oauth2/token"


def account(done_accounts: Any, provider_account_id: str) -> Account:
    return next(a for a in done_accounts if a.provider_account_id == provider_account_id)


def refreshes(emulator: ConnectPayEmulator) -> int:
    return sum(1 for r in emulator.calls(TOKEN) if b"grant_type=refresh_token" in r.body)


async def test_list_accounts(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    accounts = await provider.list_accounts(consent)
    assert [a.provider_account_id for a in accounts] == ["LT-ACC-0001", "LT-ACC-0002-XXX:EUR", "LT-ACC-0002-XXX:USD"]
    assert consent.saved == []  # a fresh token is not refreshed
    assert "PSU-IP-Address" not in emulator.calls("/ob/accounts")[-1].headers  # unattended: no person's IP


async def test_read_follows_next_links_to_the_end_booked_only(
    make_provider: ProviderFactory, emulator: ConnectPayEmulator
) -> None:
    provider = make_provider(psd2={"page_size": 2})
    consent, done = await psd2_consent(provider, emulator)
    today = emulator.clock.now().date()
    main = account(done.grant.accounts, "LT-ACC-0001")

    read = await provider.read_account(consent, main, today - timedelta(days=30), None)

    ids = [t.provider_transaction_id for t in read.booked]
    assert ids == ["tx-0001", "tx-0002", "tx-0003", "tx-0004", "tx-0005"]  # pending tx-pend-1 never appears
    pages = emulator.calls("/ob/accounts/LT-ACC-0001/transactions")
    assert len(pages) == 3
    assert pages[0].query == {"dateFrom": (today - timedelta(days=30)).isoformat(), "sortOrder": "asc",
                              "pageNo": "1", "pageSize": "2"}
    assert pages[2].query["pageNo"] == "3"  # reached through _links.next
    assert read.balance is not None and read.balance.amount == Decimal("1520.44") and read.balance.currency == "EUR"
    assert read.sync_point == (today - timedelta(days=2)).isoformat()

    rent = read.booked[2]
    assert (rent.amount, rent.counterparty, rent.reference) == (Decimal("-450.00"), "Landlord Ltd", "E2E-RENT-1")
    assert read.booked[3].reference is None  # NOTPROVIDED
    assert read.booked[0].amount == Decimal("2500.00") and read.booked[0].counterparty == "Globex Ltd"
    assert isinstance(read.booked[0].booking_date, date)

    # The next read starts from the sync point minus the overlap (3 days).
    again = await provider.read_account(consent, main, today - timedelta(days=30), read.sync_point)
    assert emulator.calls("/ob/accounts/LT-ACC-0001/transactions")[-1].query["dateFrom"] == (
        today - timedelta(days=5)).isoformat()
    assert [t.provider_transaction_id for t in again.booked] == ["tx-0004", "tx-0005"]  # overlap re-read
    assert again.sync_point == read.sync_point


async def test_paging_by_page_number_when_no_next_link(
    make_provider: ProviderFactory, emulator: ConnectPayEmulator
) -> None:
    emulator.links_next = False
    provider = make_provider(psd2={"page_size": 50})
    consent, done = await psd2_consent(provider, emulator)
    start = emulator.clock.now().date() - timedelta(days=200)
    emulator.add_booked("LT-ACC-0001", 120, start=start)
    read = await provider.read_account(consent, account(done.grant.accounts, "LT-ACC-0001"), start, None)
    assert len(read.booked) == 125
    assert len({t.provider_transaction_id for t in read.booked}) == 125
    assert [r.query["pageNo"] for r in emulator.calls("/ob/accounts/LT-ACC-0001/transactions")] == ["1", "2", "3"]
    assert read.booked == sorted(read.booked, key=lambda t: t.booking_date)


async def test_multi_currency_account_is_read_per_currency(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, done = await psd2_consent(provider, emulator)
    since = emulator.clock.now().date() - timedelta(days=30)
    eur = await provider.read_account(consent, account(done.grant.accounts, "LT-ACC-0002-XXX:EUR"), since, None)
    usd = await provider.read_account(consent, account(done.grant.accounts, "LT-ACC-0002-XXX:USD"), since, None)
    assert [(t.provider_transaction_id, t.currency) for t in eur.booked] == [("fx-0001", "EUR"), ("fx-0003", "EUR")]
    assert [(t.provider_transaction_id, t.amount) for t in usd.booked] == [("fx-0002", Decimal("100.00"))]
    assert eur.balance is not None and eur.balance.amount == Decimal("300.00")
    assert usd.balance is not None and (usd.balance.amount, usd.balance.currency) == (Decimal("125.50"), "USD")
    assert all("/LT-ACC-0002-XXX/" in r.path for r in emulator.calls("/ob/accounts/LT-ACC-0002"))


async def test_balances_path_keeps_balances_in_the_account_list(
    make_provider: ProviderFactory, emulator: ConnectPayEmulator
) -> None:
    """The list's balances split a multi-currency account per currency (OP-27): without them the read fails, so the
    list keeps ``withBalance`` even when a balances endpoint is configured."""
    provider = make_provider(psd2={"balances_path": "/ob/accounts/{accountId}/balances"})
    consent, done = await psd2_consent(provider, emulator)
    since = emulator.clock.now().date() - timedelta(days=30)
    usd = await provider.read_account(consent, account(done.grant.accounts, "LT-ACC-0002-XXX:USD"), since, None)
    assert usd.balance is not None and (usd.balance.amount, usd.balance.currency) == (Decimal("125.50"), "USD")
    assert len(emulator.calls("/ob/accounts/LT-ACC-0002-XXX/balances")) == 1


async def test_refresh_before_expiry_saves_rotation_before_use(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, _done = await psd2_consent(provider, emulator)
    old = dict(consent.secrets)
    seen_at_save: list[int] = []
    consent.on_save = lambda _: seen_at_save.append(len(emulator.calls("/ob/")))
    data_calls_before = len(emulator.calls("/ob/"))
    emulator.advance(3600 - 150)  # the access token has less than 120 s left (after the 60 s skew)

    await provider.list_accounts(consent)

    assert refreshes(emulator) == 1
    assert len(consent.saved) == 1 and consent.saved_under_lock == [True]
    new = consent.saved[0]
    assert new["refresh_token"] != old["refresh_token"] and new["access_token"] != old["access_token"]
    assert seen_at_save == [data_calls_before]  # saved before any data call used the new token
    assert emulator.calls("/ob/")[-1].headers["Authorization"] == f"Bearer {new['access_token']}"
    (grant,) = emulator.active_grants()
    assert grant.refresh_token == new["refresh_token"]  # the stored token is the live one


async def test_two_concurrent_reads_make_one_refresh(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, done = await psd2_consent(provider, emulator)
    emulator.advance(3600)
    since = emulator.clock.now().date() - timedelta(days=30)
    reads = await asyncio.gather(
        provider.read_account(consent, account(done.grant.accounts, "LT-ACC-0001"), since, None),
        provider.read_account(consent, account(done.grant.accounts, "LT-ACC-0002-XXX:EUR"), since, None),
    )
    assert [len(r.booked) for r in reads] == [5, 2]
    assert refreshes(emulator) == 1
    assert len(consent.saved) == 1
    assert (await provider.list_accounts(consent))  # the stored token still works afterwards


async def test_401_on_a_data_call_refreshes_once_and_retries(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    emulator.fail_next(401, path="/ob/accounts", code="TOKEN_INVALID")
    assert len(await provider.list_accounts(consent)) == 3
    assert refreshes(emulator) == 1 and len(consent.saved) == 1


async def test_second_401_after_refresh_means_consent_lost(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    emulator.fail_next(401, path="/ob/accounts", times=2)
    with pytest.raises(ActionRequired) as caught:
        await provider.list_accounts(consent)
    assert caught.value.code == "connectpay_consent_lost"


async def test_refresh_token_expired_by_our_clock(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    emulator.advance(31 * 24 * 3600)
    with pytest.raises(ActionRequired) as caught:
        await provider.list_accounts(consent)
    assert caught.value.code == "connectpay_consent_expired"
    assert refreshes(emulator) == 0  # no call is made


async def test_revoked_refresh_token_needs_the_person(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    emulator.revoke_all()
    emulator.advance(3600)
    with pytest.raises(ActionRequired) as caught:
        await provider.list_accounts(consent)
    assert caught.value.code == "connectpay_consent_lost"
    assert "connect your ConnectPay account again" in caught.value.message
    assert caught.value.detail is not None and "invalid_grant" in caught.value.detail


async def test_an_old_rotated_refresh_token_is_refused(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    stale = MemoryConsent(consent.secrets)  # a copy that missed the rotation
    emulator.advance(3600)
    await provider.list_accounts(consent)
    with pytest.raises(ActionRequired):
        await provider.list_accounts(stale)


async def test_refresh_timeout_is_retried_once(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider(timeout_seconds=0.3)
    consent, _ = await psd2_consent(provider, emulator)
    emulator.advance(3600)
    emulator.delay_next(1.0, path=TOKEN)
    assert len(await provider.list_accounts(consent)) == 3
    assert len(consent.saved) == 1
    await asyncio.sleep(0.8)  # let the slow first refresh land at the emulator (refused: already rotated)
    (grant,) = emulator.active_grants()
    assert grant.refresh_token == consent.secrets["refresh_token"]


@pytest.mark.parametrize(
    ("status", "retry_after", "code", "expected_retry"),
    [(429, "7", "connectpay_rate_limited", 7.0), (429, None, "connectpay_rate_limited", None),
     (503, "30", "connectpay_unavailable", 30.0), (500, None, "connectpay_unavailable", None)],
)
async def test_outages_are_temporary(
    provider: ConnectPay, emulator: ConnectPayEmulator, status: int, retry_after: str | None, code: str,
    expected_retry: float | None,
) -> None:
    consent, done = await psd2_consent(provider, emulator)
    emulator.fail_next(status, path="/ob/accounts/LT-ACC-0001/transactions", retry_after=retry_after)
    with pytest.raises(TemporaryError) as caught:
        await provider.read_account(consent, done.grant.accounts[0], emulator.clock.now().date(), None)
    assert (caught.value.code, caught.value.retry_after) == (code, expected_retry)


async def test_data_timeout_is_temporary(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider(timeout_seconds=0.3)
    consent, _ = await psd2_consent(provider, emulator)
    emulator.delay_next(1.0, path="/ob/accounts")
    with pytest.raises(TemporaryError) as caught:
        await provider.list_accounts(consent)
    assert caught.value.code == "connectpay_timeout"


async def test_forbidden_and_gone(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, done = await psd2_consent(provider, emulator)
    main = done.grant.accounts[0]
    today = emulator.clock.now().date()
    emulator.fail_next(403, path="/ob/accounts", code="CONSENT_INVALID")
    with pytest.raises(ActionRequired) as lost:
        await provider.list_accounts(consent)
    assert lost.value.code == "connectpay_consent_lost"

    emulator.fail_next(404, path="/ob/accounts/LT-ACC-0001/transactions", code="RESOURCE_UNKNOWN")
    with pytest.raises(ActionRequired) as gone:
        await provider.read_account(consent, main, today, None)
    assert gone.value.code == "connectpay_account_unavailable"

    emulator.psus["default"].account_ids.remove("LT-ACC-0001")  # de-selected at ConnectPay
    with pytest.raises(ActionRequired) as missing:
        await provider.read_account(consent, main, today, None)
    assert missing.value.code == "connectpay_account_unavailable"


async def test_schema_drift_and_malformed_json_are_temporary(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, done = await psd2_consent(provider, emulator)
    today = emulator.clock.now().date() - timedelta(days=30)
    emulator.drift_next("transactionAmount", path="/ob/accounts/LT-ACC-0001/transactions")
    with pytest.raises(TemporaryError) as drift:
        await provider.read_account(consent, done.grant.accounts[0], today, None)
    assert drift.value.code == "connectpay_unexpected_answer"
    assert "transactionAmount" in (drift.value.detail or "")
    emulator.malformed_next(path="/ob/accounts")
    with pytest.raises(TemporaryError):
        await provider.list_accounts(consent)


async def test_closing_balance_plus_later_entries(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    today = emulator.clock.now().date()
    main = emulator.accounts["LT-ACC-0001"]
    main.balances = [{"balanceType": "closingBooked", "balanceAmount": {"amount": "1000.00", "currency": "EUR"},
                      "referenceDate": (today - timedelta(days=5)).isoformat()}]
    consent, done = await psd2_consent(provider, emulator)
    read = await provider.read_account(consent, done.grant.accounts[0], today - timedelta(days=30), None)
    # closingBooked 1000.00 + entries booked after its date: -3.20 (day -4) + 125.00 (day -2)
    assert read.balance is not None and read.balance.amount == Decimal("1121.80")


async def test_unattended_read_cap(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider(psd2={"max_unattended_reads_per_day": 2})
    consent, done = await psd2_consent(provider, emulator)
    main = done.grant.accounts[0]
    today = emulator.clock.now().date()
    await provider.read_account(consent, main, today, None)
    await provider.read_account(consent, main, today, None)
    with pytest.raises(TemporaryError) as capped:
        await provider.read_account(consent, main, today, None)
    assert capped.value.code == "connectpay_read_cap" and capped.value.retry_after is not None
    emulator.advance(24 * 3600 + 1)
    await provider.read_account(consent, main, today, None)


async def test_revoke(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    assert len(emulator.active_grants()) == 1
    await provider.revoke(consent)
    assert emulator.active_grants() == []
    (call,) = emulator.calls("/auth/v1/oauth2/revoke")
    assert call.body.decode() == f"token={consent.secrets['refresh_token']}&token_type_hint=refresh_token"
    assert call.headers["Authorization"].startswith("Basic ")


async def test_revoke_failure_is_swallowed(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await psd2_consent(provider, emulator)
    emulator.fail_next(500, path="/auth/v1/oauth2/revoke")
    await provider.revoke(consent)  # logged; the core erases the secrets anyway


async def test_unsigned_amount_with_debit_indicator(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    today = emulator.clock.now().date()
    emulator.accounts["LT-ACC-0001"].booked = [
        entry("u-1", today, "15.00", creditDebitIndicator="DBIT", creditorName="Shop"),
        entry(None, today, "-1.00", text="Coffee"),
        entry(None, today, "-1.00", text="Coffee"),
    ]
    consent, done = await psd2_consent(provider, emulator)
    read = await provider.read_account(consent, done.grant.accounts[0], today, None)
    assert read.booked[0].amount == Decimal("-15.00")
    synthetic = [t.provider_transaction_id for t in read.booked[1:]]
    assert all(s.startswith("h:") for s in synthetic) and synthetic[0] != synthetic[1]
    again = await provider.read_account(consent, done.grant.accounts[0], today, None)
    assert [t.provider_transaction_id for t in again.booked[1:]] == synthetic  # stable across reads


async def test_next_link_to_another_host_is_refused(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, done = await psd2_consent(provider, emulator)
    original = emulator._report

    def hostile(*args: Any, **kwargs: Any) -> Any:
        response = original(*args, **kwargs)
        body = json.loads(response.body)
        body["transactions"]["_links"]["next"] = {"href": "https://evil.example/ob/accounts/x/transactions"}
        return web.json_response(body)

    emulator._report = hostile  # type: ignore[method-assign]
    with pytest.raises(TemporaryError) as refused:
        await provider.read_account(consent, done.grant.accounts[0], emulator.clock.now().date(), None)
    assert refused.value.code == "connectpay_unexpected_answer"
    assert len(emulator.calls("/ob/accounts/LT-ACC-0001/transactions")) == 1  # nothing sent elsewhere


def test_next_link_with_the_default_port_written_out_is_this_host() -> None:
    endpoint = Endpoint("https://api.connectpay.com", lambda: None, Pacer(1.0, 1))  # type: ignore[arg-type, return-value]
    same = "https://api.connectpay.com:443/ob/accounts/x/transactions?pageNo=2"
    assert endpoint.resolve(same) == same
    assert endpoint.resolve("/ob/accounts/x/transactions?pageNo=2") == same.replace(":443", "")
    assert endpoint.resolve("https://api.connectpay.com:8443/ob/accounts/x/transactions") is None
    assert endpoint.resolve("http://api.connectpay.com/ob/accounts/x/transactions") is None
