"""The feed side: accounts, booked transactions, paging, the last_update high-water mark, deletions, errors."""

from __future__ import annotations

from datetime import date, timedelta
from decimal import Decimal

import pytest
from powens_helpers import MemoryConsent, Sleeper, bank, deleted_in_all_accounts, object_form_types

from connector.testing.powens import PowensEmulator
from connector.types import Account, ActionRequired, Done, TemporaryError
from plugins.powens import Powens
from plugins.powens.client import same_origin


def first_account(done: Done) -> Account:
    return next(a for a in done.grant.accounts if a.name == "Business current account")


SINCE = date(2000, 1, 1)


async def test_list_accounts_reads_every_account(provider: Powens, linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    accounts = await provider.list_accounts(consent)
    assert {a.provider_account_id for a in accounts} >= {a.provider_account_id for a in done.grant.accounts}
    assert all(a.bank_identifier and a.account_identifier for a in accounts)


async def test_list_accounts_leaves_out_deleted_accounts(
    provider: Powens, powens: PowensEmulator, linked: tuple[MemoryConsent, Done], monkeypatch: pytest.MonkeyPatch
) -> None:
    consent, done = linked
    deleted_in_all_accounts(powens, monkeypatch)
    card = next(a for a in done.grant.accounts if a.name == "Business card")
    powens.accounts[int(card.provider_account_id)].deleted = powens.now()
    accounts = await provider.list_accounts(consent)
    assert [a.name for a in accounts] == ["Business current account"]


async def test_list_accounts_applies_the_account_type_option(
    provider: Powens, powens: PowensEmulator, linked: tuple[MemoryConsent, Done], monkeypatch: pytest.MonkeyPatch
) -> None:
    linked_consent, _ = linked
    consent = MemoryConsent("consent-1", linked_consent.provider_consent_id, bank(account_types=["checking"]),
                            dict(linked_consent.stored))
    assert [a.name for a in await provider.list_accounts(consent)] == ["Business current account"]
    object_form_types(powens, monkeypatch)
    assert [a.name for a in await provider.list_accounts(consent)] == ["Business current account"]


async def test_first_read_is_booked_only(provider: Powens, powens: PowensEmulator,
                                         linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    account = first_account(done)
    read = await provider.read_account(consent, account, SINCE, None)
    assert read.balance is not None
    assert read.balance.amount == Decimal("1520.35") and read.balance.currency == "EUR"
    assert sorted(t.description for t in read.booked) == [
        "CB CAFE DE LA GARE", "CB SUPERMARKET 05/01", "VIR SEPA ACME SALARY",
    ]  # the pending fuel payment waits until it is booked
    salary = next(t for t in read.booked if t.amount > 0)
    assert salary.amount == Decimal("2500.00")
    assert salary.booking_date == powens.now().date() - timedelta(days=12)
    assert next(t for t in read.booked if t.amount < 0 and "CAFE" in t.description).amount == Decimal("-12.5")
    assert list(read.removed) == []
    assert read.sync_point == "v1:" + powens.now().strftime("%Y-%m-%d %H:%M:%S")
    query = [c for c in powens.calls if c.path.endswith("/transactions")][-1].query
    assert query["min_date"] == SINCE.isoformat() and query["limit"] == "1000"


async def test_since_limits_the_first_read(provider: Powens, powens: PowensEmulator,
                                           linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    read = await provider.read_account(consent, first_account(done), powens.now().date() - timedelta(days=6), None)
    assert len(read.booked) == 2


async def test_paging_follows_next_links(provider: Powens, powens: PowensEmulator,
                                         linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    account = first_account(done)
    powens.seed_transactions(int(account.provider_account_id), 9)
    powens.page_size = 2
    read = await provider.read_account(consent, account, SINCE, None)
    assert len(read.booked) == 12
    assert len({t.provider_transaction_id for t in read.booked}) == 12
    pages = [c for c in powens.calls if c.path.endswith("/transactions")]
    assert len(pages) == 7  # 13 rows (one pending) by two
    assert all("cursor" in c.query for c in pages[1:])


async def test_incremental_read_uses_the_high_water_mark(provider: Powens, powens: PowensEmulator,
                                                         linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    account = first_account(done)
    aid = int(account.provider_account_id)
    first = await provider.read_account(consent, account, SINCE, None)
    pending = next(t.id for t in powens.transactions.values() if t.account_id == aid and t.coming)
    dropped = next(t.id for t in powens.transactions.values() if t.account_id == aid and "CAFE" in t.wording)

    powens.advance(3600)
    new = powens.add_transaction(aid, "-9.99", "CB BOOKSHOP")
    powens.book(pending)
    powens.delete_transaction(dropped)
    second = await provider.read_account(consent, account, SINCE, first.sync_point)
    query = [c for c in powens.calls if c.path.endswith("/transactions")][-1].query
    mark = powens.now() - timedelta(hours=1)
    assert query["last_update"] == (mark - timedelta(minutes=5)).strftime("%Y-%m-%d %H:%M:%S")
    assert "all" in query  # deleted rows are asked for, to report them
    ids = {t.provider_transaction_id for t in second.booked}
    assert {str(new), str(pending)} <= ids
    assert str(dropped) not in ids
    assert list(second.removed) == [str(dropped)]
    assert second.sync_point == "v1:" + powens.now().strftime("%Y-%m-%d %H:%M:%S")

    # Nothing changed: only the five-minute overlap comes back, and the mark stays.
    powens.advance(3600)
    third = await provider.read_account(consent, account, SINCE, second.sync_point)
    assert third.sync_point == second.sync_point
    assert {t.provider_transaction_id for t in third.booked} <= ids


async def test_unknown_sync_point_reads_from_since(provider: Powens, linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    read = await provider.read_account(consent, first_account(done), SINCE, "something-else")
    assert len(read.booked) == 3


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ("SCARequired", "powens_sca_required"),
        ("webauthRequired", "powens_webauth_required"),
        ("wrongpass", "powens_wrongpass"),
        ("additionalInformationNeeded", "powens_additional_info"),
        ("decoupled", "powens_decoupled"),
        ("passwordExpired", "powens_password_expired"),
        ("actionNeeded", "powens_action_needed"),
    ],
)
async def test_states_needing_the_person_raise_action_required(
    provider: Powens, powens: PowensEmulator, linked: tuple[MemoryConsent, Done], state: str, code: str
) -> None:
    consent, done = linked
    powens.set_state(int(done.grant.provider_consent_id or 0), state, error_message="Bank says hi")
    with pytest.raises(ActionRequired) as caught:
        await provider.read_account(consent, first_account(done), SINCE, None)
    assert caught.value.code == code
    assert caught.value.detail == "Bank says hi"
    with pytest.raises(ActionRequired):
        await provider.list_accounts(consent)


@pytest.mark.parametrize("state", ["rateLimiting", "websiteUnavailable", "bug"])
async def test_states_powens_retries_raise_temporary(provider: Powens, powens: PowensEmulator,
                                                     linked: tuple[MemoryConsent, Done], state: str) -> None:
    consent, done = linked
    powens.set_state(int(done.grant.provider_consent_id or 0), state)
    with pytest.raises(TemporaryError):
        await provider.read_account(consent, first_account(done), SINCE, None)


async def test_unknown_state_still_reads(provider: Powens, powens: PowensEmulator,
                                         linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    powens.set_state(int(done.grant.provider_consent_id or 0), "somethingNew")
    read = await provider.read_account(consent, first_account(done), SINCE, None)
    assert len(read.booked) == 3


async def test_429_then_success(provider: Powens, powens: PowensEmulator, sleeper: Sleeper,
                                linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    powens.fail_next(429, path="/transactions$", retry_after="3")
    read = await provider.read_account(consent, first_account(done), SINCE, None)
    assert len(read.booked) == 3
    assert sleeper.calls == [3.0]


async def test_persistent_500_is_temporary(provider: Powens, powens: PowensEmulator,
                                           linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    powens.fail_next(500, path="/transactions$", times=5)
    with pytest.raises(TemporaryError):
        await provider.read_account(consent, first_account(done), SINCE, None)


async def test_malformed_page_is_temporary(provider: Powens, powens: PowensEmulator,
                                           linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    powens.malformed_next(path="/transactions$")
    with pytest.raises(TemporaryError) as caught:
        await provider.read_account(consent, first_account(done), SINCE, None)
    assert caught.value.code == "powens_bad_answer"


async def test_next_link_to_another_origin_is_not_followed(provider: Powens, powens: PowensEmulator,
                                                           linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    powens.page_size, powens.foreign_next_link = 1, True
    with pytest.raises(TemporaryError):
        await provider.read_account(consent, first_account(done), SINCE, None)
    assert len([c for c in powens.calls if c.path.endswith("/transactions")]) == 1


def test_next_link_with_the_default_port_written_out_is_the_same_origin() -> None:
    base = "https://acme-sandbox.biapi.pro/2.0"
    assert same_origin("https://acme-sandbox.biapi.pro:443/2.0/users/me/accounts/1/transactions?cursor=x", base)
    assert not same_origin("https://acme-sandbox.biapi.pro:8443/2.0/users/me/accounts", base)
    assert not same_origin("http://acme-sandbox.biapi.pro/2.0/users/me/accounts", base)


async def test_disabled_account(provider: Powens, powens: PowensEmulator, linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    account = first_account(done)
    powens.accounts[int(account.provider_account_id)].disabled = powens.now()
    with pytest.raises(ActionRequired) as caught:
        await provider.read_account(consent, account, SINCE, None)
    assert caught.value.code == "powens_account_unavailable"


async def test_token_renewed_on_401(provider: Powens, powens: PowensEmulator,
                                    linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    old = consent.secrets["token"]
    powens.tokens[old].revoked = True
    read = await provider.read_account(consent, first_account(done), SINCE, None)
    assert len(read.booked) == 3
    assert consent.secrets["token"] != old and len(consent.saves) == 1
    renew = [c for c in powens.calls if c.path == "/auth/renew"]
    assert len(renew) == 1


async def test_deleted_user_means_action_required(provider: Powens, powens: PowensEmulator,
                                                  linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    user = powens.users[int(consent.secrets["id_user"])]
    powens._delete_user(user)
    with pytest.raises(ActionRequired) as caught:
        await provider.list_accounts(consent)
    assert caught.value.code == "powens_connection_deleted"


async def test_revoke_deletes_the_user(provider: Powens, powens: PowensEmulator,
                                       linked: tuple[MemoryConsent, Done]) -> None:
    consent, _ = linked
    await provider.revoke(consent)
    assert powens.users[int(consent.secrets["id_user"])].deleted
    assert powens.connections == {}
    await provider.revoke(consent)  # already gone: nothing to do
