"""ConnectPay in Chromium: PSD2 on ConnectPay's own page (full window, never framed) with Allow and Deny; BaaS in our
own form with a wrong then right text-message code; the "choose how" form; and every re-authorisation."""

from __future__ import annotations

import re

from harness import Person, SageSite, Visit, announce_and_link
from playwright.async_api import expect

from connector.demo import (
    BAAS_OTP,
    CONNECTPAY_ANY_ID,
    CONNECTPAY_BAAS_ID,
    CONNECTPAY_PSD2_ID,
    ProviderStack,
)
from connector.testing.sage import SageEmulator

ACCOUNTS = "Choose the accounts to share with Sage"
EMAIL = "anna@example.com"
PASSWORD = "correct horse battery"


async def start(person: Person, sage_calls, site: SageSite, bank_id: str, **extra: str) -> Visit:
    visit = await announce_and_link(sage_calls, site, bank_id, **extra)
    await person.open(visit.url)
    return visit


async def at_connectpay(person: Person, stacks: dict[str, ProviderStack], decision: str, *,
                        customer: str | None = None) -> None:
    """Leave the iframe for ConnectPay's page, check it is the top window (never framed) and decide there."""
    await person.expect_heading("Continue to ConnectPay")
    assert "ConnectPay" in await person.text()
    await person.leave_frame("Continue to ConnectPay")
    page = person.page
    await expect(page.get_by_role("heading", level=1)).to_have_text("ConnectPay (emulator)")
    assert page.url.startswith(stacks["connectpay"].emulator.tls_base_url)
    assert page.frames == [page.main_frame]  # full window: nothing of ours around it
    if customer:
        await page.get_by_label("Customer").select_option(label=customer)
    await page.get_by_role("button", name=decision).click()


async def test_psd2_allow_links_the_chosen_accounts(person: Person, sage_calls, site: SageSite,
                                                    sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site, CONNECTPAY_PSD2_ID)
    assert await person.current_step() == "Sign in to your bank"
    await person.check("ConnectPay: redirect interstitial")
    await at_connectpay(person, stacks, "Allow")

    frame = await person.expect_heading(ACCOUNTS)
    assert "at ConnectPay." in await person.text()  # "Accounts of <customer> at ConnectPay."
    await person.check("ConnectPay: accounts")
    names = [" ".join((await label.inner_text()).split()) for label in await frame.locator("label").all()]
    assert any(n.startswith("Main account") for n in names), names
    for box in await frame.get_by_role("checkbox").all():
        if not (await box.evaluate("b => b.labels[0].textContent")).startswith("Main account"):
            await box.uncheck()
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1
    assert [a["accountName"].split(" ••")[0] for a in patch.body["data"]["bankAccounts"]] == ["Main account"]


async def test_psd2_deny_explains_and_links_nothing(person: Person, sage_calls, site: SageSite,
                                                    sage: SageEmulator, stacks) -> None:
    visit = await start(person, sage_calls, site, CONNECTPAY_PSD2_ID)
    await at_connectpay(person, stacks, "Deny")
    await person.expect_heading("You didn't allow access")
    assert "no accounts were shared" in await person.text()
    await person.check("ConnectPay: denied")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert sage.patches == []


async def baas_sign_in(person: Person, *, password: str = PASSWORD) -> None:
    await person.expect_heading("Sign in to ConnectPay")
    await person.fill("Email address", EMAIL)
    await person.fill("Password", password)
    await person.press("Sign in")


async def test_baas_wrong_then_right_text_message_code(person: Person, sage_calls, site: SageSite,
                                                       sage: SageEmulator) -> None:
    visit = await start(person, sage_calls, site, CONNECTPAY_BAAS_ID)
    await person.check("ConnectPay BaaS: sign-in form")
    await baas_sign_in(person, password="not the password")
    await person.expect_heading("Sign in to ConnectPay")
    await person.expect_error_announced("There is a problem")
    await person.check("ConnectPay BaaS: sign-in refused")

    await baas_sign_in(person)
    await person.expect_heading("Enter the code from your text message")
    assert await person.current_step() == "Confirm it's you"
    await person.check("ConnectPay BaaS: code")
    await person.fill("Code", "000001")
    await person.press("Confirm")
    await person.expect_heading("Enter the code from your text message")
    await person.expect_error_announced("That code is not right", field="Code")
    await person.check("ConnectPay BaaS: code, wrong")
    await person.fill("Code", BAAS_OTP)
    await person.press("Confirm")

    await person.expect_heading(ACCOUNTS)
    await person.check("ConnectPay BaaS: accounts")
    await person.press("Share with Sage")
    patch = await person.expect_linked(visit, sage)
    assert len(sage.patches) == 1
    assert patch.body["data"]["bankAccounts"]


async def test_choose_how_to_connect(person: Person, sage_calls, site: SageSite) -> None:
    await start(person, sage_calls, site, CONNECTPAY_ANY_ID)
    frame = await person.expect_heading("How do you want to connect ConnectPay?")
    await person.check("ConnectPay: choose how")
    await person.press("Continue")
    await person.expect_error_announced("Choose where to sign in.")
    group = frame.get_by_role("group", name="Where to sign in")
    await expect(group).to_have_accessible_description(re.compile("Error:"))
    await person.check("ConnectPay: choose how, nothing chosen")
    await frame.get_by_label("Here, with the email and password of your ConnectPay user").check()
    await person.press("Continue")
    await person.expect_heading("Sign in to ConnectPay")


async def linked(person: Person, sage_calls, site: SageSite, sage: SageEmulator, stacks, bank_id: str) -> dict:
    if bank_id == CONNECTPAY_PSD2_ID:
        await start(person, sage_calls, site, bank_id)
        await at_connectpay(person, stacks, "Allow")
    else:
        await start(person, sage_calls, site, bank_id)
        await baas_sign_in(person)
        await person.expect_heading("Enter the code from your text message")
        await person.fill("Code", BAAS_OTP)
        await person.press("Confirm")
    await person.expect_heading(ACCOUNTS)
    await person.press("Share with Sage")
    await person.expect_heading("Back in Sage")
    account = sage.patches[-1].body["data"]["bankAccounts"][0]
    account["bankAccountId"] = await sage_calls.account_created(account["bankAccountExternalId"], bank_id=bank_id)
    person.in_frame = True
    return account


async def test_psd2_reauthorisation(person: Person, sage_calls, site: SageSite, sage: SageEmulator, stacks) -> None:
    account = await linked(person, sage_calls, site, sage, stacks, CONNECTPAY_PSD2_ID)
    visit = await start(person, sage_calls, site, CONNECTPAY_PSD2_ID, path="/authrefresh",
                        externalId=account["bankAccountExternalId"], bankaccount=account["bankAccountId"])
    await person.check("ConnectPay: reconnect interstitial")
    await at_connectpay(person, stacks, "Allow")
    # No choice this time: every linked account is still reachable, so the person goes straight back to Sage.
    patch = await person.expect_linked(visit, sage)
    assert patch.body == {"data": {"status": "success"}}


async def test_psd2_reauthorisation_as_another_customer_is_refused(person: Person, sage_calls, site: SageSite,
                                                                   sage: SageEmulator, stacks) -> None:
    account = await linked(person, sage_calls, site, sage, stacks, CONNECTPAY_PSD2_ID)
    visit = await start(person, sage_calls, site, CONNECTPAY_PSD2_ID, path="/authrefresh",
                        externalId=account["bankAccountExternalId"], bankaccount=account["bankAccountId"])
    await at_connectpay(person, stacks, "Allow", customer="Other Company UAB")
    await person.expect_error_page()
    assert "does not reach every account you linked before" in await person.text()
    await person.check("ConnectPay: reconnect as someone else")
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(visit.redirect_uri, visit.state)
    assert len(sage.patches) == 1  # the onboarding's only


async def test_baas_reauthorisation(person: Person, sage_calls, site: SageSite, sage: SageEmulator, stacks) -> None:
    account = await linked(person, sage_calls, site, sage, stacks, CONNECTPAY_BAAS_ID)
    visit = await start(person, sage_calls, site, CONNECTPAY_BAAS_ID, path="/authrefresh",
                        externalId=account["bankAccountExternalId"], bankaccount=account["bankAccountId"])
    await baas_sign_in(person)
    await person.expect_heading("Enter the code from your text message")
    await person.fill("Code", BAAS_OTP)
    await person.press("Confirm")
    patch = await person.expect_linked(visit, sage)
    assert patch.body == {"data": {"status": "success"}}
