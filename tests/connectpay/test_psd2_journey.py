"""psd2 onboarding through the contract: Redirect → ConnectPay's page → callback → ChooseAccounts → Done."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import timedelta
from urllib.parse import parse_qsl, urlsplit

import pytest
from cp_support import (
    CLIENT_IP,
    PUBLIC_URL,
    ProviderFactory,
    browser,
    callback,
    choose,
    issued,
    make_flow,
    onboard_psd2,
)

from connector.testing.connectpay import ConnectPayEmulator
from connector.types import ChooseAccounts, Done, Failed, FlowEvent, Redirect, TemporaryError
from plugins.connectpay import ConnectPay

CALLBACK = f"{PUBLIC_URL}/providers/connectpay/callback"


async def test_start_redirects_to_authorize_url_with_exact_parameters(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    flow = make_flow()
    step = await provider.start(flow)

    assert isinstance(step, Redirect)
    assert step.explanation == "ConnectPay's own page opens next, where you sign in and choose what to share."
    parts = urlsplit(step.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{emulator.tls_base_url}/auth/v1/oauth2/authorize"
    params = parse_qsl(parts.query, keep_blank_values=True)
    nonce = flow.state["nonce"]
    assert params == [
        ("client_id", emulator.client_id),
        ("flowId", "GetPSD2AuthCode"),
        ("nonce", nonce),
        ("scope", "psd2-ais"),
        ("state", issued(flow)[0]),
        ("redirect_url", CALLBACK),
        ("response_type", "code"),
    ]
    assert uuid.UUID(nonce).version == 4
    assert len(issued(flow)) == 1
    assert issued(flow)[0] not in str(flow.state)  # the core keeps state; the plugin does not need it


async def test_onboarding_through_connectpays_pages(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    assert isinstance(step, Redirect)

    values = await browser(step.url)
    assert values["state"] == issued(flow) and values["flowId"] == ["GetPSD2AuthCode"]
    offered = await provider.resume(flow, callback(values))

    assert isinstance(offered, ChooseAccounts)
    assert offered.intro == "Accounts of Ac…td at ConnectPay."
    by_id = {a.provider_account_id: a for a in offered.accounts}
    # The blocked account is never offered; the multi-currency one is offered once per currency.
    assert list(by_id) == ["LT-ACC-0001", "LT-ACC-0002-XXX:EUR", "LT-ACC-0002-XXX:USD"]
    main = by_id["LT-ACC-0001"]
    assert (main.name, main.iban, main.currency) == ("Main account", "LT601010012345678901", "EUR")
    assert main.balance is not None and str(main.balance.amount) == "1520.44"
    assert by_id["LT-ACC-0002-XXX:USD"].name == "Currency account (USD)"
    assert "tokens" in flow.state and "access_token" not in str(offered)
    json.dumps(flow.state)  # the core stores journey state as JSON

    token_call = emulator.calls("/auth/v1/oauth2/token")[0]
    basic = base64.b64encode(f"{emulator.client_id}:{emulator.client_secret}".encode()).decode()
    assert token_call.headers["Authorization"] == f"Basic {basic}"
    assert uuid.UUID(token_call.headers["X-Request-ID"]).version == 4
    assert token_call.body.decode().startswith("grant_type=authorization_code&code=")
    accounts_call = emulator.calls("/ob/accounts")[0]
    assert accounts_call.headers["PSU-IP-Address"] == CLIENT_IP
    assert accounts_call.query == {"withBalance": "true"}

    done = await provider.resume(flow, choose("LT-ACC-0001", "LT-ACC-0002-XXX:USD"))

    assert isinstance(done, Done)
    grant = done.grant
    assert [a.provider_account_id for a in grant.accounts] == ["LT-ACC-0001", "LT-ACC-0002-XXX:USD"]
    (live,) = emulator.active_grants()
    assert grant.secrets["access_token"] == live.access_token
    assert grant.secrets["refresh_token"] == live.refresh_token
    assert grant.secrets["mode"] == "psd2"
    assert grant.expires_at is not None
    expected = emulator.clock.now() + timedelta(days=30, seconds=-60)
    assert abs((grant.expires_at - expected).total_seconds()) < 5
    assert "tokens" not in flow.state


async def test_flowid_spelling_is_configurable(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider(psd2={"flow_id_param": "flowid"})
    flow = make_flow()
    step = await provider.start(flow)
    assert isinstance(step, Redirect)
    names = [k for k, _ in parse_qsl(urlsplit(step.url).query)]
    assert "flowid" in names and "flowId" not in names
    values = await browser(step.url)
    assert values["flowid"] == ["GetPSD2AuthCode"]  # echoed as received
    assert isinstance(await provider.resume(flow, callback(values)), ChooseAccounts)


async def test_empty_choice_asks_again(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    await provider.resume(flow, callback(emulator.approve(step.url)))
    again = await provider.resume(flow, choose())
    assert isinstance(again, ChooseAccounts) and again.error == "Choose at least one account to share."
    done = await provider.resume(flow, choose("LT-ACC-0001", "NOT-OFFERED"))
    assert isinstance(done, Done)
    assert [a.provider_account_id for a in done.grant.accounts] == ["LT-ACC-0001"]


@pytest.mark.parametrize(("error", "code"), [("access_denied", "connectpay_denied"),
                                             ("server_error", "connectpay_callback_error")])
async def test_callback_error_fails_without_token_request(
    provider: ConnectPay, emulator: ConnectPayEmulator, error: str, code: str
) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    assert isinstance(step, Redirect)
    values = await browser(step.url, decision="deny") if error == "access_denied" else emulator.deny(step.url, error)
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed) and result.error.code == code
    if error == "access_denied":
        assert result.error.message.startswith("You cancelled at ConnectPay")
    assert emulator.calls("/auth/v1/oauth2/token") == []


@pytest.mark.parametrize(
    ("status", "oauth_code", "expected", "temporary"),
    [
        (400, "invalid_grant", "connectpay_code_refused", False),
        (400, "invalid_request", "connectpay_request_refused", True),
        (401, "invalid_client", "connectpay_client_refused", True),
        (500, None, "connectpay_unavailable", True),
        (503, None, "connectpay_unavailable", True),
    ],
)
async def test_token_endpoint_errors_end_the_journey_clearly(
    provider: ConnectPay, emulator: ConnectPayEmulator, status: int, oauth_code: str | None, expected: str,
    temporary: bool,
) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    values = emulator.approve(step.url)
    emulator.fail_next(status, path="/auth/v1/oauth2/token", code=oauth_code)
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed)
    assert result.error.code == expected
    assert isinstance(result.error, TemporaryError) is temporary
    assert "token" not in result.error.message.lower()  # plain words for a bank customer
    assert emulator.active_grants() == []


async def test_token_endpoint_timeout(make_provider: ProviderFactory, emulator: ConnectPayEmulator) -> None:
    provider = make_provider(timeout_seconds=0.3)
    flow = make_flow()
    step = await provider.start(flow)
    values = emulator.approve(step.url)
    emulator.delay_next(1.0, path="/auth/v1/oauth2/token")
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed) and result.error.code == "connectpay_timeout"
    assert isinstance(result.error, TemporaryError)


async def test_malformed_token_answer(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    values = emulator.approve(step.url)
    emulator.malformed_next(path="/auth/v1/oauth2/token")
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed) and result.error.code == "connectpay_unexpected_answer"
    assert isinstance(result.error, TemporaryError)


async def test_malformed_accounts_answer_revokes_the_fresh_grant(
    provider: ConnectPay, emulator: ConnectPayEmulator
) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    values = emulator.approve(step.url)
    emulator.malformed_next(path="/ob/accounts")
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed) and result.error.code == "connectpay_unexpected_answer"
    assert emulator.active_grants() == []  # no orphan tokens left at ConnectPay
    assert len(emulator.calls("/auth/v1/oauth2/revoke")) == 1


async def test_code_used_twice_is_refused(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    first = make_flow()
    step = await provider.start(first)
    values = emulator.approve(step.url)
    assert isinstance(await provider.resume(first, callback(values)), ChooseAccounts)

    # The same callback replayed on the same journey: out of step, nothing exchanged again.
    replay = await provider.resume(first, callback(values))
    assert isinstance(replay, Failed) and replay.error.code == "connectpay_session_error"
    assert len(emulator.calls("/auth/v1/oauth2/token")) == 1

    # The same code smuggled into another journey: ConnectPay refuses it (and revokes what it minted).
    second = make_flow()
    await provider.start(second)
    result = await provider.resume(second, callback({"code": values["code"], "state": issued(second)}))
    assert isinstance(result, Failed) and result.error.code == "connectpay_code_refused"
    assert len(emulator.calls("/auth/v1/oauth2/token")) == 2
    assert emulator.active_grants() == []


async def test_callback_without_code_or_error(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    await provider.start(flow)
    result = await provider.resume(flow, callback({"state": issued(flow)}))
    assert isinstance(result, Failed) and result.error.code == "connectpay_callback_error"


async def test_cancel_at_choice_revokes_the_grant(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    await provider.resume(flow, callback(emulator.approve(step.url)))
    assert len(emulator.active_grants()) == 1
    result = await provider.resume(flow, FlowEvent(kind="cancel"))
    assert isinstance(result, Failed) and result.error.code == "connectpay_cancelled"
    assert emulator.active_grants() == []
    assert "tokens" not in flow.state


async def test_insufficient_scope_fails_and_revokes(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    values = emulator.approve(step.url)
    code = emulator._codes[values["code"][0]]  # ConnectPay granted fewer scopes than asked
    code.scope = "psd2-pis"
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed) and result.error.code == "connectpay_scope_missing"
    assert emulator.active_grants() == []


async def test_no_shareable_account(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    emulator.psus["default"].account_ids = ["LT-ACC-0003"]  # only a blocked account
    flow = make_flow()
    step = await provider.start(flow)
    result = await provider.resume(flow, callback(emulator.approve(step.url)))
    assert isinstance(result, Failed) and result.error.code == "connectpay_no_accounts"
    assert emulator.active_grants() == []


async def test_onboard_helper_gives_every_chosen_account(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    _, done = await onboard_psd2(provider, emulator, pick=lambda accounts: [accounts[0].provider_account_id])
    assert [a.provider_account_id for a in done.grant.accounts] == ["LT-ACC-0001"]


async def test_foreign_issuer_is_refused_without_exchange(provider: ConnectPay, emulator: ConnectPayEmulator) -> None:
    flow = make_flow()
    step = await provider.start(flow)
    assert isinstance(step, Redirect)
    values = {**emulator.approve(step.url), "iss": ["https://evil.example"]}
    result = await provider.resume(flow, callback(values))
    assert isinstance(result, Failed) and result.error.code == "connectpay_callback_error"
    assert emulator.calls("/auth/v1/oauth2/token") == []

    ok_flow = make_flow()
    step = await provider.start(ok_flow)
    assert isinstance(step, Redirect)
    values = {**emulator.approve(step.url), "iss": [emulator.tls_base_url + "/"]}
    assert isinstance(await provider.resume(ok_flow, callback(values)), ChooseAccounts)
