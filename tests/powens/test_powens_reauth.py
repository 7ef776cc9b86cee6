"""Re-authorisation (§12): the same connection and accounts, nothing activated, no new user."""

from __future__ import annotations

from powens_helpers import MemoryConsent, bank, callback, choose, make_flow, sign_in, submit

from connector.testing.powens import TWO_SOURCE_BANK, PowensEmulator
from connector.types import ActionRequired, ChooseAccounts, Done, Failed, Form, JourneyKind, Redirect
from plugins.powens import Powens


def reauth_flow(consent: MemoryConsent, done: Done):  # type: ignore[no-untyped-def]
    return make_flow(consent.bank, kind=JourneyKind.REAUTHORISATION, consent=consent, linked=done.grant.accounts)


def counts(powens: PowensEmulator) -> tuple[int, int, int]:
    return len(powens.users), len(powens.connections), len(powens.activation_calls)


async def test_wrongpass_on_existing_connection(provider: Powens, powens: PowensEmulator,
                                               linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    connection_id = int(done.grant.provider_consent_id or 0)
    powens.set_state(connection_id, "wrongpass", error_message="Mot de passe incorrect")
    before = counts(powens)
    flow = reauth_flow(consent, done)
    form = await provider.start(flow)
    assert isinstance(form, Form)
    assert [f.name for f in form.fields] == ["login", "password"]
    assert form.error and form.error.startswith("Your bank didn't accept these details.")
    again = await provider.resume(flow, submit(form.action, login="alice", password="wrongpass"))
    assert isinstance(again, Form) and again.error
    assert connection_id in powens.connections  # an existing connection is not deleted on wrongpass
    finished = await provider.resume(flow, submit(form.action, login="alice", password="new-pass"))
    assert isinstance(finished, Done)
    assert finished.grant.provider_consent_id == done.grant.provider_consent_id
    assert [a.provider_account_id for a in finished.grant.accounts] == [
        a.provider_account_id for a in done.grant.accounts
    ]
    assert finished.grant.secrets["token"] == done.grant.secrets["token"]
    assert counts(powens) == before  # no new user, no new connection, no activation
    assert not any(c.path == "/auth/init" for c in powens.calls[-10:])


async def test_sca_required_on_a_webauth_source(provider: Powens, powens: PowensEmulator) -> None:
    info = bank(TWO_SOURCE_BANK)
    flow = make_flow(info)
    first = await sign_in(provider, flow, website="pro")
    assert isinstance(first, ChooseAccounts)
    second = await callback(provider, flow, await provider.resume(flow, choose(action="add_source")))
    assert isinstance(second, ChooseAccounts)
    done = await provider.resume(flow, choose(*(a.provider_account_id for a in second.accounts)))
    assert isinstance(done, Done)
    consent = MemoryConsent("c2", done.grant.provider_consent_id, info, dict(done.grant.secrets))
    connection_id = int(done.grant.provider_consent_id or 0)
    powens.set_state(connection_id, "SCARequired", source="openapi")

    re_flow = reauth_flow(consent, done)
    redirect = await provider.start(re_flow)
    assert isinstance(redirect, Redirect)
    asked = [c for c in powens.calls if c.path == "/webauth-url"][-1]
    assert asked.query["id_connection"] == str(connection_id) and asked.query["source"] == "openapi"
    finished = await callback(provider, re_flow, redirect)
    assert isinstance(finished, Done)
    assert finished.grant.provider_consent_id == str(connection_id)
    assert len(finished.grant.accounts) == 3
    assert len(powens.activation_calls) == 1  # only the onboarding one


async def test_webauth_url_409_means_up_to_date_and_is_read_again(
    provider: Powens, powens: PowensEmulator, linked: tuple[MemoryConsent, Done]
) -> None:
    consent, done = linked
    connection_id = int(done.grant.provider_consent_id or 0)
    powens.set_state(connection_id, "webauthRequired")
    powens.fail_next(409, code="invalidValue", path="^/webauth-url$")
    flow = reauth_flow(consent, done)
    redirect = await provider.start(flow)
    assert isinstance(redirect, Redirect)  # re-read: still required, so a fresh URL the second time
    assert len([c for c in powens.calls if c.path == "/webauth-url"]) == 2
    finished = await callback(provider, flow, redirect)
    assert isinstance(finished, Done)


async def test_sca_required_on_credentials(provider: Powens, powens: PowensEmulator,
                                           linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    powens.set_state(int(done.grant.provider_consent_id or 0), "SCARequired")
    finished = await provider.start(reauth_flow(consent, done))
    assert isinstance(finished, Done)


async def test_already_fixed(provider: Powens, linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    finished = await provider.start(reauth_flow(consent, done))
    assert isinstance(finished, Done)
    assert finished.grant.provider_consent_id == done.grant.provider_consent_id


async def test_connection_deleted_at_powens(provider: Powens, powens: PowensEmulator,
                                            linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    del powens.connections[int(done.grant.provider_consent_id or 0)]
    step = await provider.start(reauth_flow(consent, done))
    assert isinstance(step, Failed)
    assert isinstance(step.error, ActionRequired)
    assert step.error.code == "powens_connection_deleted"


async def test_refused_token_is_renewed_once_and_saved(provider: Powens, powens: PowensEmulator,
                                                      linked: tuple[MemoryConsent, Done]) -> None:
    consent, done = linked
    old = consent.secrets["token"]
    powens.tokens[old].revoked = True
    powens.set_state(int(done.grant.provider_consent_id or 0), "SCARequired")
    finished = await provider.start(reauth_flow(consent, done))
    assert isinstance(finished, Done)
    assert len(consent.saves) == 1
    assert finished.grant.secrets["token"] == consent.secrets["token"] != old
    assert powens.tokens[consent.secrets["token"]].permanent
