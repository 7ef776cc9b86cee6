"""Demo Bank in Chromium, inside the Sage product's iframe: every path its user names script, every state checked with
axe-core and for reflow, and each success ending at Sage's redirect_uri with state, after the PATCH."""

from __future__ import annotations

from harness import Person, SageSite, Visit, announce_and_link
from playwright.async_api import expect

from connector.demo import DEMO_BANK_ID
from connector.testing.sage import SageEmulator

ACCOUNTS = "Choose the accounts to share with Sage"
SIGN_IN = "Sign in to Demo Bank"


async def start(person: Person, sage_calls, site: SageSite, **extra: str) -> Visit:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID, **extra)
    await person.open(visit.url)
    return visit


async def sign_in(person: Person, user: str, password: str = "secret") -> None:
    await person.expect_heading(SIGN_IN)
    await person.fill("User name", user)
    await person.fill("Password", password)
    await person.press("Sign in")


async def test_credentials_then_code_wrong_then_right(person: Person, sage_calls, site: SageSite,
                                                      sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site)
    assert await person.current_step() == "Sign in to your bank"
    await person.check("sign-in form")
    await sign_in(person, "otp")

    await person.expect_heading("Enter your security code")
    assert await person.current_step() == "Confirm it's you"
    await person.check("one-time code")
    await person.fill("Security code", "000000")
    await person.press("Confirm")
    await person.expect_error_announced("That code isn't right", field="Security code")
    await person.check("one-time code, wrong")

    await person.fill("Security code", "123456")
    await person.press("Confirm")
    frame = await person.expect_heading(ACCOUNTS)
    assert await person.current_step() == "Choose accounts"
    await person.check("accounts")

    # Sharing nothing is refused, announced and tied to the account list.
    for box in await frame.get_by_role("checkbox").all():
        await box.uncheck()
    await person.press("Share with Sage")
    await person.expect_error_announced("Choose at least one account")
    await expect(frame.get_by_role("group", name="Accounts at Demo Bank")).to_have_accessible_description(
        "Error: Choose at least one account to share.")
    await person.check("accounts, none chosen")

    await frame.get_by_label("Business Current").check()
    assert sage.patches == []
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1
    # (Demo Bank's grant holds every account of the user whatever was ticked; ConnectPay's holds the chosen ones.)
    assert "Business Current" in [a["accountName"].split(" ••")[0] for a in patch.body["data"]["bankAccounts"]]


async def test_empty_sign_in_shows_each_field_error(person: Person, sage_calls, site: SageSite) -> None:
    await start(person, sage_calls, site)
    await person.press("Sign in")
    await person.expect_error_announced("Enter user name.", field="User name")
    await person.expect_error_announced("Enter password.", field="Password")
    frame = await person.frame()
    assert (await frame.title()).startswith("Error: ")
    await person.check("sign-in form, empty")
    # The summary's links lead to their fields.
    await frame.get_by_role("link", name="Enter password.").click()
    await expect(frame.get_by_label("Password", exact=True)).to_be_focused()


async def test_wrong_password_shows_the_form_again(person: Person, sage_calls, site: SageSite,
                                                   sage: SageEmulator) -> None:
    await start(person, sage_calls, site)
    await sign_in(person, "bob", "wrong")
    await person.expect_heading(SIGN_IN)
    await person.expect_error_announced("Your bank didn't accept these details")
    frame = await person.frame()
    await expect(frame.get_by_label("Password", exact=True)).to_have_value("")
    await person.check("sign-in form, refused")
    assert sage.patches == []


async def test_redirect_step_leaves_the_iframe_and_returns_to_sage_from_the_top(
        person: Person, sage_calls, site: SageSite, sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "redirect")
    await person.expect_heading("Continue to Demo Bank")
    assert "Demo Bank's own page opens next" in await person.text()
    await person.check("redirect interstitial")
    await person.leave_frame("Continue to your bank")

    # The bank sent the person back to our page, now in the top window.
    await person.expect_heading(ACCOUNTS)
    assert person.page.url.startswith(sage_calls.connector_url + "/journey/")
    await person.check("accounts, top window")
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert person.page.url == f"{visit.redirect_uri}?state={visit.state}"  # the top-level URL
    assert len(sage.patches) == 1


async def test_decoupled_waiting_page_moves_on_by_itself(person: Person, sage_calls, site: SageSite,
                                                         sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "decoupled")
    frame = await person.expect_heading("Approve in your banking app")
    await expect(frame.get_by_role("status")).to_contain_text("We check every few seconds")
    await person.check("waiting")
    loads: list[str] = []
    person.page.on("framenavigated", lambda f: loads.append(f.url) if f == frame else None)
    # Nothing pressed: the page checks in the background and moves on once approved (two checks at Demo Bank).
    await person.expect_heading(ACCOUNTS, timeout=20_000)
    assert len(loads) == 1, f"the waiting page reloaded while waiting: {loads}"
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1


async def test_locked_account_explains_and_offers_the_way_back(person: Person, sage_calls, site: SageSite,
                                                               sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "locked")
    await person.expect_error_page()
    text = await person.text()
    assert "Your online banking is locked" in text
    await person.check("error: locked at the bank")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == []


async def test_bank_down_says_to_try_later(person: Person, sage_calls, site: SageSite, sage: SageEmulator) -> None:
    await start(person, sage_calls, site)
    await sign_in(person, "down")
    await person.expect_error_page()
    assert "isn't available right now" in await person.text()
    await person.check("error: bank unavailable")
    assert sage.patches == []


async def test_cancel_sends_nothing_and_returns_to_sage(person: Person, sage_calls, site: SageSite,
                                                        sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site)
    await sign_in(person, "otp")
    await person.expect_heading("Enter your security code")
    await person.press("Cancel and go back to Sage")
    await person.expect_heading("You cancelled connecting your bank")
    await person.check("cancelled")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == []


async def test_patch_refused_by_sage_links_nothing(person: Person, sage_calls, site: SageSite,
                                                   sage: SageEmulator) -> None:
    await start(person, sage_calls, site)
    await sign_in(person, "carol")
    await person.expect_heading(ACCOUNTS)
    sage.fail_next(400, count=1, path_prefix="/v1/authorisations")
    await person.press("Share with Sage")
    await person.expect_heading("We couldn't tell Sage about your accounts")
    await person.check("error: Sage refused the PATCH")
    assert sage.patches == []


async def onboard(person: Person, sage_calls, site: SageSite, sage: SageEmulator, user: str) -> tuple[str, str]:
    await start(person, sage_calls, site)
    await sign_in(person, user)
    await person.expect_heading(ACCOUNTS)
    await person.press("Share with Sage")
    await person.expect_heading("Back in Sage")
    external_id = sage.patches[-1].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    return external_id, await sage_calls.account_created(external_id)


async def test_reauthorisation_patches_status_only(person: Person, sage_calls, site: SageSite,
                                                   sage: SageEmulator) -> None:
    external_id, bank_account_id = await onboard(person, sage_calls, site, sage, "dave")
    visit = await start(person, sage_calls, site, path="/authrefresh", externalId=external_id,
                        bankaccount=bank_account_id)
    await sign_in(person, "dave")
    frame = await person.expect_heading(ACCOUNTS)
    await expect(frame.get_by_role("button", name="Reconnect")).to_be_visible()
    await person.check("accounts, reconnecting")
    await person.press("Reconnect")
    patch = await person.expect_linked(visit, sage)
    assert patch.body == {"data": {"status": "success"}}


async def test_reauthorisation_as_someone_else_is_refused(person: Person, sage_calls, site: SageSite,
                                                          sage: SageEmulator) -> None:
    external_id, bank_account_id = await onboard(person, sage_calls, site, sage, "erin")
    visit = await start(person, sage_calls, site, path="/authrefresh", externalId=external_id,
                        bankaccount=bank_account_id)
    await sign_in(person, "mallory")
    await person.press("Reconnect")
    await person.expect_heading("These aren't the same accounts")
    await person.check("error: different user")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert len(sage.patches) == 1  # the onboarding's only
