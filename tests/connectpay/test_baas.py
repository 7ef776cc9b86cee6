"""baas mode: our sign-in form, SMS code through the API, account choice, logout; then partner-level feed reads."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cp_support import (
    BAAS_BANK,
    CLIENT_IP,
    PUBLIC_URL,
    MemoryConsent,
    ProviderFactory,
    choose,
    make_flow,
    submit,
)
from cryptography.hazmat.primitives.asymmetric import padding

from connector.hookspecs import Flow
from connector.outbound import CoreServices
from connector.testing.connectpay import ConnectPayEmulator, entry
from connector.types import (
    ActionRequired,
    ChooseAccounts,
    Done,
    Failed,
    FlowEvent,
    Form,
    Step,
    StepResult,
    TemporaryError,
)
from plugins.connectpay import ConnectPay

EMAIL = "anna@example.com"
PASSWORD = "correct horse battery"
LOGIN = "/baas-sca/user-management/partner/users/login"
REFRESH = "/baas-sca/user-management/client/users/token/refresh"
LOGOUT = "/baas-sca/user-management/client/users/logout"


@pytest.fixture
def provider(make_provider: ProviderFactory) -> ConnectPay:
    return make_provider()


async def sign_in(provider: ConnectPay, flow: Flow, password: str = PASSWORD) -> StepResult:
    form = await provider.start(flow)
    assert isinstance(form, Form) and form.action == "sign_in"
    return await provider.resume(flow, submit("sign_in", email=EMAIL, password=password))


async def to_choice(provider: ConnectPay, emulator: ConnectPayEmulator) -> Flow:
    flow = make_flow(BAAS_BANK)
    assert isinstance(await sign_in(provider, flow), Form)
    assert isinstance(await provider.resume(flow, submit("verify", otp=emulator.last_otp or "")), ChooseAccounts)
    return flow


async def baas_consent(provider: ConnectPay, emulator: ConnectPayEmulator) -> tuple[MemoryConsent, Done]:
    flow = await to_choice(provider, emulator)
    done = await provider.resume(flow, choose("BAAS-ACC-1"))
    assert isinstance(done, Done)
    return MemoryConsent(done.grant.secrets, BAAS_BANK, provider_consent_id=done.grant.provider_consent_id), done


async def test_sign_in_wrong_then_right_code(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    form = await provider.start(flow)
    assert isinstance(form, Form)
    assert [(f.name, f.kind, f.autocomplete) for f in form.fields] == [
        ("email", "email", "username"), ("password", "password", "current-password")]

    otp = await provider.resume(flow, submit("sign_in", email=EMAIL, password=PASSWORD))
    assert isinstance(otp, Form) and otp.action == "verify" and otp.step is Step.VERIFY
    (field,) = otp.fields
    assert (field.name, field.kind, field.autocomplete) == ("otp", "otp", "one-time-code")
    assert [(c.value, c.label) for c in otp.secondary_actions] == [("resend", "Send a new code")]

    # The password travels RSA-encrypted (PKCS#1 v1.5 by default) and never in clear.
    (login,) = emulator.calls(LOGIN)
    body = json.loads(login.body)
    assert body["email"] == EMAIL and PASSWORD not in login.body.decode()
    plain = emulator.rsa_key.decrypt(base64.b64decode(body["password"]), padding.PKCS1v15()).decode()
    assert plain == PASSWORD
    assert login.headers["PSU-IP-Address"] == CLIENT_IP
    assert PASSWORD not in json.dumps(flow.state) and "password" not in flow.state

    wrong = "000000" if emulator.last_otp != "000000" else "111111"
    again = await provider.resume(flow, submit("verify", otp=wrong))
    assert isinstance(again, Form) and again.action == "verify"
    assert again.error == "That code is not right. Check the text message and try again."
    assert again.field_errors == {"otp": again.error}

    offered = await provider.resume(flow, submit("verify", otp=emulator.last_otp or ""))
    assert isinstance(offered, ChooseAccounts)
    assert [a.provider_account_id for a in offered.accounts] == ["BAAS-ACC-1"]  # the closed account is not offered
    accounts_call = emulator.calls("/baas-sca/accounts/client/accounts")[0]
    assert accounts_call.headers["Authorization"].startswith("Bearer ")
    assert accounts_call.headers["PSU-IP-Address"] == CLIENT_IP and accounts_call.headers["x-connectpay-api-key"]
    assert emulator.last_otp not in json.dumps(flow.state)  # also proves the state is plain JSON

    done = await provider.resume(flow, choose("BAAS-ACC-1"))
    assert isinstance(done, Done)
    assert done.grant.provider_consent_id == "user-1"
    assert done.grant.secrets["mode"] == "baas"
    assert done.grant.secrets["accounts"] == {"BAAS-ACC-1": "client-1"}
    assert "access_token" not in json.dumps(done.grant.secrets)  # no person token kept for the feed
    assert "user" not in flow.state
    assert len(emulator.calls(LOGOUT)) == 1 and emulator.active_user_sessions() == []


async def test_wrong_password_is_neutral_and_keeps_the_email(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    flow = make_flow(BAAS_BANK)
    form = await sign_in(provider, flow, password="wrong")
    assert isinstance(form, Form) and form.action == "sign_in"
    assert form.error == "The email or password is not right. Check them and try again."
    values = {f.name: f.value for f in form.fields}
    assert values == {"email": EMAIL, "password": None}


async def test_credential_attempts_are_capped(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    await provider.start(flow)
    for _ in range(5):
        assert isinstance(await provider.resume(flow, submit("sign_in", email=EMAIL, password="nope")), Form)
    result = await provider.resume(flow, submit("sign_in", email=EMAIL, password=PASSWORD))
    assert isinstance(result, Failed) and result.error.code == "connectpay_too_many_attempts"
    assert len(emulator.calls(LOGIN)) == 5


async def test_missing_fields(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    await provider.start(flow)
    form = await provider.resume(flow, submit("sign_in", email=EMAIL, password=""))
    assert isinstance(form, Form) and set(form.field_errors) == {"password"}
    assert emulator.calls(LOGIN) == []


async def test_expired_code_then_resend(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    await sign_in(provider, flow)
    first = emulator.last_otp
    emulator.advance(301)
    expired = await provider.resume(flow, submit("verify", otp=first or ""))
    assert isinstance(expired, Form) and "expired" in (expired.error or "")

    resent = await provider.resume(flow, FlowEvent(kind="submit", action="resend"))
    assert isinstance(resent, Form) and resent.error is None and "new code" in (resent.intro or "")
    assert len(emulator.calls("/baas-sca/user-management/partner/sca/authorise/")) == 2
    assert isinstance(await provider.resume(flow, submit("verify", otp=emulator.last_otp or "")), ChooseAccounts)


async def test_resend_limit(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    await sign_in(provider, flow)
    for i in range(3):
        form = await provider.resume(flow, FlowEvent(kind="submit", action="resend"))
        assert isinstance(form, Form)
        assert bool(form.secondary_actions) is (i < 2)
    refused = await provider.resume(flow, FlowEvent(kind="submit", action="resend"))
    assert isinstance(refused, Form) and refused.secondary_actions == () and refused.error
    assert len(emulator.calls("/baas-sca/user-management/partner/sca/authorise/")) == 4  # 1 + 3 resends


async def test_three_wrong_codes_back_to_sign_in(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    await sign_in(provider, flow)
    wrong = "000000" if emulator.last_otp != "000000" else "111111"
    for _ in range(2):
        form = await provider.resume(flow, submit("verify", otp=wrong))
        assert isinstance(form, Form) and form.action == "verify"
    back = await provider.resume(flow, submit("verify", otp=wrong))
    assert isinstance(back, Form) and back.action == "sign_in" and "too many times" in (back.error or "")
    # Signing in again starts a new challenge with a new code.
    otp = await provider.resume(flow, submit("sign_in", email=EMAIL, password=PASSWORD))
    assert isinstance(otp, Form) and otp.action == "verify"
    assert isinstance(await provider.resume(flow, submit("verify", otp=emulator.last_otp or "")), ChooseAccounts)


async def test_user_token_refreshed_when_nearly_expired(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = await to_choice(provider, emulator)
    emulator.advance(250)  # less than 60 s of the 5-minute token left
    done = await provider.resume(flow, choose("BAAS-ACC-1"))
    assert isinstance(done, Done)
    assert len(emulator.calls(REFRESH)) == 1
    assert len(emulator.calls(LOGOUT)) == 1 and emulator.active_user_sessions() == []


async def test_idle_session_signs_in_again(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = await to_choice(provider, emulator)
    emulator.advance(301)  # past the 5-minute user token: the session is over
    form = await provider.resume(flow, choose("BAAS-ACC-1"))
    assert isinstance(form, Form) and form.action == "sign_in" and "sign in again" in (form.error or "")
    assert emulator.calls(REFRESH) == []
    offered = await provider.resume(flow, submit("sign_in", email=EMAIL, password=PASSWORD))
    assert isinstance(offered, Form)
    assert isinstance(await provider.resume(flow, submit("verify", otp=emulator.last_otp or "")), ChooseAccounts)
    assert isinstance(await provider.resume(flow, choose("BAAS-ACC-1")), Done)


async def test_cancel_logs_out(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = await to_choice(provider, emulator)
    assert len(emulator.active_user_sessions()) == 1
    result = await provider.resume(flow, FlowEvent(kind="cancel"))
    assert isinstance(result, Failed) and result.error.code == "connectpay_cancelled"
    assert emulator.active_user_sessions() == []


async def test_failure_after_sign_in_logs_out(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow(BAAS_BANK)
    await sign_in(provider, flow)
    emulator.fail_next(400, path="/baas-sca/accounts/client/accounts", code="FORMAT_ERROR")
    result = await provider.resume(flow, submit("verify", otp=emulator.last_otp or ""))
    assert isinstance(result, Failed) and result.error.code == "connectpay_request_refused"
    assert len(emulator.calls(LOGOUT)) == 1 and emulator.active_user_sessions() == []


async def test_login_without_challenge_does_not_link(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    emulator.login_without_challenge = True
    result = await sign_in(provider, make_flow(BAAS_BANK))
    assert isinstance(result, Failed) and result.error.code == "connectpay_sca_missing"


async def test_partner_key_refused(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider(baas={"client_secret": "not-the-secret"})
    result = await sign_in(provider, make_flow(BAAS_BANK))
    assert isinstance(result, Failed) and result.error.code == "connectpay_client_refused"
    assert isinstance(result.error, TemporaryError)


async def test_outage_at_sign_in_keeps_the_form(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    emulator.fail_next(503, path=LOGIN)
    form = await sign_in(provider, make_flow(BAAS_BANK))
    assert isinstance(form, Form) and form.action == "sign_in" and "not answering" in (form.error or "")


@pytest.mark.parametrize(("prefix", "scheme"), [("Basic ", "oaep-sha256"), ("", "oaep-sha1")])
async def test_key_prefix_and_padding_variants(tmp_path: Path, prefix: str, scheme: str) -> None:
    async with ConnectPayEmulator(api_key_prefix=prefix, password_padding=scheme, otp="424242") as emulator:
        key_file = tmp_path / "key.pem"
        key_file.write_bytes(emulator.public_key_pem())
        provider = ConnectPay(emulator.provider_config(key_file), CoreServices(PUBLIC_URL, "connectpay"))
        provider.clock = emulator.clock.now
        try:
            flow = make_flow(BAAS_BANK)
            assert isinstance(await sign_in(provider, flow), Form)
            assert emulator.calls(LOGIN)[0].headers["x-connectpay-api-key"].startswith(prefix or "")
            assert isinstance(await provider.resume(flow, submit("verify", otp="424242")), ChooseAccounts)
        finally:
            await provider.close()


# --- feed -------------------------------------------------------------------------------------------------------


async def test_feed_reads_booked_entries_with_partner_key_only(
    make_provider: ProviderFactory, emulator: ConnectPayEmulator
) -> None:
    provider = make_provider(baas={"page_size": 2})
    consent, done = await baas_consent(provider, emulator)
    today = emulator.clock.now().date()
    pending_booked = entry("pe-0004", today, "-9.99", text="Not yet", status="pending")
    emulator.accounts["BAAS-ACC-1"].booked.append(pending_booked)  # a pending entry inside the booked list

    accounts = await provider.list_accounts(consent)
    assert [a.provider_account_id for a in accounts] == ["BAAS-ACC-1"]
    read = await provider.read_account(consent, done.grant.accounts[0], today - timedelta(days=30), None)

    assert [t.provider_transaction_id for t in read.booked] == ["pe-0001", "pe-0002", "pe-0003"]
    # closingBooked 1000.00 (day -3) + 250.00 (day -2) - 50.00 (day -1)
    assert read.balance is not None and read.balance.amount == Decimal("1200.00")
    assert read.sync_point == (today - timedelta(days=1)).isoformat()
    pages = emulator.calls("/baas-sca/accounts/partner/clients/client-1/accounts/BAAS-ACC-1/payment-entries")
    # Two pages by _links.next, then a full last page without a link: one more (empty) page closes the read.
    assert len(pages) == 3 and pages[0].query["bookingStatus"] == "booked"
    for call in pages:
        assert "Authorization" not in call.headers and "PSU-IP-Address" not in call.headers
        assert call.headers["x-connectpay-api-key"]


async def test_feed_account_closed_or_client_gone(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, done = await baas_consent(provider, emulator)
    today = emulator.clock.now().date()
    emulator.accounts["BAAS-ACC-1"].status = "closed"
    with pytest.raises(ActionRequired) as closed:
        await provider.read_account(consent, done.grant.accounts[0], today, None)
    assert closed.value.code == "connectpay_account_unavailable"
    emulator.clients["client-1"] = "blocked"
    with pytest.raises(ActionRequired):
        await provider.list_accounts(consent)


async def test_feed_blocked_user(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await baas_consent(provider, emulator)
    emulator.users[EMAIL].status = "blocked"
    with pytest.raises(ActionRequired) as blocked:
        await provider.list_accounts(consent)
    assert blocked.value.code == "connectpay_user_blocked"


async def test_feed_partner_key_refused_is_temporary(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    consent, done = await baas_consent(provider, emulator)
    emulator.fail_next(401, path="/baas-sca/accounts/partner/")
    with pytest.raises(TemporaryError) as refused:
        await provider.read_account(consent, done.grant.accounts[0], emulator.clock.now().date(), None)
    assert refused.value.code == "connectpay_client_refused"


async def test_baas_revoke_is_a_no_op(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    consent, _ = await baas_consent(provider, emulator)
    before = len(emulator.requests)
    await provider.revoke(consent)
    assert len(emulator.requests) == before
