"""Sequential sources (§2.5, §2.6, §11 steps 8-11): "Add more accounts", field filtering, one activation call."""

from __future__ import annotations

from powens_helpers import bank, callback, choose, make_flow, sign_in, submit

from connector.testing.powens import TWO_SOURCE_BANK, PowensEmulator
from connector.types import Choice, ChooseAccounts, Done, Form, Redirect
from plugins.powens import Powens


async def test_two_sources_in_sequence(provider: Powens, powens: PowensEmulator) -> None:
    flow = make_flow(bank(TWO_SOURCE_BANK))
    form = await provider.start(flow)
    assert isinstance(form, Form)
    # directaccess (priority 1) first: its credentials plus the shared "website" list; the disabled source is ignored.
    assert [f.name for f in form.fields] == ["login", "password", "website"]
    assert [(c.value, c.label) for c in form.fields[2].choices] == [("par", "Personal"), ("pro", "Business")]
    first = await provider.resume(flow, submit(form.action, login="alice", password="pw", website="pro"))
    assert isinstance(first, ChooseAccounts)
    assert first.secondary_actions == (Choice("add_source", "Add more accounts"),)
    assert "separate sign-in" in (first.intro or "")
    business = [a.provider_account_id for a in first.accounts]
    assert len(business) == 2

    # "Add more accounts": openapi is webauth and every field it shares was given already, so straight to the bank.
    redirect = await provider.resume(flow, choose(business[0], action="add_source"))
    assert isinstance(redirect, Redirect)
    asked = [c for c in powens.calls if c.path == "/webauth-url"][-1]
    assert asked.query["source"] == "openapi"
    assert asked.query["id_connection"] == str(flow.state["connection_id"])
    assert "website" not in asked.query

    second = await callback(provider, flow, redirect)
    assert isinstance(second, ChooseAccounts)
    assert second.secondary_actions == ()  # no enabled source left
    all_ids = [a.provider_account_id for a in second.accounts]
    assert set(business) < set(all_ids) and len(all_ids) == 3
    assert len(powens.connections) == 1  # the same connection, with two sources
    assert [s.name for s in next(iter(powens.connections.values())).sources] == ["directaccess", "openapi"]

    savings = next(a.provider_account_id for a in second.accounts if a.name == "Savings account")
    done = await provider.resume(flow, choose(business[0], savings))
    assert isinstance(done, Done)
    assert {a.provider_account_id for a in done.grant.accounts} == {business[0], savings}
    # Activation happened once, after every source, with both accounts in one call.
    assert powens.activation_calls == [[int(business[0]), int(savings)]]
    assert len([c for c in powens.calls if c.method == "PUT"]) == 1


async def test_second_source_refused_at_the_bank_goes_back_to_the_accounts(
    provider: Powens, powens: PowensEmulator
) -> None:
    flow = make_flow(bank(TWO_SOURCE_BANK))
    first = await sign_in(provider, flow, website="par")
    assert isinstance(first, ChooseAccounts)
    redirect = await provider.resume(flow, choose(action="add_source"))
    step = await callback(provider, flow, redirect, decision="deny")
    assert isinstance(step, ChooseAccounts)
    assert step.error == "You cancelled at your bank."
    assert [a.provider_account_id for a in step.accounts] == [a.provider_account_id for a in first.accounts]
    # The first source stays usable; the page still offers the second source.
    assert step.secondary_actions == (Choice("add_source", "Add more accounts"),)
    done = await provider.resume(flow, choose(first.accounts[0].provider_account_id))
    assert isinstance(done, Done)


async def test_second_source_in_a_final_state_keeps_the_first(provider: Powens, powens: PowensEmulator) -> None:
    powens.webauth_outcome = "notSupported"
    flow = make_flow(bank(TWO_SOURCE_BANK))
    first = await sign_in(provider, flow, website="par")
    assert isinstance(first, ChooseAccounts)
    redirect = await provider.resume(flow, choose(action="add_source"))
    step = await callback(provider, flow, redirect)
    assert isinstance(step, ChooseAccounts)
    assert step.error == "These accounts can't be connected for this bank."


async def test_reversed_priorities_ask_only_the_shared_field_first(provider: Powens, powens: PowensEmulator) -> None:
    sources = powens.connectors[TWO_SOURCE_BANK]["sources"]
    sources[0]["priority"], sources[1]["priority"] = 2, 1
    flow = make_flow(bank(TWO_SOURCE_BANK))
    form = await provider.start(flow)
    assert isinstance(form, Form)
    assert [f.name for f in form.fields] == ["website"]  # §2.6 worked example, reversed
    redirect = await provider.resume(flow, submit(form.action, website="par"))
    assert isinstance(redirect, Redirect)
    first = await callback(provider, flow, redirect)
    assert isinstance(first, ChooseAccounts)
    second_form = await provider.resume(flow, choose(action="add_source"))
    assert isinstance(second_form, Form)
    assert [f.name for f in second_form.fields] == ["login", "password"]
    assert [c.value for c in second_form.secondary_actions] == ["skip_source"]
    step = await provider.resume(flow, submit(second_form.action, login="bob", password="pw"))
    assert isinstance(step, ChooseAccounts)
    assert len(step.accounts) == 3
    assert powens.received_fields[-1] == {"login": "bob", "password": "pw"}


async def test_wrongpass_on_second_source_keeps_the_connection(provider: Powens, powens: PowensEmulator) -> None:
    sources = powens.connectors[TWO_SOURCE_BANK]["sources"]
    sources[0]["priority"], sources[1]["priority"] = 2, 1
    flow = make_flow(bank(TWO_SOURCE_BANK))
    form = await provider.start(flow)
    first = await callback(provider, flow, await provider.resume(flow, submit(form.action, website="par")))
    assert isinstance(first, ChooseAccounts)
    second_form = await provider.resume(flow, choose(action="add_source"))
    refused = await provider.resume(flow, submit(second_form.action, login="wrongpass", password="pw"))
    assert isinstance(refused, Form)
    assert refused.error and refused.error.startswith("Your bank didn't accept")
    assert len(powens.connections) == 1
    # "Continue without these accounts" goes back to the first source's accounts.
    back = await provider.resume(flow, submit("skip_source"))
    assert isinstance(back, ChooseAccounts)
    assert len(back.accounts) == 1


async def test_more_sources_can_be_switched_off_per_bank(provider: Powens) -> None:
    flow = make_flow(bank(TWO_SOURCE_BANK, offer_more_sources=False))
    first = await sign_in(provider, flow, website="pro")
    assert isinstance(first, ChooseAccounts)
    assert first.secondary_actions == ()
