"""Demo Bank end to end: signed notification → /auth → our pages → PATCH at Sage → redirect back with state."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from connector.testing.fixtures import DEMO_BANK_ID


async def sign_in(browser, sage_calls, user: str, password: str = "secret", **auth):
    authorisation_id = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(authorisation_id, **auth))
    assert page.status == 200, page.text
    assert page.h1 == "Sign in to Demo Bank"
    page = await browser.submit(page, {"User name": user, "Password": password}, button="Sign in")
    return authorisation_id, page


async def test_onboarding_links_every_account_and_returns_to_sage(sage, sage_calls, browser):
    authorisation_id, page = await sign_in(browser, sage_calls, "alice")
    assert page.h1 == "Choose the accounts to share with Sage"
    assert "Step 3 of 4" in page.text
    done = await browser.submit(page, button="Share with Sage")
    assert done.left_to is not None
    query = parse_qs(urlsplit(done.left_to).query)
    assert len(query["state"]) == 1
    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    accounts = patch.body["data"]["bankAccounts"]
    assert [a["accountName"].split(" ••")[0] for a in accounts] == ["Business Current", "Business Savings"]
    assert all(a["bankIdentifier"] == "040004" and a["accountIdentifier"] for a in accounts)
    assert len({a["bankAccountExternalId"] for a in accounts}) == 2


async def test_one_time_code_wrong_then_right(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "otp")
    assert page.h1 == "Enter your security code"
    assert "Step 2 of 4" in page.text
    page = await browser.submit(page, {"Security code": "000000"}, button="Confirm")
    assert page.h1 == "Enter your security code"
    assert "That code isn't right" in page.text
    page = await browser.submit(page, {"Security code": "123456"}, button="Confirm")
    assert page.h1 == "Choose the accounts to share with Sage"
    done = await browser.submit(page, button="Share with Sage")
    assert done.left_to and len(sage.patches) == 1


async def test_wrong_password_shows_the_form_again(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "bob", password="wrong")
    assert page.h1 == "Sign in to Demo Bank"
    assert "didn't accept these details" in page.text
    assert sage.patches == []


async def test_locked_account_ends_with_a_way_back_and_no_patch(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "locked")
    assert page.status == 502 or page.status >= 400
    assert "locked" in page.text
    back, _ = page.link("Back to Sage")
    assert "state=" in back
    assert sage.patches == []


async def test_cancel_sends_nothing_to_sage(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "otp")
    page = await browser.submit(page, button="Cancel and go back to Sage")
    assert page.h1 == "You cancelled connecting your bank"
    page.link("Back to Sage")
    assert sage.patches == []


async def test_redirect_step_leaves_the_iframe_and_comes_back(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "redirect")
    assert page.h1 == "Continue to Demo Bank"
    url, attrs = page.link("Continue to your bank")
    assert attrs.get("target") == "_top"
    page = await browser.get(url)
    assert page.h1 == "Choose the accounts to share with Sage"
    # The callback's state is single use: replaying the bank's return address is refused.
    replay = await browser.get(url)
    assert replay.status == 410


async def test_decoupled_waiting_page_continues_after_approval(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "decoupled")
    assert page.h1 == "Approve in your banking app"
    page = await browser.submit(page, button="Check now")
    assert page.h1 == "Approve in your banking app"  # not approved yet
    page = await browser.get(page.url + "/poll")  # what the page's script does by itself
    assert page.h1 == "Choose the accounts to share with Sage"


async def test_patch_failure_shows_an_error_and_links_nothing(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "carol")
    sage.fail_next(400, count=1, path_prefix="/v1/authorisations")
    page = await browser.submit(page, button="Share with Sage")
    assert page.left_to is None
    assert page.h1 == "We couldn't tell Sage about your accounts"
    assert sage.patches == []


async def test_reauthorisation_patches_status_only(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "dave")
    await browser.submit(page, button="Share with Sage")
    external_id = sage.patches[0].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    bank_account_id = await sage_calls.account_created(external_id)
    authorisation_id = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(authorisation_id, path="/authrefresh", externalId=external_id,
                                                 bankaccount=bank_account_id))
    assert page.h1 == "Sign in to Demo Bank"
    page = await browser.submit(page, {"User name": "dave", "Password": "x"}, button="Sign in")
    page = await browser.submit(page, button="Reconnect")
    assert page.left_to is not None
    assert sage.patches[-1].body == {"data": {"status": "success"}}


async def test_reauthorisation_as_someone_else_is_refused(sage, sage_calls, browser):
    _, page = await sign_in(browser, sage_calls, "erin")
    await browser.submit(page, button="Share with Sage")
    external_id = sage.patches[0].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    authorisation_id = await sage_calls.announce()
    page = await browser.get(sage_calls.auth_url(authorisation_id, path="/authrefresh", externalId=external_id))
    page = await browser.submit(page, {"User name": "mallory", "Password": "x"}, button="Sign in")
    page = await browser.submit(page, button="Reconnect")
    assert page.h1 == "These aren't the same accounts"
    assert len(sage.patches) == 1
