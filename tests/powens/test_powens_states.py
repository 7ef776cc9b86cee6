"""Every connection state of powens.md §6.2 while the person is present, scripted by the login typed."""

from __future__ import annotations

import pytest
from powens_helpers import POLL, FakeClock, bank, callback, choose, make_flow, sign_in, submit

from connector.testing.powens import PowensEmulator
from connector.types import (
    ChooseAccounts,
    Done,
    Failed,
    Form,
    ProviderError,
    Redirect,
    Step,
    TemporaryError,
    Wait,
)
from plugins.powens import Powens


async def test_otp_additional_information(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="otp")
    assert isinstance(form, Form)
    assert form.step is Step.VERIFY
    assert [(f.name, f.kind, f.autocomplete) for f in form.fields] == [("otp", "otp", "one-time-code")]
    assert form.intro == "Enter the 6-digit code we sent to your phone ending in 42."
    wrong = await provider.resume(flow, submit(form.action, otp="000000" if powens.otp != "000000" else "111111"))
    assert isinstance(wrong, Form) and wrong.error and wrong.error.startswith("Your bank didn't accept")
    malformed = await provider.resume(flow, submit(form.action, otp="12ab"))
    assert isinstance(malformed, Form) and set(malformed.field_errors) == {"otp"}
    accounts = await provider.resume(flow, submit(form.action, otp=powens.otp))
    assert isinstance(accounts, ChooseAccounts)
    assert powens.received_fields[-1] == {"otp": powens.otp}
    assert powens.otp not in str(flow.state)


async def test_decoupled_then_validating_then_synced(provider: Powens, powens: PowensEmulator) -> None:
    powens.validating_polls = 2
    flow = make_flow(bank())
    wait = await sign_in(provider, flow, login="decoupled")
    assert isinstance(wait, Wait)
    assert "app" in wait.message
    # The first check resumes in the background, then we poll while the bank validates.
    step = await provider.resume(flow, POLL)
    assert isinstance(step, Wait) and step.poll_seconds == 2
    resume = [c for c in powens.calls if c.method == "POST" and c.path.startswith("/users/me/connections/")][-1]
    assert resume.query["background"] == "true"
    step = await provider.resume(flow, POLL)
    assert isinstance(step, Wait)
    step = await provider.resume(flow, POLL)
    assert isinstance(step, ChooseAccounts)


async def test_validating_too_long_offers_check_again(
    provider: Powens, powens: PowensEmulator, clock: FakeClock
) -> None:
    powens.validating_polls = 1000
    flow = make_flow(bank())
    await sign_in(provider, flow, login="decoupled")
    assert isinstance(await provider.resume(flow, POLL), Wait)
    clock.advance(61)
    check = await provider.resume(flow, POLL)
    assert isinstance(check, Form)
    assert check.submit_label == "Check again" and check.fields == ()
    powens.connections[flow.state["connection_id"]].validating_left = 1
    step = await provider.resume(flow, submit(check.action))
    assert isinstance(step, ChooseAccounts)


async def test_sca_required_on_credentials_forces_a_sync(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    step = await sign_in(provider, flow, login="sca")
    assert isinstance(step, ChooseAccounts)
    sync = [c for c in powens.calls if c.method == "POST" and c.path.startswith("/users/me/connections/")]
    assert len(sync) == 1  # the {} POST while the person is present


async def test_sca_required_sync_refused_with_409(provider: Powens, powens: PowensEmulator) -> None:
    powens.fail_next(409, code="tooManySync", method="POST", path=r"^/users/me/connections/\d+$")
    step = await sign_in(provider, make_flow(bank()), login="sca")
    assert isinstance(step, Failed)
    assert isinstance(step.error, TemporaryError)
    assert step.error.code == "powens_try_later"


async def test_webauth_required_redirects_and_comes_back(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    redirect = await sign_in(provider, flow, login="webauthreq")
    assert isinstance(redirect, Redirect)
    asked = [c for c in powens.calls if c.path == "/webauth-url"][-1]
    assert asked.query["id_connection"] == str(flow.state["connection_id"])
    assert asked.query["source"] == "directaccess"
    step = await callback(provider, flow, redirect)
    assert isinstance(step, ChooseAccounts)
    assert len(powens.connections) == 1


async def test_password_expired(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="passwordexpired")
    assert isinstance(form, Form)
    assert form.title == "Change your password"
    assert [(f.name, f.kind) for f in form.fields] == [("new_password", "password")]
    step = await provider.resume(flow, submit(form.action, new_password="n3w pass"))
    assert isinstance(step, ChooseAccounts)


async def test_action_needed_check_again(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="actionneeded")
    assert isinstance(form, Form)
    assert form.submit_label == "Check again"
    assert "new terms" in (form.intro or "")
    still = await provider.resume(flow, submit(form.action))
    assert isinstance(still, Form) and still.submit_label == "Check again"
    powens.resolve(flow.state["connection_id"])
    # The {} sync was sent once already; later checks only read the state, which Powens updates by itself.
    powens.set_state(flow.state["connection_id"], None)
    step = await provider.resume(flow, submit(form.action))
    assert isinstance(step, ChooseAccounts)


@pytest.mark.parametrize(
    ("login", "code", "temporary"),
    [
        ("ratelimiting", "powens_bank_busy", True),
        ("unavailable", "powens_bank_unavailable", True),
        ("bug", "powens_provider_bug", True),
        ("notsupported", "powens_not_supported", False),
        ("weird", "powens_unknown_state", False),
    ],
)
async def test_final_states_stop_with_a_plain_message(
    provider: Powens, powens: PowensEmulator, login: str, code: str, temporary: bool
) -> None:
    step = await sign_in(provider, make_flow(bank()), login=login)
    assert isinstance(step, Failed)
    assert step.error.code == code
    assert isinstance(step.error, TemporaryError) is temporary
    assert isinstance(step.error, ProviderError)
    assert "Emulated state" not in step.error.message  # Powens's text only in detail
    assert step.error.detail and "Emulated state" in step.error.detail


async def test_resume_loop_is_capped(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="actionneeded")
    step = form
    for _ in range(12):
        if not isinstance(step, Form):
            break
        step = await provider.resume(flow, submit("check_again"))
    assert isinstance(step, Failed) and step.error.code == "powens_too_many_steps"


async def test_done_after_a_state_dance(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="otp")
    accounts = await provider.resume(flow, submit(form.action, otp=powens.otp))
    assert isinstance(accounts, ChooseAccounts)
    done = await provider.resume(flow, choose(accounts.accounts[1].provider_account_id))
    assert isinstance(done, Done)
    assert done.grant.accounts[0].account_type.value == "creditCard"


async def test_action_needed_sync_conflict_just_reads_again(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank())
    form = await sign_in(provider, flow, login="actionneeded")
    powens.fail_next(409, code="tooManySync", method="POST", path=r"^/users/me/connections/\d+$")
    powens.set_state(flow.state["connection_id"], None)  # fixed at the bank meanwhile
    step = await provider.resume(flow, submit(form.action))
    assert isinstance(step, ChooseAccounts)
