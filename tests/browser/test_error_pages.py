"""Every error page a person can meet, in the Sage iframe where Sage frames it: what it says, whether it offers the
way back to Sage (only when redirect_uri is trusted), and axe-core + reflow on each. Texts no browser can reach on
demand (storage down, an internal error, a method other than GET…) are rendered through the same template and
checked too, so every entry of ``connector.errors.PAGES`` passes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import aiohttp
from harness import Person, SageSite, announce_and_link
from playwright.async_api import expect

from connector.demo import CONNECTPAY_PSD2_ID, DEMO_BANK_ID
from connector.errors import PAGES
from connector.testing.connector import RunningConnector
from connector.testing.sage import SageEmulator
from connector.web import render


def later(seconds: float):
    return lambda: datetime.now(UTC) + timedelta(seconds=seconds)


async def expect_way_back(person: Person, redirect_uri: str, state: str) -> None:
    await person.follow("Back to Sage")
    await person.expect_back_at_sage(redirect_uri, state)


async def expect_no_way_back(person: Person) -> None:
    frame = await person.frame()
    await expect(frame.get_by_role("link", name="Back to Sage")).to_have_count(0)


async def test_session_expired_while_walking(person: Person, sage_calls, site: SageSite, sage: SageEmulator,
                                             connector: RunningConnector) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    journeys = connector.app.ctx.journeys
    journeys.clock = later(connector.settings.security["journey_idle_seconds"] + 1)
    await person.fill("User name", "alice")
    await person.fill("Password", "secret")
    await person.press("Sign in")
    await person.expect_heading(PAGES["journey_expired"].title)
    await person.check("error: session expired")
    await expect_way_back(person, visit.redirect_uri, visit.state)
    assert sage.patches == []


async def test_link_expired_before_use(person: Person, sage_calls, site: SageSite,
                                       connector: RunningConnector) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    connector.app.ctx.journeys.clock = later(connector.settings.security["authorisation_ttl_seconds"] + 1)
    await person.open(visit.url)
    await person.expect_heading(PAGES["link_expired"].title)
    await person.check("error: link expired")
    await expect_way_back(person, visit.redirect_uri, visit.state)


async def test_link_used_twice(person: Person, sage_calls, site: SageSite) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await person.expect_heading("Sign in to Demo Bank")
    await person.open(visit.url)  # the same /auth link again (a reload of Sage's page, a copied link…)
    await person.expect_heading(PAGES["link_used"].title)
    await person.check("error: link used")
    await expect_way_back(person, visit.redirect_uri, visit.state)


async def test_bank_return_replayed(person: Person, sage_calls, site: SageSite) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await person.fill("User name", "redirect")
    await person.fill("Password", "secret")
    await person.press("Sign in")
    frame = await person.expect_heading("Continue to Demo Bank")
    bank_return = await frame.get_by_role("link", name="Continue to your bank").get_attribute("href")
    await person.leave_frame("Continue to your bank")
    await person.expect_heading("Choose the accounts to share with Sage")
    await person.page.goto(bank_return)  # the bank's return address, once more
    await person.expect_heading(PAGES["link_used"].title)
    await person.check("error: bank return replayed")


async def test_foreign_redirect_gets_no_way_back(person: Person, sage_calls, site: SageSite) -> None:
    authorisation_id = await sage_calls.announce(DEMO_BANK_ID)
    url = sage_calls.auth_url(authorisation_id, redirect_uri="https://sage.example.evil.com/return")
    await person.open(url)
    await person.expect_heading(PAGES["redirect_refused"].title)
    await expect_no_way_back(person)
    await person.check("error: foreign redirect")


async def test_incomplete_link(person: Person, sage_calls, site: SageSite) -> None:
    redirect_uri = site.redirect_uri()
    state = str(uuid.uuid4())
    url = sage_calls.auth_url("not-a-uuid", redirect_uri=redirect_uri, state=state)
    await person.open(url)
    await person.expect_heading(PAGES["bad_request"].title)
    await person.check("error: incomplete link")
    await expect_way_back(person, redirect_uri, state)


async def test_request_sage_never_announced(person: Person, sage_calls, site: SageSite) -> None:
    redirect_uri = site.redirect_uri()
    state = str(uuid.uuid4())
    await person.open(sage_calls.auth_url(str(uuid.uuid4()), redirect_uri=redirect_uri, state=state))
    await person.expect_heading(PAGES["not_announced"].title)
    await person.check("error: not announced")
    await expect_way_back(person, redirect_uri, state)


async def test_bank_differs_from_the_notification(person: Person, sage_calls, site: SageSite) -> None:
    authorisation_id = await sage_calls.announce(DEMO_BANK_ID)
    await person.open(sage_calls.auth_url(authorisation_id, bank_id=CONNECTPAY_PSD2_ID,
                                          redirect_uri=site.redirect_uri()))
    await person.expect_heading(PAGES["bank_mismatch"].title)
    await person.check("error: bank mismatch")


async def test_reconnecting_an_unknown_account(person: Person, sage_calls, site: SageSite) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID, path="/authrefresh",
                                    externalId=str(uuid.uuid4()))
    await person.open(visit.url)
    await person.expect_heading(PAGES["account_mismatch"].title)
    await person.check("error: account mismatch")


async def test_unknown_journey_page(person: Person, sage_calls, site: SageSite) -> None:
    await person.open(f"{sage_calls.connector_url}/journey/{uuid.uuid4().hex}")
    await person.expect_heading(PAGES["journey_not_found"].title)
    await expect_no_way_back(person)
    await person.check("error: journey not found")


async def test_too_many_guesses(person: Person, sage_calls, site: SageSite, connector: RunningConnector) -> None:
    limit = connector.settings.security["max_failed_lookups"]
    async with aiohttp.ClientSession() as http:
        for _ in range(limit):
            async with http.get(sage_calls.auth_url(str(uuid.uuid4()), redirect_uri=site.redirect_uri())):
                pass
    await person.open(sage_calls.auth_url(str(uuid.uuid4()), redirect_uri=site.redirect_uri()))
    await person.expect_heading(PAGES["too_many_attempts"].title)
    await person.check("error: too many attempts")


async def test_unknown_address_outside_the_journey(person: Person, sage_calls) -> None:
    person.in_frame = False  # not a journey page: it may not be framed at all (frame-ancestors 'none')
    await person.page.goto(f"{sage_calls.connector_url}/no-such-page")
    await person.expect_heading(PAGES["not_found"].title)
    await person.check("error: not found")


async def test_every_error_text_renders_accessibly(person: Person, connector: RunningConnector) -> None:
    """Each PAGES entry through error.html, with a way back and a provider detail where it could have one."""
    person.in_frame = False
    template = connector.app.error_handler.pages.get_template("error.html")
    request = SimpleNamespace(app=connector.app)
    for code, text in PAGES.items():
        body = template.render(request=request, code=code, text=text, bank_name="Demo Bank",
                               back_url="https://sage.example/return?state=s",
                               detail="provider said: ERR_TEMPORARY_UNAVAILABLE_AT_/accounts[0]/iban",
                               **render.step_context(None))
        await person.page.set_content(body, wait_until="load")
        await expect(person.page.locator("h1")).to_have_text(text.title)
        await person.check(f"error text: {code}")
