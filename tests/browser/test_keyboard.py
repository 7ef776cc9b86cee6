"""Keyboard only: each flow completes with Tab, Shift+Tab, Enter and Space, starting from the Sage product page.

Every element Tab lands on inside our pages must show a visible focus indicator (an outline of at least 2 px or a
box-shadow: checked in :meth:`harness.Person.tab_to`); errors take the focus and are announced (role=alert) and tied
to their field."""

from __future__ import annotations

from harness import Person, SageSite, announce_and_link
from playwright.async_api import expect

from connector.demo import BAAS_OTP, CONNECTPAY_ANY_ID, CONNECTPAY_BAAS_ID, DEMO_BANK_ID
from connector.testing.sage import SageEmulator

ACCOUNTS = "Choose the accounts to share with Sage"


async def keyboard_sign_in(person: Person, user: str, password: str, *, user_label: str = "User name") -> None:
    """From wherever focus is: the skip link first, then the fields, going back once with Shift+Tab."""
    await person.tab_to(user_label)
    await person.type(user)
    await person.tab_to("Password")
    await person.type("x")
    back = await person.tab_to(user_label, backwards=True)
    assert back["tag"] == "input"
    await person.tab_to("Password")
    await person.key("Backspace")
    await person.type(password)
    await person.key("Enter")  # Enter in a field submits its form


async def test_skip_link_comes_first_and_works(person: Person, sage_calls, site: SageSite) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    frame = await person.open(visit.url)
    skip = await person.tab_to("Skip to main content", max_steps=3)
    assert skip["tag"] == "a"
    await expect(frame.get_by_role("link", name="Skip to main content")).to_be_in_viewport()
    await person.key("Enter")
    await expect(frame.locator("main")).to_be_focused()
    nxt = await person.tab_to("User name", max_steps=2)  # the first control of main comes next
    assert nxt["tag"] == "input"


async def test_demo_bank_with_code_by_keyboard(person: Person, sage_calls, site: SageSite,
                                               sage: SageEmulator) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await keyboard_sign_in(person, "otp", "secret")

    frame = await person.expect_heading("Enter your security code")
    code = await person.tab_to("Security code")
    assert "The 6 digits from the text message" in code["described"]
    await person.type("111111")
    await person.key("Enter")

    # The error takes the focus, is announced, and its link leads back to the field.
    await person.expect_heading("Enter your security code")
    await person.expect_error_announced("That code isn't right", field="Security code")
    await person.tab_to("That code isn't right. Check the text message and try again.")
    await person.key("Enter")
    await expect(frame.get_by_label("Security code", exact=True)).to_be_focused()
    await person.type("123456")
    await person.tab_to("Send a new code")
    await person.tab_to("Confirm", backwards=True)
    await person.key("Space")

    frame = await person.expect_heading(ACCOUNTS)
    box = await person.tab_to_checkbox()
    assert box["checked"]
    await person.key("Space")
    assert not (await person.focused())["checked"]
    await person.key("Space")
    assert (await person.focused())["checked"]
    await person.tab_to("Share with Sage")
    await person.key("Enter")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1


async def test_redirect_and_cancel_by_keyboard(person: Person, sage_calls, site: SageSite,
                                               sage: SageEmulator) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await keyboard_sign_in(person, "redirect", "secret")
    await person.expect_heading("Continue to Demo Bank")
    await person.tab_to("Cancel and go back to Sage")
    await person.tab_to("Continue to your bank", backwards=True)
    async with person.page.expect_navigation():
        await person.key("Enter")  # a link: Enter follows it (here, into the top window)
    person.in_frame = False
    await person.expect_heading(ACCOUNTS)
    await person.tab_to("Cancel and go back to Sage")
    await person.key("Space")
    await person.expect_heading("You cancelled connecting your bank")
    await person.tab_to("Back to Sage")
    await person.key("Enter")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == []


async def test_waiting_page_by_keyboard(person: Person, sage_calls, site: SageSite, sage: SageEmulator) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await keyboard_sign_in(person, "decoupled", "secret")
    await person.expect_heading("Approve in your banking app")
    await person.tab_to("Check now")
    await person.key("Space")
    await person.expect_heading(ACCOUNTS)  # the second check approves (by the button, or the page's own check)
    await person.tab_to("Share with Sage")
    await person.key("Space")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1


async def test_connectpay_business_by_keyboard(person: Person, sage_calls, site: SageSite,
                                               sage: SageEmulator) -> None:
    visit = await announce_and_link(sage_calls, site, CONNECTPAY_ANY_ID)
    await person.open(visit.url)
    await person.expect_heading("How do you want to connect ConnectPay?")
    await person.tab_to("Continue")
    await person.key("Enter")
    await person.expect_error_announced("Choose where to sign in.")
    radio = await person.tab_to("On ConnectPay's own page (works for every ConnectPay account)")
    assert radio["type"] == "radio"
    await person.key("ArrowDown")  # arrows move within a radio group; Space would pick the focused one
    await person.key("Space")
    assert (await person.focused())["name"] == "Here, with the email and password of your ConnectPay user"
    await person.tab_to("Continue")
    await person.key("Enter")

    await person.expect_heading("Sign in to ConnectPay")
    await keyboard_sign_in(person, "anna@example.com", "correct horse battery", user_label="Email address")
    await person.expect_heading("Enter the code from your text message")
    await person.tab_to("Code")
    await person.type(BAAS_OTP)
    await person.key("Enter")
    await person.expect_heading(ACCOUNTS)
    await person.tab_to_checkbox()
    await person.tab_to("Share with Sage")
    await person.key("Enter")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1


async def test_connectpay_business_code_error_by_keyboard(person: Person, sage_calls, site: SageSite) -> None:
    visit = await announce_and_link(sage_calls, site, CONNECTPAY_BAAS_ID)
    await person.open(visit.url)
    await keyboard_sign_in(person, "anna@example.com", "correct horse battery", user_label="Email address")
    await person.expect_heading("Enter the code from your text message")
    await person.tab_to("Code")
    await person.type("12")
    await person.key("Enter")
    await person.expect_error_announced("Code", field="Code")
    await person.key("Shift+Tab")  # from the summary back out: nothing is trapped
    await person.tab_to("Code")
