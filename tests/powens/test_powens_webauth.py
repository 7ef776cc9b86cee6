"""Webauth links: state and callback, error callbacks, field values on the webauth URL (§5, §16 OP-7, OP-8)."""

from __future__ import annotations

import logging
from urllib.parse import parse_qs, urlsplit

import pytest
from powens_helpers import bank, bank_decision, callback, choose, make_flow, submit

from connector.testing.powens import WEBAUTH_BANK, WEBAUTH_FIELDS_BANK, PowensEmulator
from connector.types import ChooseAccounts, Declined, Done, Failed, FlowEvent, Form, Redirect
from plugins.powens import Powens


async def test_webauth_link_with_state_and_callback(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank(WEBAUTH_BANK))
    redirect = await provider.start(flow)
    assert isinstance(redirect, Redirect)
    assert redirect.url.startswith(powens.root + "/bank/authorize?")
    assert "bank" in redirect.explanation
    # Powens got our fixed callback (no query string) and the state the core issued for this journey.
    (asked,) = [c for c in powens.calls if c.path == "/webauth-url"]
    assert asked.query["redirect_uri"] == "https://connector.example.test/providers/powens/callback"
    assert asked.query["state"] == flow.issue_state.issued[0]  # type: ignore[attr-defined]
    assert asked.query["connector_uuid"] == WEBAUTH_BANK and asked.query["source"] == "openapi"
    # No user token or code ever reaches the browser: only the bank's URL.
    assert flow.state["token"] not in redirect.url

    accounts = await callback(provider, flow, redirect)
    assert isinstance(accounts, ChooseAccounts)
    assert [a.name for a in accounts.accounts] == ["Savings account"]
    done = await provider.resume(flow, choose(accounts.accounts[0].provider_account_id))
    assert isinstance(done, Done)
    assert done.grant.provider_consent_id == str(next(iter(powens.connections)))


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("access_denied", "powens_webauth_cancelled", "You cancelled at your bank."),
        ("server_error", "powens_webauth_failed", "Your bank couldn't complete the connection."),
    ],
)
async def test_error_callback(provider: Powens, powens: PowensEmulator, error: str, code: str, message: str) -> None:
    flow = make_flow(bank(WEBAUTH_BANK))
    redirect = await provider.start(flow)
    if error == "access_denied":
        step = await callback(provider, flow, redirect, decision="deny")
    else:
        powens.webauth_error = (error, "Upstream <b>timeout</b>")
        step = await callback(provider, flow, redirect)
    assert isinstance(step, Failed)
    assert step.error.code == code
    assert step.error.message == message
    assert step.error.detail  # the provider's own text, only in detail
    assert step.error.detail not in step.error.message
    assert powens.connections == {}
    assert isinstance(step.error, Declined) is (error == "access_denied")


async def test_callback_naming_another_connection_is_refused(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank(WEBAUTH_BANK))
    redirect = await provider.start(flow)
    assert isinstance(redirect, Redirect)
    flow.state["connection_id"] = 123456  # as if this journey already had another connection
    values = await bank_decision(redirect.url)
    step = await provider.resume(flow, FlowEvent(kind="callback", values=values))
    assert isinstance(step, Failed) and step.error.code == "powens_webauth_mismatch"


async def test_callback_without_a_pending_redirect_is_refused(provider: Powens) -> None:
    flow = make_flow(bank())
    await provider.start(flow)  # a credentials form, no webauth pending
    step = await provider.resume(flow, FlowEvent(kind="callback", values={"id_connection": ["1"]}))
    assert isinstance(step, Failed) and step.error.code == "powens_unexpected_step"


async def test_webauth_field_values_travel_encrypted_on_the_url(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank(WEBAUTH_FIELDS_BANK))
    form = await provider.start(flow)
    assert isinstance(form, Form)
    assert [(f.name, f.kind, [c.value for c in f.choices]) for f in form.fields] == [
        ("region", "list", ["north", "south"])
    ]
    bad = await provider.resume(flow, submit(form.action, region="west"))
    assert isinstance(bad, Form) and "region" in bad.field_errors
    redirect = await provider.resume(flow, submit(form.action, region="south"))
    assert isinstance(redirect, Redirect)
    asked = [c for c in powens.calls if c.path == "/webauth-url"][-1]
    assert asked.query["region"].count(".") == 4  # a compact JWE, never the clear value
    assert powens.received_fields[-1] == {"region": "south"}
    step = await callback(provider, flow, redirect)
    assert isinstance(step, ChooseAccounts)


async def test_redirect_url_is_not_the_permanent_token(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank(WEBAUTH_BANK))
    redirect = await provider.start(flow)
    assert isinstance(redirect, Redirect)
    query = parse_qs(urlsplit(redirect.url).query)
    assert set(query) == {"session"}
    assert all(token not in redirect.url for token in powens.tokens)


async def test_state_and_tokens_never_logged(provider: Powens, powens: PowensEmulator,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    flow = make_flow(bank(WEBAUTH_BANK))
    step = await callback(provider, flow, await provider.start(flow))
    assert isinstance(step, ChooseAccounts)
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    issued = flow.issue_state.issued  # type: ignore[attr-defined]
    assert not [s for s in [*issued, *powens.tokens] if s in logged]
