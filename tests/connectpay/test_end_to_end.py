"""ConnectPay end to end, as a third party would test it: only the public fixtures of
``connector.testing.fixtures`` plus the ConnectPay emulator, everything over real HTTP.

Sage's signed notification → ``/auth`` (or ``/authrefresh``) → our pages → ConnectPay (emulated) → our callback →
``PATCH /v1/authorisations`` at the Sage emulator → the browser goes back to Sage's ``redirect_uri`` with ``state``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlsplit

import pytest

from connector.testing.connectpay import ConnectPayEmulator
from connector.testing.fixtures import DEMO_BANK_ID

PSD2_BANK = "8e7f9a2c-0000-4000-8000-0000000000e1"
BAAS_BANK = "8e7f9a2c-0000-4000-8000-0000000000e2"
BANKS = [
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
    {"sage_bank_id": PSD2_BANK, "name": "ConnectPay", "provider": "connectpay", "options": {"mode": "psd2"}},
    {"sage_bank_id": BAAS_BANK, "name": "ConnectPay Business", "provider": "connectpay",
     "options": {"mode": "baas"}},
]
EMAIL = "anna@example.com"
PASSWORD = "correct horse battery"
EXPLANATION = "ConnectPay's own page opens next, where you sign in and choose what to share."
CHOOSE = "Choose the accounts to share with Sage"
TOKEN = "/auth/v1/oauth2/token"
LOGOUT = "/baas-sca/user-management/client/users/logout"


@pytest.fixture
async def cp() -> AsyncIterator[ConnectPayEmulator]:
    async with ConnectPayEmulator() as emulator:
        yield emulator


@pytest.fixture
async def connector(connector_factory, cp, tmp_path):
    """The connector under test: Demo Bank plus one ConnectPay bank per mode, ConnectPay pointing at the emulator."""
    key_file = tmp_path / "connectpay-rsa-public.pem"
    key_file.write_bytes(cp.public_key_pem())
    running = await connector_factory(banks=BANKS, providers={"demobank": {}, "connectpay": cp.provider_config(key_file)})
    cp.redirect_urls.append(f"{running.url}/providers/connectpay/callback")  # registered at ConnectPay
    return running


@pytest.fixture
def browser(browser, cp):
    browser.foreign = (cp.tls_base_url,)  # ConnectPay's own page answers its form with a 302, as real sites do
    return browser


def callback_hops(browser, connector) -> list[tuple[str, str, int, str]]:
    return [h for h in browser.hops if h[1].startswith(f"{connector.url}/providers/connectpay/callback")]


def back_with_state(page, state: str) -> None:
    assert page.left_to is not None, (page.h1, page.text)
    assert parse_qs(urlsplit(page.left_to).query)["state"] == [state]


async def to_connectpay(browser, sage_calls, *, bank: str = PSD2_BANK, **auth):
    """Sage's notification, then /auth (or /authrefresh): our 'Continue to ConnectPay' page, then ConnectPay's."""
    authorisation_id = await sage_calls.announce(bank)
    state = "st-" + authorisation_id
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=bank, state=state, **auth))
    assert page.status == 200, page.text
    assert page.h1 == "Continue to ConnectPay"
    assert EXPLANATION in page.text
    url, attrs = page.link("Continue to ConnectPay")
    assert attrs.get("target") == "_top"  # leaves Sage's iframe: ConnectPay's page opens in the full window
    page = await browser.get(url)  # authorize → the emulator's sign-in page
    assert page.url.startswith(browser.foreign[0]) and page.has_button("Allow") and page.has_button("Deny")
    return authorisation_id, state, page


async def psd2_onboard(browser, sage_calls, connector, pick: list[str] | None = None):
    authorisation_id, state, page = await to_connectpay(browser, sage_calls)
    page = await browser.submit(page, button="Allow")
    assert page.h1 == CHOOSE, page.text
    done = await browser.submit(page, {"account": pick} if pick else None, button="Share with Sage")
    back_with_state(done, state)
    return authorisation_id, done


async def baas_sign_in(browser, sage_calls, cp, **auth):
    authorisation_id = await sage_calls.announce(BAAS_BANK)
    state = "st-" + authorisation_id
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=BAAS_BANK, state=state, **auth))
    assert page.h1 == "Sign in to ConnectPay", page.text
    page = await browser.submit(page, {"Email address": EMAIL, "Password": PASSWORD}, button="Sign in")
    assert page.h1 == "Enter the code from your text message", page.text
    assert cp.last_otp is not None
    wrong = f"{(int(cp.last_otp) + 1) % 10 ** 6:06d}"
    page = await browser.submit(page, {"Code": wrong}, button="Confirm")
    assert page.h1 == "Enter the code from your text message"
    assert "That code is not right" in page.text
    page = await browser.submit(page, {"Code": cp.last_otp}, button="Confirm")
    return authorisation_id, state, page


# --- psd2 -------------------------------------------------------------------------------------------------------


async def test_psd2_onboarding_patches_the_chosen_accounts_and_returns_to_sage(
    sage, sage_calls, browser, connector, cp
):
    pick = ["LT-ACC-0001", "LT-ACC-0002-XXX:USD"]
    authorisation_id, _ = await psd2_onboard(browser, sage_calls, connector, pick)

    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    accounts = patch.body["data"]["bankAccounts"]
    assert sorted(a["accountName"].split(" ••")[0] for a in accounts) == ["Currency account (USD)", "Main account"]
    assert sorted(a["accountIdentifier"] for a in accounts) == ["LT601010012345678901", "USD:LT601010012345678902"]
    assert len({a["bankAccountExternalId"] for a in accounts}) == 2

    # ConnectPay sent the person to our callback with code and state; we answered 303 to our own page, and neither
    # the code nor the state travels any further.
    [(_, callback_url, status, location)] = callback_hops(browser, connector)
    sent = parse_qs(urlsplit(callback_url).query)
    assert status == 303 and sent["code"] and sent["state"]
    assert location.startswith(f"{connector.url}/journey/")
    assert "code" not in location and "state" not in location and sent["code"][0] not in location

    # Replaying ConnectPay's return address: an error page, and the code is never exchanged twice.
    replay = await browser.get(callback_url)
    assert replay.status == 410 and replay.h1 == "This link has already been used"
    assert len(cp.calls(TOKEN)) == 1 and len(sage.patches) == 1


async def test_psd2_deny_shows_the_way_back_and_patches_nothing(sage, sage_calls, browser, cp):
    _, state, page = await to_connectpay(browser, sage_calls)
    page = await browser.submit(page, button="Deny")
    assert page.left_to is None and page.h1 == "You didn't allow access"
    assert "You cancelled at ConnectPay" in page.text
    back, _ = page.link("Back to Sage")
    assert parse_qs(urlsplit(back).query)["state"] == [state]
    assert sage.patches == [] and cp.calls(TOKEN) == []


async def test_a_state_issued_for_another_provider_is_refused(sage_calls, browser, connector, cp):
    authorisation_id = await sage_calls.announce(DEMO_BANK_ID)
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    page = await browser.submit(page, {"User name": "redirect", "Password": "x"}, button="Sign in")
    assert page.h1 == "Continue to Demo Bank"
    demo_url, _ = page.link("Continue to your bank")
    [demo_state] = parse_qs(urlsplit(demo_url).query)["state"]

    hops = len(browser.hops)
    refused = await browser.get(f"{connector.url}/providers/connectpay/callback?code=stolen&state={demo_state}")
    assert len(browser.hops) == hops  # answered in place, no redirect into any journey
    assert refused.status == 404 and refused.h1 == "We can't find this page"
    assert cp.calls(TOKEN) == []
    # Refusing it consumed nothing: Demo Bank's own return address still works.
    page = await browser.get(demo_url)
    assert page.h1 == CHOOSE


async def test_psd2_reauthorisation_patches_status_only_and_returns_to_sage(sage, sage_calls, browser, connector, cp):
    await psd2_onboard(browser, sage_calls, connector)
    external_id = sage.patches[0].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    bank_account_id = await sage_calls.account_created(external_id, bank_id=PSD2_BANK)

    _, state, page = await to_connectpay(browser, sage_calls, path="/authrefresh", externalId=external_id,
                                         bankaccount=bank_account_id)
    done = await browser.submit(page, button="Allow")  # every linked account is reachable: no choice to make
    back_with_state(done, state)
    assert len(sage.patches) == 2
    assert sage.patches[-1].body == {"data": {"status": "success"}}
    assert len(cp.calls(TOKEN)) == 2 and len(cp.active_grants()) == 1  # the old refresh token was revoked


async def test_available_accounts_lists_every_account_of_a_connectpay_consent(
    sage, sage_calls, browser, connector, http
):
    await psd2_onboard(browser, sage_calls, connector, ["LT-ACC-0001"])
    [linked] = sage.patches[0].body["data"]["bankAccounts"]
    async with http.get(f"{connector.url}/availableaccounts", params={"externalId": linked["bankAccountExternalId"]},
                        headers={"Authorization": f"Bearer {sage.identity.provider_api_token()}"}) as resp:
        assert resp.status == 200, await resp.text()
        listed = await resp.json()
    names = sorted(a["accountName"].split(" ••")[0] for a in listed)
    assert names == ["Currency account (EUR)", "Currency account (USD)", "Main account"]  # the blocked one is not
    assert linked["bankAccountExternalId"] in {a["externalId"] for a in listed}
    assert len({a["externalId"] for a in listed}) == 3


# --- baas -------------------------------------------------------------------------------------------------------


async def test_baas_onboarding_with_sms_code_patches_and_logs_out(sage, sage_calls, browser, cp):
    authorisation_id, state, page = await baas_sign_in(browser, sage_calls, cp)
    assert page.h1 == CHOOSE, page.text
    done = await browser.submit(page, {"account": ["BAAS-ACC-1"]}, button="Share with Sage")
    back_with_state(done, state)

    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    [account] = patch.body["data"]["bankAccounts"]
    assert account["accountName"].startswith("BaaS wallet ••")
    assert account["accountIdentifier"] == "LT601010012345670001"
    assert len(cp.calls(LOGOUT)) == 1 and cp.active_user_sessions() == []  # the ConnectPay session was ended


async def test_baas_reauthorisation_patches_status_only_and_returns_to_sage(sage, sage_calls, browser, cp):
    _, _, page = await baas_sign_in(browser, sage_calls, cp)
    await browser.submit(page, button="Share with Sage")
    external_id = sage.patches[0].body["data"]["bankAccounts"][0]["bankAccountExternalId"]
    bank_account_id = await sage_calls.account_created(external_id, bank_id=BAAS_BANK)

    _, state, done = await baas_sign_in(browser, sage_calls, cp, path="/authrefresh", externalId=external_id,
                                        bankaccount=bank_account_id)
    back_with_state(done, state)
    assert len(sage.patches) == 2
    assert sage.patches[-1].body == {"data": {"status": "success"}}
    assert len(cp.calls(LOGOUT)) == 2 and cp.active_user_sessions() == []
