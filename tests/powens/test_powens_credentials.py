"""Onboarding on a credentials bank: the link, validation, wrong passwords, permanent user and the grant."""

from __future__ import annotations

import json
import logging

import pytest
from powens_helpers import bank, choose, link, make_flow, object_form_types, sign_in, submit

from connector.testing.powens import CREDENTIALS_BANK, RESTRICTED_BANK, PowensEmulator
from connector.types import (
    ChooseAccounts,
    Declined,
    Done,
    Failed,
    FlowEvent,
    Form,
    JourneyKind,
    Step,
    TemporaryError,
)
from plugins.powens import Powens


async def test_credentials_link_end_to_end(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await provider.start(flow)
    assert isinstance(form, Form)
    assert form.title == "Sign in to Example Bank"
    assert [(f.name, f.kind, f.required) for f in form.fields] == [("login", "text", True),
                                                                   ("password", "password", True)]
    assert form.fields[0].pattern == r"^[a-z0-9._-]{3,32}$"
    assert form.fields[0].description == "The number on your bank card letter"
    assert form.step is Step.SIGN_IN
    temporary = flow.state["token"]
    assert powens.tokens[temporary].permanent is False

    accounts = await provider.resume(flow, submit(form.action, login="alice", password="s3cret pass"))
    assert isinstance(accounts, ChooseAccounts)
    assert accounts.preselected is False  # nothing pre-ticked (§7.2)
    assert accounts.secondary_actions == ()  # one source only
    assert [a.name for a in accounts.accounts] == ["Business current account", "Business card"]
    # Values travelled as JWEs and reached the bank in clear only after decryption.
    assert powens.received_fields[-1] == {"login": "alice", "password": "s3cret pass"}

    chosen = accounts.accounts[0].provider_account_id
    done = await provider.resume(flow, choose(chosen))
    assert isinstance(done, Done)
    grant = done.grant
    (connection,) = powens.connections.values()
    assert grant.provider_consent_id == str(connection.id)
    assert [a.provider_account_id for a in grant.accounts] == [chosen]
    assert grant.accounts[0].iban  # known after activation (§16 OP-11)
    assert grant.accounts[0].account_identifier.endswith(powens.accounts[int(chosen)].number[-4:])
    assert grant.expires_at is not None
    assert powens.activation_calls == [[int(chosen)]]
    # The user is permanent; the temporary token is spent and out of the journey state.
    assert powens.tokens[grant.secrets["token"]].permanent is True
    assert powens.tokens[temporary].revoked is True
    assert "token" not in flow.state
    assert grant.secrets["connection_id"] == connection.id
    # Nothing typed ever lands in the journey state.
    assert "s3cret" not in json.dumps(flow.state) and "alice" not in json.dumps(flow.state)


async def test_regex_failure_is_caught_before_anything_is_sent(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await provider.start(flow)
    again = await provider.resume(flow, submit(form.action, login="NOT VALID!", password="x"))
    assert isinstance(again, Form)
    assert set(again.field_errors) == {"login"}
    assert "NOT VALID" not in again.field_errors["login"]
    assert powens.connection_posts == 0


async def test_missing_required_field(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await provider.start(flow)
    again = await provider.resume(flow, submit(form.action, login="alice"))
    assert isinstance(again, Form)
    assert again.field_errors == {"password": "Enter your password."}
    assert powens.connection_posts == 0


@pytest.mark.parametrize("spelling", ["wrongpass", "wrongPass"])
async def test_wrongpass_shows_form_again_and_next_submit_creates_a_new_connection(
    provider: Powens, powens: PowensEmulator, spelling: str
) -> None:
    powens.wrongpass_spelling = spelling
    flow = make_flow(bank())
    again = await sign_in(provider, flow, login="wrongpass")
    assert isinstance(again, Form)
    assert again.error is not None and again.error.startswith("Your bank didn't accept these details.")
    assert "Identifiant ou mot de passe incorrect" in again.error  # the bank's text, as plain text
    assert powens.connections == {}
    assert "connection_id" not in flow.state
    accounts = await provider.resume(flow, submit(again.action, login="alice", password="right"))
    assert isinstance(accounts, ChooseAccounts)
    assert len(powens.connections) == 1 and powens.connection_posts == 2


async def test_wrongpass_three_times_stops(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    step = await sign_in(provider, flow, login="wrongpass")
    step = await provider.resume(flow, submit("source", login="wrongpass", password="x"))
    assert isinstance(step, Form)
    step = await provider.resume(flow, submit("source", login="wrongpass", password="x"))
    assert isinstance(step, Failed)
    assert step.error.code == "powens_wrongpass_limit"
    assert powens.connection_posts == 3


@pytest.mark.parametrize("status", [200, 202])
async def test_creation_status_200_and_202_are_accepted(provider: Powens, powens: PowensEmulator, status: int) -> None:
    powens.creation_status = status
    await link(provider, make_flow(bank()))


async def test_exchange_answer_with_token_key(provider: Powens, powens: PowensEmulator) -> None:
    powens.token_response = "token"
    done = await link(provider, make_flow(bank()))
    assert powens.tokens[done.grant.secrets["token"]].permanent


async def test_exchange_falls_back_to_a_temporary_code(provider: Powens, powens: PowensEmulator) -> None:
    powens.code_only_exchange = True
    done = await link(provider, make_flow(bank()))
    assert powens.tokens[done.grant.secrets["token"]].permanent
    assert any(c.path == "/auth/token/code" for c in powens.calls)


async def test_temporary_user_expired(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await provider.start(flow)
    powens.advance(31 * 60)
    step = await provider.resume(flow, submit(form.action, login="alice", password="x"))
    assert isinstance(step, Failed)
    assert step.error.code == "powens_session_expired"
    assert step.error.message == "This sign-in has timed out. Start again from your Sage product."


async def test_cancel_deletes_the_temporary_user(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    await provider.start(flow)
    (user,) = powens.users.values()
    step = await provider.resume(flow, FlowEvent(kind="cancel"))
    assert isinstance(step, Failed) and step.error.code == "powens_cancelled"
    assert isinstance(step.error, Declined)
    assert user.deleted


async def test_restricted_bank_is_refused(provider: Powens) -> None:
    step = await provider.start(make_flow(bank(RESTRICTED_BANK)))
    assert isinstance(step, Failed)
    assert step.error.code == "powens_bank_not_available"


async def test_unknown_connector_is_a_plain_error(provider: Powens) -> None:
    step = await provider.start(make_flow(bank("00000000-0000-4000-8000-000000000000")))
    assert isinstance(step, Failed)
    assert step.error.code.startswith("powens_")
    assert "notFound" not in step.error.message


async def test_choose_requires_an_offered_account(provider: Powens) -> None:
    flow = make_flow(bank())
    step = await sign_in(provider, flow)
    assert isinstance(step, ChooseAccounts)
    empty = await provider.resume(flow, choose())
    assert isinstance(empty, ChooseAccounts) and empty.error == "Choose at least one account to continue."
    foreign = await provider.resume(flow, choose("999999"))
    assert isinstance(foreign, ChooseAccounts) and foreign.error


async def test_account_type_option_filters_the_list(provider: Powens) -> None:
    flow = make_flow(bank(CREDENTIALS_BANK, account_types=["checking"]))
    step = await sign_in(provider, flow)
    assert isinstance(step, ChooseAccounts)
    assert [a.name for a in step.accounts] == ["Business current account"]


async def test_account_type_option_reads_the_object_form(
    provider: Powens, powens: PowensEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    object_form_types(powens, monkeypatch)
    flow = make_flow(bank(CREDENTIALS_BANK, account_types=["checking"]))
    step = await sign_in(provider, flow)
    assert isinstance(step, ChooseAccounts)
    assert [a.name for a in step.accounts] == ["Business current account"]


async def test_a_temporary_error_is_failed_with_retry_hint(provider: Powens, powens: PowensEmulator) -> None:
    powens.fail_next(503, path="^/connectors/", times=10)
    step = await provider.start(make_flow(bank()))
    assert isinstance(step, Failed)
    assert isinstance(step.error, TemporaryError)


async def test_onboarding_flow_kind_is_onboarding() -> None:
    assert make_flow(bank()).kind is JourneyKind.ONBOARDING


async def test_logs_carry_no_secret(provider: Powens, powens: PowensEmulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="otp", password="Hunter2-password")
    await provider.resume(flow, submit(form.action, otp="000001" if powens.otp != "000001" else "000002"))
    accounts = await provider.resume(flow, submit(form.action, otp=powens.otp))
    assert isinstance(accounts, ChooseAccounts)
    done = await provider.resume(flow, choose(accounts.accounts[0].provider_account_id))
    assert isinstance(done, Done)
    assert caplog.records  # something was logged
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    secrets = [*powens.tokens, "Hunter2-password", powens.otp, powens.client_secret]
    assert not [s for s in secrets if s in logged]
