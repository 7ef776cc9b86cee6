"""With JavaScript off (a browser context with ``java_script_enabled=False``), the main paths still complete: the
waiting page through its "Check now" button, errors shown in place, the bank's page through a plain link. (The
``no_js`` person comes from ``conftest.py``.)"""

from __future__ import annotations

from harness import Person, SageSite, announce_and_link
from playwright.async_api import expect

from connector.demo import CONNECTPAY_PSD2_ID, DEMO_BANK_ID
from connector.testing.sage import SageEmulator

ACCOUNTS = "Choose the accounts to share with Sage"


async def test_demo_bank_waiting_page_with_check_now(no_js: Person, sage_calls, site: SageSite,
                                                     sage: SageEmulator) -> None:
    person = no_js
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await person.fill("User name", "decoupled")
    await person.fill("Password", "secret")
    await person.press("Sign in")
    frame = await person.expect_heading("Approve in your banking app")
    await expect(frame.get_by_role("status")).to_have_text("When you've approved, select “Check now”.")
    await person.page.wait_for_timeout(4000)  # longer than the page's check interval: nothing happens by itself
    assert await person.heading() == "Approve in your banking app"
    await person.press("Check now")
    await person.expect_heading("Approve in your banking app")  # not approved yet (Demo Bank: two checks)
    await person.press("Check now")
    await person.expect_heading(ACCOUNTS)
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1


async def test_demo_bank_code_error_without_script(no_js: Person, sage_calls, site: SageSite,
                                                   sage: SageEmulator) -> None:
    person = no_js
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await person.fill("User name", "otp")
    await person.fill("Password", "secret")
    await person.press("Sign in")
    await person.expect_heading("Enter your security code")
    await person.fill("Security code", "12")
    await person.press("Confirm")
    await person.expect_error_announced("Security code isn't in the expected format", field="Security code",
                                        focused=False)
    await person.fill("Security code", "123456")
    await person.press("Confirm")
    await person.expect_heading(ACCOUNTS)
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1


async def test_connectpay_page_and_back_without_script(no_js: Person, sage_calls, site: SageSite,
                                                       sage: SageEmulator) -> None:
    person = no_js
    visit = await announce_and_link(sage_calls, site, CONNECTPAY_PSD2_ID)
    await person.open(visit.url)
    await person.leave_frame("Continue to ConnectPay")
    await person.page.get_by_role("button", name="Allow").click()
    await person.expect_heading(ACCOUNTS)
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1
