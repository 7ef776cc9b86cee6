"""/authrefresh: the same flow, renewing the same consent (connectpay.md §3.10, §4.6)."""

from __future__ import annotations

from cp_support import (
    BAAS_BANK,
    MemoryConsent,
    ProviderFactory,
    callback,
    choose,
    make_flow,
    psd2_consent,
    submit,
)

from connector.testing.connectpay import BaasUser, ConnectPayEmulator
from connector.types import ChooseAccounts, Done, Failed, Form, JourneyKind, Redirect
from plugins.connectpay import ConnectPay

REAUTH = JourneyKind.REAUTHORISATION


async def test_psd2_reauthorisation_renews_tokens_of_the_same_consent(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, done = await psd2_consent(provider, emulator)
    old = dict(consent.secrets)
    linked = done.grant.accounts[:2]
    flow = make_flow(kind=REAUTH, consent=consent, linked=linked)

    step = await provider.start(flow)
    assert isinstance(step, Redirect)
    result = await provider.resume(flow, callback(emulator.approve(step.url)))

    # No account choice on a re-authorisation: the linked accounts are kept (the PATCH carries the status only).
    assert isinstance(result, Done)
    assert [a.provider_account_id for a in result.grant.accounts] == [a.provider_account_id for a in linked]
    new = result.grant.secrets
    assert new["refresh_token"] != old["refresh_token"]
    assert consent.saved == [dict(new)]  # stored before the old token was revoked
    (live,) = emulator.active_grants()  # the old grant is revoked at ConnectPay
    assert live.refresh_token == new["refresh_token"]
    assert len(await provider.list_accounts(consent)) == 3


async def test_psd2_reauthorisation_with_another_customer_changes_nothing(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, done = await psd2_consent(provider, emulator)
    old = dict(consent.secrets)
    flow = make_flow(kind=REAUTH, consent=consent, linked=done.grant.accounts)
    step = await provider.start(flow)
    assert isinstance(step, Redirect)

    result = await provider.resume(flow, callback(emulator.approve(step.url, psu="other")))

    assert isinstance(result, Failed) and result.error.code == "connectpay_accounts_missing"
    assert "Main account ••8901" in result.error.message
    assert consent.saved == [] and dict(consent.secrets) == old
    (live,) = emulator.active_grants()  # the new grant was revoked, the old one still works
    assert live.refresh_token == old["refresh_token"]


async def _baas_sign_in(provider: ConnectPay, emulator: ConnectPayEmulator, flow: object,
                        email: str = "anna@example.com", password: str = "correct horse battery") -> object:
    form = await provider.start(flow)  # type: ignore[arg-type]
    assert isinstance(form, Form) and form.action == "sign_in"
    otp_form = await provider.resume(flow, submit("sign_in", email=email, password=password))  # type: ignore[arg-type]
    assert isinstance(otp_form, Form) and otp_form.action == "verify", otp_form
    return await provider.resume(flow, submit("verify", otp=emulator.last_otp or ""))  # type: ignore[arg-type]


async def test_baas_reauthorisation(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider()
    flow = make_flow(BAAS_BANK)
    offered = await _baas_sign_in(provider, emulator, flow)
    assert isinstance(offered, ChooseAccounts)
    done = await provider.resume(flow, choose("BAAS-ACC-1"))
    assert isinstance(done, Done)
    consent = MemoryConsent(done.grant.secrets, BAAS_BANK, provider_consent_id=done.grant.provider_consent_id)

    again = make_flow(BAAS_BANK, kind=REAUTH, consent=consent, linked=done.grant.accounts)
    result = await _baas_sign_in(provider, emulator, again)
    assert isinstance(result, Done)
    assert [a.provider_account_id for a in result.grant.accounts] == ["BAAS-ACC-1"]
    assert result.grant.secrets["user_id"] == "user-1"
    assert emulator.active_user_sessions() == []  # logged out at the end

    # Another ConnectPay user cannot renew this consent.
    emulator.users["bob@example.com"] = BaasUser("bob@example.com", "bob password", "user-2", ["client-1"])
    other = make_flow(BAAS_BANK, kind=REAUTH, consent=consent, linked=done.grant.accounts)
    refused = await _baas_sign_in(provider, emulator, other, "bob@example.com", "bob password")
    assert isinstance(refused, Failed) and refused.error.code == "connectpay_different_user"
    assert emulator.active_user_sessions() == []
