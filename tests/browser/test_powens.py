"""Powens in Chromium, inside the Sage product's iframe: credentials (with field errors, a one-time code, a refused
password), webauth on the bank's own page (full window, Allow and Deny), two sources in sequence, decoupled waiting,
the states that end the journey, every re-authorisation; one flow by keyboard only and one without JavaScript.

Each state is checked with axe-core and for reflow; each success ends at Sage's redirect_uri with state, after the
PATCH. The login typed scripts what the emulated bank does (``connector.testing.powens``)."""

from __future__ import annotations

import re

from connector.demo import POWENS_TWO_SOURCES_ID
from harness import Person, SageSite, Visit, announce_and_link
from playwright.async_api import expect

from connector.demo import POWENS_CREDENTIALS_ID, POWENS_WEBAUTH_ID, ProviderStack
from connector.testing.powens import PowensEmulator
from connector.testing.sage import SageEmulator

ACCOUNTS = "Choose the accounts to share with Sage"
CREDENTIALS = "Credentials Bank (Powens)"
WEBAUTH = "Webauth Bank (Powens)"
TWO_SOURCES = "Two Source Bank (Powens)"
PASSWORD = "s3cret pass"
TO_BANK = "Continue to your bank"


def powens(stacks: dict[str, ProviderStack]) -> PowensEmulator:
    return stacks["powens"].emulator


async def start(person: Person, sage_calls, site: SageSite, bank_id: str = POWENS_CREDENTIALS_ID,
                **extra: str) -> Visit:
    visit = await announce_and_link(sage_calls, site, bank_id, **extra)
    await person.open(visit.url)
    return visit


async def sign_in(person: Person, login: str, password: str = PASSWORD, *, bank: str = CREDENTIALS) -> None:
    await person.expect_heading(f"Sign in to {bank}")
    await person.fill("Customer number", login)
    await person.fill("Password", password)
    await person.press("Continue")


async def tick(person: Person, *names: str) -> None:
    frame = await person.expect_heading(ACCOUNTS)
    for name in names:
        await frame.get_by_label(re.compile("^" + re.escape(name))).check()


def shared(patch) -> list[str]:
    return sorted(a["accountName"].split(" ••")[0] for a in patch.body["data"]["bankAccounts"])


async def at_bank(person: Person, stacks: dict[str, ProviderStack], bank: str, decision: str = "Allow") -> None:
    """Our interstitial says, in one sentence, that the bank's page opens in this window; the link leaves the
    iframe for the bank's page (top window, nothing of ours or Sage's around it), where the person decides."""
    await person.expect_heading(f"Continue to {bank}")
    assert "Your bank's own page opens next, in this window" in await person.text()
    await person.leave_frame(TO_BANK)
    page = person.page
    await expect(page.get_by_role("heading", level=1)).to_have_text(bank.removesuffix(" (Powens)"))
    assert page.url.startswith(powens(stacks).root + "/bank/authorize")
    assert page.frames == [page.main_frame]
    await page.get_by_role("button", name=decision).click()


# --- credentials ------------------------------------------------------------------------------------------------


async def test_credentials_field_errors_then_code_wrong_then_right(person: Person, sage_calls, site: SageSite,
                                                                   sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site)
    assert await person.current_step() == "Sign in to your bank"
    await person.check("Powens: sign-in form")

    await person.press("Continue")
    await person.expect_error_announced("Enter customer number.", field="Customer number")
    await person.expect_error_announced("Enter password.", field="Password")
    await person.check("Powens: sign-in form, empty")
    await sign_in(person, "NO WAY!")
    await person.expect_error_announced("Customer number isn't in the expected format.", field="Customer number")
    await person.check("Powens: sign-in form, wrong format")
    assert powens(stacks).received_fields == []  # nothing reached Powens

    await sign_in(person, "otp")
    await person.expect_heading("Your bank needs more information")
    assert await person.current_step() == "Confirm it's you"
    assert "Enter the 6-digit code we sent to your phone ending in 42." in await person.text()
    await person.check("Powens: one-time code")
    await person.fill("Code received by text message", "12ab")
    await person.press("Continue")
    await person.expect_error_announced("isn't in the expected format", field="Code received by text message")
    await person.check("Powens: one-time code, wrong format")
    await person.fill("Code received by text message", f"{(int(powens(stacks).otp) + 1) % 10 ** 6:06d}")
    await person.press("Continue")
    await person.expect_heading("Your bank needs more information")
    await person.expect_error_announced("Your bank didn't accept these details")
    await person.check("Powens: one-time code, refused")
    await person.fill("Code received by text message", powens(stacks).otp)
    await person.press("Continue")

    frame = await person.expect_heading(ACCOUNTS)
    assert await person.current_step() == "Choose accounts"
    await expect(frame.get_by_role("checkbox", checked=True)).to_have_count(0)  # nothing ticked for the person
    await person.check("Powens: accounts")
    await person.press("Share with Sage")
    await person.expect_error_announced("Choose at least one account")
    await person.check("Powens: accounts, none chosen")
    await tick(person, "Business current account")
    assert sage.patches == []
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert shared(patch) == ["Business current account"]


async def test_wrong_password_twice_then_a_clear_stop(person: Person, sage_calls, site: SageSite,
                                                      sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "wrongpass")
    frame = await person.expect_heading(f"Sign in to {CREDENTIALS}")
    await person.expect_error_announced("Your bank didn't accept these details")
    await expect(frame.get_by_label("Password", exact=True)).to_have_value("")
    await person.check("Powens: sign-in refused")
    await sign_in(person, "wrongpass")
    await person.expect_error_announced("Your bank didn't accept these details")
    await sign_in(person, "wrongpass")
    await person.expect_error_page()
    assert "refused these details several times" in await person.text()
    await person.check("Powens: wrong password, limit")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == [] and powens(stacks).connections == {}


async def test_decoupled_waiting_page_moves_on_by_itself(person: Person, sage_calls, site: SageSite,
                                                         sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "decoupled")
    frame = await person.expect_heading("Approve in your bank's app")
    assert await person.current_step() == "Confirm it's you"
    await expect(frame.get_by_role("status")).to_contain_text("We check every few seconds")
    await person.check("Powens: waiting for approval")
    loads: list[str] = []
    person.page.on("framenavigated", lambda f: loads.append(f.url) if f == frame else None)
    # Nothing pressed: the page resumes the connection in the background, then polls it until it is synced.
    await person.expect_heading(ACCOUNTS, timeout=20_000)
    assert len(loads) == 1, f"the waiting page reloaded while waiting: {loads}"
    await tick(person, "Business card")
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert shared(patch) == ["Business card"]


async def test_action_needed_then_check_again(person: Person, sage_calls, site: SageSite, sage: SageEmulator,
                                              stacks) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "actionneeded")
    await person.expect_heading("Your bank needs you to act")
    assert "accept the new terms and conditions" in await person.text()
    await person.check("Powens: action needed")
    [connection_id] = powens(stacks).connections
    powens(stacks).resolve(connection_id)  # the person accepted the terms in their banking app
    await person.press("Check again")
    await tick(person, "Business current account", "Business card")
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)


async def test_password_expired_asks_for_the_new_password(person: Person, sage_calls, site: SageSite,
                                                          sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "passwordexpired")
    await person.expect_heading("Change your password")
    await person.check("Powens: password expired")
    await person.fill("New password", "n3w pass")
    await person.press("Continue")
    await tick(person, "Business card")
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert powens(stacks).received_fields[-1] == {"new_password": "n3w pass"}


async def test_cancel_deletes_the_temporary_user_and_returns_to_sage(person: Person, sage_calls, site: SageSite,
                                                                     sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "otp")
    await person.expect_heading("Your bank needs more information")
    await person.press("Cancel and go back to Sage")
    await person.expect_heading("You cancelled connecting your bank")
    await person.check("Powens: cancelled")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == [] and powens(stacks).connections == {}
    assert all(u.deleted for u in powens(stacks).users.values())


async def test_states_that_cannot_be_fixed_here_end_on_a_clear_page(person: Person, sage_calls, site: SageSite,
                                                                    sage: SageEmulator) -> None:
    for login, words in (("ratelimiting", "Your bank is busy right now"),
                         ("unavailable", "Your bank's service is unavailable right now"),
                         ("bug", "Something went wrong at our data provider"),
                         ("notsupported", "These accounts can't be connected for this bank"),
                         ("weird", "We couldn't connect to your bank")):
        visit = await start(person, sage_calls, site)
        await sign_in(person, login)
        await person.expect_error_page()
        assert words in await person.text(), login
        await person.check(f"Powens: error, {login}")
        frame = await person.frame()
        back = frame.get_by_role("link", name="Back to Sage", exact=True)
        assert await back.get_attribute("href") == f"{visit.redirect_uri}?state={visit.state}"
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == []


# --- webauth ----------------------------------------------------------------------------------------------------


async def test_webauth_leaves_the_iframe_and_comes_back(person: Person, sage_calls, site: SageSite,
                                                        sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site, POWENS_WEBAUTH_ID)
    assert await person.current_step() == "Sign in to your bank"
    await person.check("Powens: webauth interstitial")
    await at_bank(person, stacks, WEBAUTH)

    # Back from the bank in the top window, on our page, which returns the person to Sage.
    await person.expect_heading(ACCOUNTS)
    assert person.page.url.startswith(sage_calls.connector_url + "/journey/")
    await person.check("Powens: accounts after webauth, top window")
    await tick(person, "Savings account")
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert person.page.url == f"{visit.redirect_uri}?state={visit.state}"  # the top-level URL
    assert shared(patch) == ["Savings account"]


async def test_webauth_deny_explains_and_links_nothing(person: Person, sage_calls, site: SageSite,
                                                       sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site, POWENS_WEBAUTH_ID)
    await at_bank(person, stacks, WEBAUTH, "Deny")
    await person.expect_heading("You didn't allow access")
    assert "You cancelled at your bank." in await person.text()
    await person.check("Powens: webauth denied")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == []


async def test_two_sources_in_sequence(person: Person, sage_calls, site: SageSite, sage: SageEmulator,
                                       stacks) -> None:
    visit = await start(person, sage_calls, site, POWENS_TWO_SOURCES_ID)
    frame = await person.expect_heading(f"Sign in to {TWO_SOURCES}")
    await person.check("Powens: two sources, sign-in form")
    await person.fill("Customer number", "alice")
    await person.fill("Password", PASSWORD)
    await frame.get_by_role("group", name="Customer type").get_by_label("Business").check()
    await person.press("Continue")

    frame = await person.expect_heading(ACCOUNTS)
    await expect(frame.get_by_role("button", name="Add more accounts")).to_be_visible()
    assert "Savings account" not in await person.text()
    await person.check("Powens: accounts with Add more accounts")
    await person.press("Add more accounts")
    await at_bank(person, stacks, TWO_SOURCES)  # the second source is webauth and asks nothing: straight on

    frame = await person.expect_heading(ACCOUNTS)
    await expect(frame.get_by_role("button", name="Add more accounts")).to_have_count(0)
    await person.check("Powens: accounts from both sources")
    await tick(person, "Business current account", "Business card", "Savings account")
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert shared(patch) == ["Business card", "Business current account", "Savings account"]
    [connection] = powens(stacks).connections.values()
    assert [s.name for s in connection.sources] == ["directaccess", "openapi"]
    assert len(powens(stacks).activation_calls) == 1  # one activation, after both sources


# --- re-authorisation -------------------------------------------------------------------------------------------


async def onboard(person: Person, sage_calls, site: SageSite, sage: SageEmulator, stacks,
                  bank_id: str = POWENS_CREDENTIALS_ID) -> tuple[str, str, int]:
    """Link an account (without checks: other tests do those) and let Sage announce it; returns its external id,
    Sage's bank account id and the Powens connection."""
    await start(person, sage_calls, site, bank_id)
    if bank_id == POWENS_WEBAUTH_ID:
        await person.leave_frame(TO_BANK)
        await person.page.get_by_role("button", name="Allow").click()
    else:
        await sign_in(person, "alice")
    frame = await person.expect_heading(ACCOUNTS)
    await frame.get_by_role("checkbox").first.check()
    await person.press("Share with Sage")
    await person.expect_heading("Back in Sage")
    external_id = sage.patches[-1].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    [connection_id] = powens(stacks).connections
    return external_id, await sage_calls.account_created(external_id, bank_id=bank_id), connection_id


async def reconnect(person: Person, sage_calls, site: SageSite, bank_id: str, external_id: str,
                    bank_account_id: str) -> Visit:
    return await start(person, sage_calls, site, bank_id, path="/authrefresh", externalId=external_id,
                       bankaccount=bank_account_id)


async def test_every_reauthorisation_of_a_credentials_connection(person: Person, sage_calls, site: SageSite,
                                                                 sage: SageEmulator, stacks) -> None:
    """SCARequired (cleared at once), webauthRequired (the bank's page), wrongpass (the form again), decoupled
    (the waiting page): each keeps the connection and its accounts and PATCHes the status only."""
    emulator = powens(stacks)
    external_id, bank_account_id, connection_id = await onboard(person, sage_calls, site, sage, stacks)
    accounts_before, activations = sorted(emulator.accounts), list(emulator.activation_calls)

    for broken in ("SCARequired", "webauthRequired", "wrongpass", "decoupled"):
        emulator.set_state(connection_id, broken)
        visit = await reconnect(person, sage_calls, site, POWENS_CREDENTIALS_ID, external_id, bank_account_id)
        if broken == "webauthRequired":
            await person.check("Powens: reconnect, webauth interstitial")
            await at_bank(person, stacks, CREDENTIALS)
        elif broken == "wrongpass":
            await person.expect_heading(f"Sign in to {CREDENTIALS} again")
            await person.expect_error_announced("Your bank didn't accept these details")
            await person.check("Powens: reconnect, sign in again")
            await person.fill("Customer number", "alice")
            await person.fill("Password", "n3w pass")
            await person.press("Continue")
        elif broken == "decoupled":
            await person.expect_heading("Approve in your bank's app")
            await person.check("Powens: reconnect, waiting")
            await person.press("Check now")
        # SCARequired: a person-present sync clears it, so the iframe goes straight back to Sage.
        patch = await person.expect_linked(visit, sage)
        assert patch.body == {"data": {"status": "success"}}, broken

    assert len(sage.patches) == 5
    assert list(emulator.connections) == [connection_id] and emulator.connections[connection_id].state is None
    assert sorted(emulator.accounts) == accounts_before and emulator.activation_calls == activations


async def test_reauthorisation_of_a_webauth_connection(person: Person, sage_calls, site: SageSite,
                                                       sage: SageEmulator, stacks) -> None:
    external_id, bank_account_id, connection_id = await onboard(person, sage_calls, site, sage, stacks,
                                                                POWENS_WEBAUTH_ID)
    powens(stacks).set_state(connection_id, "SCARequired")  # on a webauth source: only the bank can clear it
    visit = await reconnect(person, sage_calls, site, POWENS_WEBAUTH_ID, external_id, bank_account_id)
    await person.check("Powens: reconnect webauth bank, interstitial")
    await at_bank(person, stacks, WEBAUTH)
    patch = await person.expect_linked(visit, sage)
    assert patch.body == {"data": {"status": "success"}}
    assert list(powens(stacks).connections) == [connection_id]


# --- keyboard only, and without JavaScript ----------------------------------------------------------------------


async def test_credentials_and_code_by_keyboard(person: Person, sage_calls, site: SageSite, sage: SageEmulator,
                                                stacks) -> None:
    visit = await start(person, sage_calls, site)
    await person.tab_to("Skip to main content", max_steps=3)
    await person.key("Enter")
    login = await person.tab_to("Customer number", max_steps=2)
    assert "The number on your bank card letter" in login["described"]
    await person.type("otp")
    await person.tab_to("Password")
    await person.type("x")
    await person.tab_to("Customer number", backwards=True)
    await person.tab_to("Password")
    await person.key("Backspace")
    await person.type(PASSWORD)
    await person.key("Enter")

    frame = await person.expect_heading("Your bank needs more information")
    await person.tab_to("Code received by text message")
    await person.type("12")
    await person.key("Enter")
    await person.expect_error_announced("isn't in the expected format", field="Code received by text message")
    await person.tab_to("Code received by text message isn't in the expected format.")
    await person.key("Enter")  # the summary's link leads to the field
    await expect(frame.get_by_label("Code received by text message", exact=True)).to_be_focused()
    await person.type(powens(stacks).otp)
    await person.tab_to("Continue")
    await person.key("Space")

    await person.expect_heading(ACCOUNTS)
    assert not (await person.tab_to_checkbox())["checked"]  # nothing ticked for the person
    await person.key("Space")
    assert (await person.focused())["checked"]
    await person.tab_to("Share with Sage")
    await person.key("Enter")
    patch = await person.expect_linked(visit, sage)
    assert len(shared(patch)) == 1


async def test_decoupled_without_javascript_by_check_now(no_js: Person, sage_calls, site: SageSite,
                                                         sage: SageEmulator) -> None:
    person = no_js
    visit = await start(person, sage_calls, site)
    await sign_in(person, "decoupled")
    frame = await person.expect_heading("Approve in your bank's app")
    await expect(frame.get_by_role("status")).to_have_text("When you've approved, select “Check now”.")
    await person.check("Powens, no JavaScript: waiting for approval")
    await person.press("Check now")  # resumes the connection at the bank
    frame = await person.expect_heading("Waiting for your bank")
    await expect(frame.get_by_role("button", name="Check now")).to_be_visible()
    await person.check("Powens, no JavaScript: waiting for the bank")
    await person.press("Check now")
    await tick(person, "Business current account")
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert shared(patch) == ["Business current account"]
