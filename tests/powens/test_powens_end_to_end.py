"""Powens end to end, as a third party would test it: only the public fixtures of ``connector.testing.fixtures`` plus
the Powens emulator, everything over real HTTP.

Sage's signed notification → ``/auth`` (or ``/authrefresh``) → our pages (credentials forms, waiting pages) or the
bank's own page (webauth) → our callback → ``PATCH /v1/authorisations`` at the Sage emulator → the browser goes back
to Sage's ``redirect_uri`` with ``state``. Powens webhooks arrive through the core's ``/providers/powens/webhook``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest

from connector.testing.fixtures import DEMO_BANK_ID
from connector.testing.powens import (
    CREDENTIALS_BANK,
    TWO_SOURCE_BANK,
    WEBAUTH_BANK,
    WEBAUTH_FIELDS_BANK,
    PowensEmulator,
)

CREDENTIALS = "6d7c3c1e-0001-4a00-8000-00000000c0de"
WEBAUTH = "6d7c3c1e-0002-4a00-8000-00000000c0de"
TWO_SOURCES = "6d7c3c1e-0003-4a00-8000-00000000c0de"
REGION = "6d7c3c1e-0004-4a00-8000-00000000c0de"
BANKS = [
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
    {"sage_bank_id": CREDENTIALS, "name": "Credentials Bank", "provider": "powens", "provider_bank": CREDENTIALS_BANK},
    {"sage_bank_id": WEBAUTH, "name": "Webauth Bank", "provider": "powens", "provider_bank": WEBAUTH_BANK},
    {"sage_bank_id": TWO_SOURCES, "name": "Two Source Bank", "provider": "powens", "provider_bank": TWO_SOURCE_BANK},
    {"sage_bank_id": REGION, "name": "Region Bank", "provider": "powens", "provider_bank": WEBAUTH_FIELDS_BANK},
]
BANK_NAMES = {b["sage_bank_id"]: b["name"] for b in BANKS}
CHOOSE = "Choose the accounts to share with Sage"
SHARE = "Share with Sage"
CONTINUE = "Continue to your bank"
PASSWORD = "s3cret pass"
CREATE = "/users/me/connections"
WEBHOOK_PATH = "/providers/powens/webhook"


@pytest.fixture
async def powens_api() -> AsyncIterator[PowensEmulator]:
    async with PowensEmulator() as emulator:
        yield emulator


@pytest.fixture
async def connector(connector_factory, powens_api):
    """The connector under test: Demo Bank plus three Powens banks, Powens pointing at the emulator."""
    config = powens_api.config(requests_per_minute=100_000, sync_timeout_seconds=5, timeout_seconds=5)
    return await connector_factory(banks=BANKS, providers={"demobank": {}, "powens": config})


@pytest.fixture
def browser(browser, powens_api):
    browser.foreign = (powens_api.root,)  # the bank's page answers its form with a 302, as real sites do
    return browser


# --- helpers ----------------------------------------------------------------------------------------------------


def back_with_state(page, state: str) -> None:
    assert page.left_to is not None, (page.status, page.h1, page.text)
    assert parse_qs(urlsplit(page.left_to).query)["state"] == [state]


def stopped_with_way_back(page, state: str, *, declined: bool = False) -> None:
    """A clear page that ends the journey with a 'Back to Sage' link carrying Sage's state: an error status, or
    for the person's own refusal at the bank, the plain "You didn't allow access" page."""
    assert page.left_to is None, page.h1
    assert page.h1 == "You didn't allow access" if declined else page.status >= 400, (page.status, page.h1)
    back, _ = page.link("Back to Sage")
    assert parse_qs(urlsplit(back).query)["state"] == [state]
    assert not page.forms or not any(f.controls for f in page.forms)


def creations(powens: PowensEmulator) -> int:
    return sum(1 for c in powens.calls if c.method == "POST" and c.path.startswith(CREATE))


async def open_auth(browser, sage_calls, bank: str = CREDENTIALS, **auth):
    authorisation_id = await sage_calls.announce(bank)
    state = "st-" + authorisation_id
    page = await browser.get(sage_calls.auth_url(authorisation_id, bank_id=bank, state=state, **auth))
    return authorisation_id, state, page


async def sign_in(browser, sage_calls, login: str, password: str = PASSWORD, bank: str = CREDENTIALS, **auth):
    authorisation_id, state, page = await open_auth(browser, sage_calls, bank, **auth)
    assert page.status == 200, page.text
    assert page.h1 == f"Sign in to {BANK_NAMES[bank]}", page.h1
    page = await browser.submit(page, {"Customer number": login, "Password": password}, button="Continue")
    return authorisation_id, state, page


async def share(browser, page, state: str, pick: list[str] | None = None):
    assert page.h1 == CHOOSE, (page.h1, page.text)
    ids = pick if pick is not None else [c.value for f in page.forms for c in f.controls if c.name == "account"]
    done = await browser.submit(page, {"account": ids}, button=SHARE)
    back_with_state(done, state)
    return done


async def onboard(browser, sage_calls, sage, login: str = "alice"):
    authorisation_id, state, page = await sign_in(browser, sage_calls, login)
    await share(browser, page, state)
    patch = sage.patches[-1]
    assert patch.authorisation_id == authorisation_id
    return patch.body["data"]["bankAccounts"]


async def to_bank(browser, page, powens: PowensEmulator):
    """Our 'Continue to <bank>' page → the bank's own page (full window)."""
    assert page.h1.startswith("Continue to ") and "Powens" not in page.h1, (page.status, page.h1, page.text)
    url, attrs = page.link(CONTINUE)
    assert attrs.get("target") == "_top"  # leaves Sage's iframe
    assert url.startswith(powens.root + "/bank/authorize")
    bank = await browser.get(url)
    assert bank.has_button("Allow") and bank.has_button("Deny")
    return bank


async def bank_return(browser, connector, bank_page, decision: str = "Allow") -> str:
    """Press Allow (or Deny) at the bank, but stop on the way back: the callback URL the browser would open."""
    callback = f"{connector.url}/providers/powens/callback"
    saved = browser.stop_at
    browser.stop_at = saved + (callback,)
    try:
        left = await browser.submit(bank_page, button=decision)
    finally:
        browser.stop_at = saved
    assert left.left_to and left.left_to.startswith(callback + "?")
    return left.left_to


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def available(http, connector, sage, external_id: str) -> list[dict]:
    async with http.get(f"{connector.url}/availableaccounts", params={"externalId": external_id},
                        headers={"Authorization": f"Bearer {sage.identity.provider_api_token()}"}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


# --- credentials ------------------------------------------------------------------------------------------------


async def test_credentials_onboarding_patches_the_chosen_accounts_and_returns_to_sage(
    sage, sage_calls, browser, powens_api
):
    authorisation_id, state, page = await sign_in(browser, sage_calls, "alice")
    assert page.h1 == CHOOSE and "Business current account" in page.text and "Business card" in page.text
    offered = [c for f in page.forms for c in f.controls if c.name == "account"]
    assert len(offered) == 2 and not any(c.checked for c in offered)  # nothing ticked for the person
    await share(browser, page, state, [offered[0].value])

    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    [account] = patch.body["data"]["bankAccounts"]
    assert account["accountName"].startswith("Business current account ••")
    assert account["bankAccountExternalId"] and account["accountIdentifier"]
    # Only the chosen account was activated, in one call; the values reached Powens encrypted and decrypted fine.
    assert powens_api.activation_calls == [[int(offered[0].value)]]
    assert powens_api.received_fields[-1] == {"login": "alice", "password": PASSWORD}
    assert all(not u.temporary for u in powens_api.users.values())  # the user was made permanent


async def test_regex_and_required_fields_are_checked_before_anything_reaches_powens(
    sage, sage_calls, browser, powens_api
):
    _, state, page = await open_auth(browser, sage_calls)
    page = await browser.submit(page, {"Customer number": "NO WAY!", "Password": ""}, button="Continue")
    assert page.h1 == "Sign in to Credentials Bank"
    assert "Customer number isn't in the expected format." in page.text
    assert "Enter password." in page.text
    assert creations(powens_api) == 0 and powens_api.received_fields == []
    page = await browser.submit(page, {"Customer number": "alice", "Password": ""}, button="Continue")
    assert "Enter password." in page.text and creations(powens_api) == 0
    page = await browser.submit(page, {"Customer number": "alice", "Password": PASSWORD}, button="Continue")
    await share(browser, page, state)
    assert creations(powens_api) == 1 and len(sage.patches) == 1


async def test_wrong_password_shows_the_form_again_then_links(sage, sage_calls, browser, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "wrongpass")
    assert page.h1 == "Sign in to Credentials Bank"
    assert "Your bank didn't accept these details" in page.text
    assert powens_api.connections == {}  # Powens keeps nothing of a refused creation
    page = await browser.submit(page, {"Customer number": "alice", "Password": PASSWORD}, button="Continue")
    await share(browser, page, state)
    assert len(sage.patches) == 1


async def test_wrong_password_three_times_stops_with_a_way_back_and_no_patch(sage, sage_calls, browser):
    _, state, page = await sign_in(browser, sage_calls, "wrongpass")
    page = await browser.submit(page, {"Customer number": "wrongpass", "Password": "x"}, button="Continue")
    assert page.h1 == "Sign in to Credentials Bank"
    page = await browser.submit(page, {"Customer number": "wrongpass", "Password": "x"}, button="Continue")
    stopped_with_way_back(page, state)
    assert "refused these details several times" in page.text
    assert sage.patches == []


async def test_one_time_code_wrong_format_wrong_code_then_right(sage, sage_calls, browser, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "otp")
    assert page.h1 == "Your bank needs more information"
    assert "Enter the 6-digit code we sent to your phone ending in 42." in page.text
    assert "Step 2 of 4" in page.text
    posts = powens_api.connection_posts
    page = await browser.submit(page, {"Code received by text message": "12ab"}, button="Continue")
    assert "Code received by text message isn't in the expected format." in page.text
    page = await browser.submit(page, {"Code received by text message": ""}, button="Continue")
    assert "Enter code received by text message." in page.text
    assert powens_api.connection_posts == posts  # neither reached Powens
    wrong = f"{(int(powens_api.otp) + 1) % 10 ** 6:06d}"
    page = await browser.submit(page, {"Code received by text message": wrong}, button="Continue")
    assert page.h1 == "Your bank needs more information"
    assert "Your bank didn't accept these details" in page.text
    page = await browser.submit(page, {"Code received by text message": powens_api.otp}, button="Continue")
    await share(browser, page, state)
    assert len(sage.patches) == 1


async def test_decoupled_waiting_page_polls_through_validating(sage, sage_calls, browser, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "decoupled")
    assert page.h1 == "Approve in your bank's app"
    assert "Step 2 of 4" in page.text
    [status] = re.findall(r'data-poll-url="([^"]+)"', page.html)
    assert status == page.url + "/poll"
    page = await browser.get(status)  # what the page's script does by itself: resume in the background
    assert page.h1 == "Waiting for your bank"
    assert [s.state for c in powens_api.connections.values() for s in c.sources] == ["validating"]
    page = await browser.submit(page, button="Check now")  # without JavaScript: the button
    await share(browser, page, state)
    assert len(sage.patches) == 1


async def test_sca_required_is_cleared_while_the_person_is_present(sage, sage_calls, browser, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "sca")
    await share(browser, page, state)  # the person-present sync cleared it: straight to the accounts
    assert len(sage.patches) == 1
    assert any(c.method == "POST" and re.fullmatch(r"/users/me/connections/\d+", c.path) for c in powens_api.calls)


async def test_webauth_required_on_a_credentials_connection_goes_to_the_bank_and_back(
    sage, sage_calls, browser, powens_api
):
    _, state, page = await sign_in(browser, sage_calls, "webauthreq")
    bank = await to_bank(browser, page, powens_api)
    page = await browser.submit(bank, button="Allow")
    await share(browser, page, state)
    assert len(sage.patches) == 1 and len(powens_api.connections) == 1


async def test_action_needed_waits_for_the_person_to_act_at_the_bank(sage, sage_calls, browser, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "actionneeded")
    assert page.h1 == "Your bank needs you to act"
    assert "accept the new terms and conditions" in page.text
    [connection_id] = powens_api.connections
    powens_api.resolve(connection_id)  # the person accepted the terms in their banking app
    page = await browser.submit(page, button="Check again")
    await share(browser, page, state)
    assert len(sage.patches) == 1


async def test_password_expired_asks_for_the_new_password(sage, sage_calls, browser, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "passwordexpired")
    assert page.h1 == "Change your password"
    page = await browser.submit(page, {"New password": "n3w pass"}, button="Continue")
    await share(browser, page, state)
    assert powens_api.received_fields[-1] == {"new_password": "n3w pass"}
    assert len(sage.patches) == 1


@pytest.mark.parametrize("login, words", [
    ("ratelimiting", "Your bank is busy right now"),
    ("unavailable", "Your bank's service is unavailable right now"),
    ("bug", "Something went wrong at our data provider"),
    ("notsupported", "These accounts can't be connected for this bank"),
    ("weird", "We couldn't connect to your bank"),
])
async def test_states_that_cannot_be_fixed_here_end_on_a_clear_page(sage, sage_calls, browser, login, words):
    _, state, page = await sign_in(browser, sage_calls, login)
    stopped_with_way_back(page, state)
    assert words in page.text
    assert sage.patches == []


# --- webauth ----------------------------------------------------------------------------------------------------


async def test_webauth_onboarding_leaves_the_iframe_and_comes_back(sage, sage_calls, browser, connector, powens_api):
    authorisation_id, state, page = await open_auth(browser, sage_calls, WEBAUTH)
    bank = await to_bank(browser, page, powens_api)
    assert bank.h1 == "Webauth Bank"
    hops = len(browser.hops)
    page = await browser.submit(bank, button="Allow")
    # Bank → our callback (302) → our own page (303): neither the state nor the connection id goes further.
    (_, _, s1, callback), (_, callback_url, s2, location) = browser.hops[hops:hops + 2]
    assert s1 == 302 and callback.startswith(f"{connector.url}/providers/powens/callback?")
    assert s2 == 303 and location.startswith(f"{connector.url}/journey/") and "state" not in location
    assert page.h1 == CHOOSE and "Savings account" in page.text
    await share(browser, page, state)
    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    assert [a["accountName"].split(" ••")[0] for a in patch.body["data"]["bankAccounts"]] == ["Savings account"]
    # The bank's return address is single use.
    replay = await browser.get(callback_url)
    assert replay.status == 410 and replay.h1 == "This link has already been used"
    assert len(sage.patches) == 1


async def test_webauth_deny_ends_with_a_way_back_and_no_patch(sage, sage_calls, browser, powens_api):
    _, state, page = await open_auth(browser, sage_calls, WEBAUTH)
    bank = await to_bank(browser, page, powens_api)
    page = await browser.submit(bank, button="Deny")
    stopped_with_way_back(page, state, declined=True)
    assert "You cancelled at your bank." in page.text
    assert sage.patches == []


async def test_two_sources_in_sequence(sage, sage_calls, browser, powens_api):
    authorisation_id, state, page = await open_auth(browser, sage_calls, TWO_SOURCES)
    assert page.h1 == "Sign in to Two Source Bank"
    page = await browser.submit(page, {"Customer number": "alice", "Password": PASSWORD, "Business": "on"},
                                button="Continue")
    assert page.h1 == CHOOSE and page.has_button("Add more accounts")
    assert "Savings account" not in page.text
    first = [c.value for f in page.forms for c in f.controls if c.type == "checkbox"]
    page = await browser.submit(page, {"account": first[:1]}, button="Add more accounts")
    bank = await to_bank(browser, page, powens_api)  # the second source is webauth: no form, straight on
    page = await browser.submit(bank, button="Allow")
    assert page.h1 == CHOOSE and not page.has_button("Add more accounts")
    assert "Savings account" in page.text and "Business current account" in page.text
    ticked = [c.value for f in page.forms for c in f.controls if c.type == "checkbox" and c.checked]
    assert ticked == first[:1]  # what the person ticked before adding a source is still ticked
    await share(browser, page, state)
    [patch] = sage.patches
    assert patch.authorisation_id == authorisation_id
    names = sorted(a["accountName"].split(" ••")[0] for a in patch.body["data"]["bankAccounts"])
    assert names == ["Business card", "Business current account", "Savings account"]
    [connection] = powens_api.connections.values()
    assert [s.name for s in connection.sources] == ["directaccess", "openapi"]
    assert len(powens_api.activation_calls) == 1  # one activation, after both sources
    assert powens_api.received_fields[0] == {"login": "alice", "password": PASSWORD, "website": "pro"}


async def test_webauth_with_a_field_asks_it_first_and_sends_it_encrypted(sage, sage_calls, browser, powens_api):
    _, state, page = await open_auth(browser, sage_calls, REGION)
    assert page.h1 == "Sign in to Region Bank" and "Your bank's own page opens after this one." in page.text
    page = await browser.submit(page, button="Continue")  # nothing chosen: shown again, nothing sent
    assert "Choose region." in page.text and powens_api.webauth_sessions == {}
    page = await browser.submit(page, {"South": "on"}, button="Continue")
    bank = await to_bank(browser, page, powens_api)
    assert powens_api.received_fields == [{"region": "south"}]  # a JWE in the query, decrypted by the emulator
    page = await browser.submit(bank, button="Allow")
    await share(browser, page, state)
    assert len(sage.patches) == 1


async def test_cancel_deletes_the_temporary_user_and_sends_nothing_to_sage(sage, sage_calls, browser, powens_api):
    _, _, page = await sign_in(browser, sage_calls, "otp")
    page = await browser.submit(page, button="Cancel and go back to Sage")
    assert page.h1 == "You cancelled connecting your bank"
    page.link("Back to Sage")
    assert sage.patches == [] and powens_api.connections == {}
    assert all(u.deleted for u in powens_api.users.values())


# --- re-authorisation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("broken", ["SCARequired", "webauthRequired", "wrongpass"])
async def test_reauthorisation_keeps_the_connection_and_accounts(
    sage, sage_calls, browser, connector, http, powens_api, broken
):
    linked = await onboard(browser, sage_calls, sage)
    external_ids = sorted(a["bankAccountExternalId"] for a in linked)
    bank_account_id = await sage_calls.account_created(external_ids[0], bank_id=CREDENTIALS)
    [connection_id] = powens_api.connections
    accounts_before = sorted(powens_api.accounts)
    users, activations = len(powens_api.users), list(powens_api.activation_calls)
    powens_api.set_state(connection_id, broken)

    authorisation_id, state, page = await open_auth(
        browser, sage_calls, CREDENTIALS, path="/authrefresh", externalId=external_ids[0],
        bankaccount=bank_account_id)
    if broken == "webauthRequired":
        bank = await to_bank(browser, page, powens_api)
        page = await browser.submit(bank, button="Allow")
    elif broken == "wrongpass":
        assert page.h1 == "Sign in to Credentials Bank again"
        assert "Your bank didn't accept these details" in page.text
        page = await browser.submit(page, {"Customer number": "alice", "Password": "n3w pass"}, button="Continue")
    back_with_state(page, state)

    assert len(sage.patches) == 2
    assert sage.patches[-1].authorisation_id == authorisation_id
    assert sage.patches[-1].body == {"data": {"status": "success"}}
    # The same connection and accounts: no new user, connection or activation.
    assert list(powens_api.connections) == [connection_id]
    assert powens_api.connections[connection_id].state is None
    assert sorted(powens_api.accounts) == accounts_before
    assert len(powens_api.users) == users and powens_api.activation_calls == activations
    assert sorted(a["externalId"] for a in await available(http, connector, sage, external_ids[0])) == external_ids


async def test_reauthorisation_refuses_a_connection_returned_for_someone_else(
    sage, sage_calls, browser, connector, powens_api
):
    linked = await onboard(browser, sage_calls, sage)
    [connection_id] = powens_api.connections
    powens_api.set_state(connection_id, "webauthRequired")
    _, state, page = await open_auth(browser, sage_calls, CREDENTIALS, path="/authrefresh",
                                     externalId=linked[0]["bankAccountExternalId"])
    bank = await to_bank(browser, page, powens_api)
    url = await bank_return(browser, connector, bank)
    page = await browser.get(with_query(url, id_connection=str(connection_id + 1000)))
    stopped_with_way_back(page, state)
    assert "Your bank sent back a connection we didn't expect." in page.text
    assert len(sage.patches) == 1


# --- bad input through the core ---------------------------------------------------------------------------------


async def test_a_tampered_state_is_refused_and_consumes_nothing(sage, sage_calls, browser, connector, powens_api):
    _, state, page = await open_auth(browser, sage_calls, WEBAUTH)
    bank = await to_bank(browser, page, powens_api)
    url = await bank_return(browser, connector, bank)
    [issued] = parse_qs(urlsplit(url).query)["state"]
    hops = len(browser.hops)
    for tampered in (issued[:-1] + ("A" if issued[-1] != "A" else "B"), "", "x" * 65):
        refused = await browser.get(with_query(url, state=tampered))
        assert refused.status == 404 and refused.h1 == "We can't find this page"
    assert len(browser.hops) == hops  # answered in place, no redirect into any journey
    assert sage.patches == []
    page = await browser.get(url)  # the genuine return still works
    await share(browser, page, state)


async def test_a_state_issued_for_another_provider_is_refused(sage, sage_calls, browser, connector):
    authorisation_id = await sage_calls.announce(DEMO_BANK_ID)
    page = await browser.get(sage_calls.auth_url(authorisation_id))
    page = await browser.submit(page, {"User name": "redirect", "Password": "x"}, button="Sign in")
    demo_url, _ = page.link(CONTINUE)
    [demo_state] = parse_qs(urlsplit(demo_url).query)["state"]
    refused = await browser.get(f"{connector.url}/providers/powens/callback?"
                                + urlencode({"state": demo_state, "id_connection": "1"}))
    assert refused.status == 404 and refused.h1 == "We can't find this page"
    page = await browser.get(demo_url)  # refusing it consumed nothing
    assert page.h1 == CHOOSE


async def test_a_callback_carrying_another_persons_connection_is_refused(
    sage, sage_calls, browser, connector, powens_api
):
    _, state_a, page_a = await open_auth(browser, sage_calls, WEBAUTH)
    _, state_b, page_b = await open_auth(browser, sage_calls, WEBAUTH)
    url_a = await bank_return(browser, connector, await to_bank(browser, page_a, powens_api))
    url_b = await bank_return(browser, connector, await to_bank(browser, page_b, powens_api))
    [id_b] = parse_qs(urlsplit(url_b).query)["id_connection"]
    # Person A's return address, carrying person B's connection: A's journey must not read B's accounts.
    page = await browser.get(with_query(url_a, id_connection=id_b))
    stopped_with_way_back(page, state_a)
    assert "Your bank sent back a connection we didn't expect." in page.text
    assert "Savings account" not in page.text
    # Person B's own return still works and links B's accounts only.
    page = await browser.get(url_b)
    await share(browser, page, state_b)
    assert len(sage.patches) == 1


@pytest.mark.parametrize("status", [409, 429, 500])
async def test_powens_refusing_the_activation_ends_on_a_clear_page(sage, sage_calls, browser, powens_api, status):
    _, state, page = await sign_in(browser, sage_calls, "alice")
    assert page.h1 == CHOOSE
    powens_api.fail_next(status, path=r"^/users/me/connections/\d+/accounts/", method="PUT", times=5,
                         retry_after="0")
    ids = [c.value for f in page.forms for c in f.controls if c.name == "account"]
    page = await browser.submit(page, {"account": ids}, button=SHARE)
    stopped_with_way_back(page, state)
    assert page.h1 == "We couldn't connect to your bank"
    assert sage.patches == [] and powens_api.activation_calls == []


@pytest.mark.parametrize("status", [409, 429, 500])
async def test_powens_refusing_the_start_ends_on_a_clear_page(sage, sage_calls, browser, powens_api, status):
    powens_api.fail_next(status, path=r"^/auth/init$", times=5, retry_after="0")
    _, state, page = await open_auth(browser, sage_calls)
    stopped_with_way_back(page, state)
    assert page.h1 == "We couldn't connect to your bank"
    assert sage.patches == [] and powens_api.users == {}


# --- webhook and available accounts -----------------------------------------------------------------------------


async def notifications_metric(http, connector) -> dict[str, float]:
    async with http.get(f"{connector.url}/metrics") as resp:
        text = await resp.text()
    found = {}
    for line in text.splitlines():
        m = re.match(r'connector_notifications_total\{new="(\w+)",type="providerWebhook:powens"\} (\S+)', line)
        if m:
            found[m.group(1)] = float(m.group(2))
    return found


async def test_webhook_through_the_core(sage, sage_calls, browser, connector, http, powens_api):
    await onboard(browser, sage_calls, sage)
    [connection_id] = powens_api.connections
    url = f"{connector.url}{WEBHOOK_PATH}"

    # A bad signature: 401, and nothing stored (the same delivery id is new afterwards).
    headers, body = powens_api.build_webhook("CONNECTION_SYNCED", connection_id, path=WEBHOOK_PATH,
                                             id_webhook_data=4242)
    forged = dict(headers, **{"BI-Signature": powens_api.sign(WEBHOOK_PATH, body, secret="not-the-secret")[
        "BI-Signature"]})
    assert await powens_api.deliver(url, forged, body) == 401
    assert await powens_api.deliver(url, {k: v for k, v in headers.items() if k != "BI-Signature"}, body) == 401
    assert await notifications_metric(http, connector) == {}

    assert await powens_api.deliver(url, headers, body) == 200
    assert await notifications_metric(http, connector) == {"true": 1.0}
    assert await powens_api.deliver(url, headers, body) == 200  # Powens retries: answered, stored once
    assert await notifications_metric(http, connector) == {"true": 1.0, "false": 1.0}

    powens_api.webhook_url = url
    assert await powens_api.background_sync(connection_id, new_transactions=1) == 200
    assert (await notifications_metric(http, connector))["true"] == 2.0


async def test_available_accounts_for_a_powens_consent(sage, sage_calls, browser, connector, http, powens_api):
    _, state, page = await sign_in(browser, sage_calls, "alice")
    ids = [c.value for f in page.forms for c in f.controls if c.name == "account"]
    await share(browser, page, state, ids)
    linked = sage.patches[0].body["data"]["bankAccounts"]
    listed = await available(http, connector, sage, linked[0]["bankAccountExternalId"])
    assert sorted(a["externalId"] for a in listed) == sorted(a["bankAccountExternalId"] for a in linked)
    assert sorted(a["accountName"].split(" ••")[0] for a in listed) == ["Business card", "Business current account"]
    by_id = {a["bankAccountExternalId"]: a for a in linked}
    for account in listed:
        assert account["accountIdentifier"] == by_id[account["externalId"]]["accountIdentifier"]
        assert account["accountType"]
