"""Framing and Content-Security-Policy in a real browser (security.md P3–P5): our pages load inside a frame only on
the origins of ``security.frame_ancestors``; the main path reports no CSP violation, sets no cookie, and an injected
inline script does not run."""

from __future__ import annotations

from harness import Person, SageSite, announce_and_link
from playwright.async_api import expect

from connector.demo import DEMO_BANK_ID
from connector.testing.connector import eventually
from connector.testing.fixtures import SageCalls
from connector.testing.sage import SageEmulator


async def test_framed_from_allowed_origins_only(person: Person, connector_factory, sage: SageEmulator, http,
                                                site: SageSite) -> None:
    other = await SageSite().start()  # same host, another port: another origin
    try:
        connector = await connector_factory(extra={"security": {"frame_ancestors": [site.origin]}})
        calls = SageCalls.for_connector(sage, connector, http)

        visit = await announce_and_link(calls, site, DEMO_BANK_ID)
        await person.open(visit.url)
        await person.expect_heading("Sign in to Demo Bank")
        assert person.csp_violations == []

        visit = await announce_and_link(calls, other, DEMO_BANK_ID)
        person.csp_expected = True
        await person.page.goto(other.frame_url(visit.url))
        await eventually(lambda: any("frame-ancestors" in m for m in person.console), timeout=10,
                         message="the refusal")
        [framed] = person.page.main_frame.child_frames
        assert not framed.url.startswith(connector.url)  # Chromium shows its own error page instead of ours
        assert await framed.locator("h1", has_text="Sign in").count() == 0
    finally:
        await other.stop()


async def test_test_config_allows_both_loopback_names(person: Person, sage_calls, site: SageSite) -> None:
    """The test config lists http://127.0.0.1:* and http://localhost:*: the connector frames under either."""
    ip_site = await SageSite(host="127.0.0.1").start()
    try:
        for parent in (site, ip_site):
            visit = await announce_and_link(sage_calls, parent, DEMO_BANK_ID)
            person.site = parent
            await person.open(visit.url)
            await person.expect_heading("Sign in to Demo Bank")
    finally:
        await ip_site.stop()


async def test_main_path_reports_no_violation_and_sets_no_cookie(person: Person, sage_calls, site: SageSite,
                                                                 sage: SageEmulator) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    await person.open(visit.url)
    await person.fill("User name", "otp")
    await person.fill("Password", "secret")
    await person.press("Sign in")
    await person.expect_heading("Enter your security code")
    await person.fill("Security code", "999999")
    await person.press("Confirm")  # the error page loads focus-error.js
    await person.expect_error_announced("That code isn't right")
    await person.fill("Security code", "123456")
    await person.press("Confirm")
    await person.expect_heading("Choose the accounts to share with Sage")
    await person.press("Share with Sage")
    await person.expect_linked(visit, sage)
    assert person.csp_violations == []
    assert await person.page.context.cookies() == []
    assert len(sage.patches) == 1


async def test_injected_inline_script_does_not_run(person: Person, sage_calls, site: SageSite) -> None:
    visit = await announce_and_link(sage_calls, site, DEMO_BANK_ID)
    frame = await person.open(visit.url)
    person.csp_expected = True
    await frame.evaluate("""() => {
        const s = document.createElement('script');
        s.textContent = 'window.injected = true';
        document.body.appendChild(s);
        const a = document.createElement('div');
        a.setAttribute('onclick', 'window.injected = true');
        document.body.appendChild(a);
        a.click();
    }""")
    assert await frame.evaluate("() => window.injected === undefined")
    await eventually(lambda: any("script-src" in m for m in person.csp_violations), timeout=10,
                     message="the violation report")
    await expect(frame.locator("h1")).to_have_text("Sign in to Demo Bank")
