#!/usr/bin/env python3
"""A PNG of every page and state a person can see, at 1280 px and 320 px wide, without walking a flow by hand.

    python scripts/screenshots.py [--out build/screenshots] [--only WORD] [--chromium /usr/bin/chromium]

It starts ``connector demo`` in-process (Sage, ConnectPay and, when available, Powens stand-ins, plus the connector),
reaches each state over HTTP with :class:`connector.testing.driver.Driver` (by labels and button names, as a person
would), then loads the page in Chromium and takes a full-page screenshot: ``NN-<state>-<width>.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode, urljoin, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp
from playwright.async_api import async_playwright

from connector.demo import (
    BAAS_OTP,
    CONNECTPAY_ANY_ID,
    CONNECTPAY_BAAS_ID,
    CONNECTPAY_PSD2_ID,
    DEMO_BANK_ID,
    POWENS_CREDENTIALS_ID,
    POWENS_TWO_SOURCES_ID,
    POWENS_WEBAUTH_ID,
    REDIRECT_PATH,
    STACKS,
    Demo,
)
from connector.testing.driver import Driver, Page

WIDTHS = (1280, 320)
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


@dataclass
class Shot:
    """A state: ``make`` returns the URL that shows it. ``again``: the URL shows it on every load (a journey page),
    so one ``make`` serves both widths; otherwise (an ``/auth`` link, single use) each width gets its own."""

    name: str
    make: Callable[[], Awaitable[str]]
    again: bool = True
    clock_ahead: int = 0  # seconds the connector's clock runs ahead while this state is shown


class States:
    def __init__(self, demo: Demo, http: aiohttp.ClientSession) -> None:
        self.demo = demo
        self.http = http
        self.powens_api = next((s.emulator for s in demo.stacks if s.provider == "powens"), None)
        # The emulated bank's page answers its form with a 302, as real sites do.
        foreign = (self.powens_api.root,) if self.powens_api is not None else ()
        self.driver = Driver(http, stop_at=(demo.url.rstrip("/") + REDIRECT_PATH,), foreign=foreign)
        self.used: set[str] = set()

    # --- helpers ---

    async def auth(self, bank_id: str, kind: str = "onboarding", **extra: str) -> str:
        bank = self.demo.bank(bank_id)
        assert bank is not None, bank_id
        return (await self.demo.site.start_connection(bank, kind, extra)).auth_url

    async def first(self, bank_id: str, **extra: str) -> Page:
        page = await self.driver.get(await self.auth(bank_id, **extra))
        assert page.status == 200, page.text
        return page

    @staticmethod
    def journey_url(page: Page) -> str:
        """The journey's own address (re-loadable), from the page's form."""
        return urljoin(page.url, page.forms[0].action)

    async def demobank(self, user: str, password: str = "secret", **extra: str) -> Page:
        page = await self.first(DEMO_BANK_ID, **extra)
        return await self.driver.submit(page, {"User name": user, "Password": password}, button="Sign in")

    async def at(self, page: Page) -> str:
        assert page.left_to is None, page.left_to
        return self.journey_url(page) if page.forms else page.url

    async def psd2_callback(self, page: Page, allow: bool = True, customer: str = "default") -> Page:
        link, _ = page.link("Continue to ConnectPay")
        cp = next(s.emulator for s in self.demo.stacks if s.provider == "connectpay")
        values = cp.approve(link, psu=customer) if allow else cp.deny(link)
        query = urlencode(values, doseq=True)
        return await self.driver.get(f"{self.demo.connector.url}/providers/connectpay/callback?{query}")

    async def baas(self, password: str = "correct horse battery") -> Page:
        page = await self.first(CONNECTPAY_BAAS_ID)
        return await self.driver.submit(page, {"Email address": "anna@example.com", "Password": password},
                                        button="Sign in")

    async def linked_demobank(self, user: str) -> tuple[str, str]:
        """Onboard ``user`` at Demo Bank and come back to the product page (which announces the accounts)."""
        page = await self.demobank(user)
        done = await self.driver.submit(page, button="Share with Sage")
        assert done.left_to, done.text[:300]
        async with self.http.get(done.left_to) as resp:
            assert resp.status == 200
        cid = urlsplit(done.left_to).path.rsplit("/", 1)[1]
        account = next(a for a in self.demo.site.linked if a.external_id not in self.used)
        self.used.add(account.external_id)
        return cid, account.external_id

    async def powens(self, login: str, password: str = "s3cret pass", bank_id: str = POWENS_CREDENTIALS_ID,
                     **extra: str) -> Page:
        page = await self.first(bank_id, **extra)
        return await self.driver.submit(page, {"Customer number": login, "Password": password}, button="Continue")

    async def powens_bank(self, page: Page, decision: str = "Allow") -> Page:
        """From our "Continue to …" page through the bank's page (Allow or Deny) back to ours."""
        link, _ = page.link("Continue to your bank")
        return await self.driver.submit(await self.driver.get(link), button=decision)

    async def linked_powens(self, login: str) -> tuple[str, int]:
        """Onboard at the Powens credentials bank; the account's external id and the Powens connection."""
        assert self.powens_api is not None
        page = await self.powens(login)
        ids = [c.value for f in page.forms for c in f.controls if c.name == "account"]
        done = await self.driver.submit(page, {"account": ids[:1]}, button="Share with Sage")
        assert done.left_to, done.text[:300]
        async with self.http.get(done.left_to) as resp:
            assert resp.status == 200
        account = next(a for a in self.demo.site.linked
                       if a.bank.sage_bank_id == POWENS_CREDENTIALS_ID and a.external_id not in self.used)
        self.used.add(account.external_id)
        return account.external_id, max(self.powens_api.connections)

    # --- the catalogue ---

    def shots(self) -> list[Shot]:
        d = self
        demo = self.demo

        async def sign_in() -> str:
            return d.journey_url(await d.first(DEMO_BANK_ID))

        async def sign_in_empty() -> str:
            return await d.at(await d.driver.submit(await d.first(DEMO_BANK_ID), button="Sign in"))

        async def sign_in_refused() -> str:
            return await d.at(await d.demobank("bob", "wrong"))

        async def otp() -> str:
            return await d.at(await d.demobank("otp"))

        async def otp_wrong() -> str:
            page = await d.demobank("otp")
            return await d.at(await d.driver.submit(page, {"Security code": "000000"}, button="Confirm"))

        async def redirect() -> str:
            return await d.at(await d.demobank("redirect"))

        async def waiting() -> str:
            return await d.at(await d.demobank("decoupled"))

        async def accounts() -> str:
            return await d.at(await d.demobank("alice"))

        async def accounts_none() -> str:
            page = await d.demobank("alice")
            return await d.at(await d.driver.submit(page, {"account": []}, button="Share with Sage"))

        async def reconnect() -> str:
            _, external_id = await d.linked_demobank("dave")
            account = next(a for a in demo.site.linked if a.external_id == external_id)
            page = await d.first(DEMO_BANK_ID, kind="reauthorisation", externalId=external_id,
                                 bankaccount=account.bank_account_id)
            page = await d.driver.submit(page, {"User name": "dave", "Password": "x"}, button="Sign in")
            return await d.at(page)

        async def result() -> str:
            cid, _ = await d.linked_demobank("erin")
            return f"{demo.url.rstrip('/')}/connections/{cid}"

        async def locked() -> str:
            return await d.at(await d.demobank("locked"))

        async def down() -> str:
            return await d.at(await d.demobank("down"))

        async def cancelled() -> str:
            page = await d.demobank("otp")
            return await d.at(await d.driver.submit(page, button="Cancel and go back to Sage"))

        async def sage_refused() -> str:
            page = await d.demobank("carol")
            demo.sage.fail_next(400, count=1, path_prefix="/v1/authorisations")
            return await d.at(await d.driver.submit(page, button="Share with Sage"))

        async def different_user() -> str:
            _, external_id = await d.linked_demobank("frank")
            page = await d.first(DEMO_BANK_ID, kind="reauthorisation", externalId=external_id)
            page = await d.driver.submit(page, {"User name": "mallory", "Password": "x"}, button="Sign in")
            return await d.at(await d.driver.submit(page, button="Reconnect"))

        async def link_used() -> str:
            url = await d.auth(DEMO_BANK_ID)
            await d.driver.get(url)
            return url

        async def fresh_link() -> str:
            return await d.auth(DEMO_BANK_ID)

        async def foreign_redirect() -> str:
            authorisation_id = await demo.notifier.authorisation(DEMO_BANK_ID)
            return (f"{demo.connector.url}/auth?bank={DEMO_BANK_ID}&authorisation_id={authorisation_id}"
                    f"&redirect_uri=https%3A%2F%2Fsage.example.evil.com%2F&state=s")

        async def incomplete() -> str:
            return (f"{demo.connector.url}/auth?bank={DEMO_BANK_ID}&authorisation_id=x"
                    f"&redirect_uri={demo.url}&state=s")

        async def not_announced() -> str:
            return (f"{demo.connector.url}/auth?bank={DEMO_BANK_ID}&authorisation_id={uuid.uuid4()}"
                    f"&redirect_uri={demo.url}&state=s")

        async def unknown_journey() -> str:
            return f"{demo.connector.url}/journey/{uuid.uuid4().hex}"

        async def not_found() -> str:
            return f"{demo.connector.url}/no-such-page"

        async def cp_redirect() -> str:
            return await d.at(await d.first(CONNECTPAY_PSD2_ID))

        async def cp_page() -> str:
            page = await d.first(CONNECTPAY_PSD2_ID)
            link, _ = page.link("Continue to ConnectPay")
            return link

        async def cp_accounts() -> str:
            return await d.at(await d.psd2_callback(await d.first(CONNECTPAY_PSD2_ID)))

        async def cp_denied() -> str:
            return await d.at(await d.psd2_callback(await d.first(CONNECTPAY_PSD2_ID), allow=False))

        async def cp_choose() -> str:
            return d.journey_url(await d.first(CONNECTPAY_ANY_ID))

        async def cp_choose_none() -> str:
            return await d.at(await d.driver.submit(await d.first(CONNECTPAY_ANY_ID), button="Continue"))

        async def baas_sign_in() -> str:
            return d.journey_url(await d.first(CONNECTPAY_BAAS_ID))

        async def baas_refused() -> str:
            return await d.at(await d.baas("not the password"))

        async def baas_code() -> str:
            return await d.at(await d.baas())

        async def baas_code_wrong() -> str:
            page = await d.baas()
            return await d.at(await d.driver.submit(page, {"Code": "000001"}, button="Confirm"))

        async def baas_accounts() -> str:
            page = await d.baas()
            return await d.at(await d.driver.submit(page, {"Code": BAAS_OTP}, button="Confirm"))

        async def product_home() -> str:
            return demo.url

        async def product_connecting() -> str:
            bank = demo.bank(DEMO_BANK_ID)
            assert bank is not None
            return f"{demo.url.rstrip('/')}/connections/{(await demo.site.start_connection(bank)).id}"

        async def pw_sign_in() -> str:
            return d.journey_url(await d.first(POWENS_CREDENTIALS_ID))

        async def pw_sign_in_empty() -> str:
            return await d.at(await d.driver.submit(await d.first(POWENS_CREDENTIALS_ID), button="Continue"))

        async def pw_sign_in_refused() -> str:
            return await d.at(await d.powens("wrongpass"))

        async def pw_code() -> str:
            return await d.at(await d.powens("otp"))

        async def pw_code_wrong() -> str:
            page = await d.powens("otp")
            return await d.at(await d.driver.submit(page, {"Code received by text message": "12ab"},
                                                    button="Continue"))

        async def pw_waiting() -> str:
            return await d.at(await d.powens("decoupled"))

        async def pw_waiting_bank() -> str:
            return await d.at(await d.driver.submit(await d.powens("decoupled"), button="Check now"))

        async def pw_action_needed() -> str:
            return await d.at(await d.powens("actionneeded"))

        async def pw_password_expired() -> str:
            return await d.at(await d.powens("passwordexpired"))

        async def pw_accounts() -> str:
            return await d.at(await d.powens("alice"))

        async def pw_accounts_more() -> str:
            page = await d.first(POWENS_TWO_SOURCES_ID)
            page = await d.driver.submit(page, {"Customer number": "alice", "Password": "x", "Business": "on"},
                                         button="Continue")
            return await d.at(page)

        async def pw_webauth() -> str:
            return await d.at(await d.first(POWENS_WEBAUTH_ID))

        async def pw_bank_page() -> str:
            link, _ = (await d.first(POWENS_WEBAUTH_ID)).link("Continue to your bank")
            return link

        async def pw_denied() -> str:
            return await d.at(await d.powens_bank(await d.first(POWENS_WEBAUTH_ID), "Deny"))

        async def pw_wrongpass_limit() -> str:
            page = await d.powens("wrongpass")
            for _ in range(2):
                page = await d.driver.submit(page, {"Customer number": "wrongpass", "Password": "x"},
                                             button="Continue")
            return await d.at(page)

        def pw_error(login: str) -> Callable[[], Awaitable[str]]:
            async def make() -> str:
                return await d.at(await d.powens(login))
            return make

        async def pw_reconnect_sign_in() -> str:
            assert d.powens_api is not None
            external_id, connection_id = await d.linked_powens("alice")
            d.powens_api.set_state(connection_id, "wrongpass")
            account = next(a for a in demo.site.linked if a.external_id == external_id)
            page = await d.first(POWENS_CREDENTIALS_ID, kind="reauthorisation", externalId=external_id,
                                 bankaccount=account.bank_account_id)
            return await d.at(page)

        powens = [
            Shot("powens-sign-in", pw_sign_in),
            Shot("powens-sign-in-empty", pw_sign_in_empty),
            Shot("powens-sign-in-refused", pw_sign_in_refused),
            Shot("powens-code", pw_code),
            Shot("powens-code-wrong", pw_code_wrong),
            Shot("powens-waiting", pw_waiting),
            Shot("powens-waiting-bank", pw_waiting_bank),
            Shot("powens-action-needed", pw_action_needed),
            Shot("powens-password-expired", pw_password_expired),
            Shot("powens-accounts", pw_accounts),
            Shot("powens-accounts-add-more", pw_accounts_more),
            Shot("powens-webauth-redirect", pw_webauth),
            Shot("powens-bank-page", pw_bank_page),
            Shot("powens-reconnect-sign-in-again", pw_reconnect_sign_in),
            Shot("error-powens-denied", pw_denied),
            Shot("error-powens-wrongpass-limit", pw_wrongpass_limit),
            Shot("error-powens-rate-limiting", pw_error("ratelimiting")),
            Shot("error-powens-unavailable", pw_error("unavailable")),
            Shot("error-powens-unknown-state", pw_error("weird")),
        ] if d.powens_api is not None else []

        security = demo.connector.settings.security
        return [
            Shot("product-home", product_home),
            Shot("product-connecting-in-iframe", product_connecting, again=False),
            Shot("demobank-sign-in", sign_in),
            Shot("demobank-sign-in-empty", sign_in_empty),
            Shot("demobank-sign-in-refused", sign_in_refused),
            Shot("demobank-code", otp),
            Shot("demobank-code-wrong", otp_wrong),
            Shot("demobank-redirect", redirect),
            Shot("demobank-waiting", waiting),
            Shot("demobank-accounts", accounts),
            Shot("demobank-accounts-none-chosen", accounts_none),
            Shot("demobank-reconnect-accounts", reconnect),
            Shot("product-result", result),
            Shot("connectpay-redirect", cp_redirect),
            Shot("connectpay-own-page", cp_page, again=False),
            Shot("connectpay-accounts", cp_accounts),
            Shot("connectpay-choose-how", cp_choose),
            Shot("connectpay-choose-how-empty", cp_choose_none),
            Shot("connectpay-business-sign-in", baas_sign_in),
            Shot("connectpay-business-sign-in-refused", baas_refused),
            Shot("connectpay-business-code", baas_code),
            Shot("connectpay-business-code-wrong", baas_code_wrong),
            Shot("connectpay-business-accounts", baas_accounts),
            *powens,
            Shot("error-locked", locked),
            Shot("error-bank-down", down),
            Shot("error-cancelled", cancelled),
            Shot("error-connectpay-denied", cp_denied),
            Shot("error-sage-refused", sage_refused),
            Shot("error-different-user", different_user),
            Shot("error-session-expired", sign_in, clock_ahead=security["journey_idle_seconds"] + 1),
            Shot("error-link-expired", fresh_link, again=False,
                 clock_ahead=security["authorisation_ttl_seconds"] + 1),
            Shot("error-link-used", link_used, again=False),
            Shot("error-foreign-redirect", foreign_redirect, again=False),
            Shot("error-incomplete-link", incomplete, again=False),
            Shot("error-not-announced", not_announced, again=False),
            Shot("error-journey-not-found", unknown_journey),
            Shot("error-not-found", not_found),
        ]


async def capture(out: Path, only: str | None, chromium: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    async with Demo(quiet=True, feed=False, stacks=STACKS) as demo, aiohttp.ClientSession() as http, async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        pages = {}
        for width in WIDTHS:
            context = await browser.new_context(viewport={"width": width, "height": 800})
            pages[width] = await context.new_page()
        states = States(demo, http)
        journeys = demo.connector.app.ctx.journeys
        real_clock = journeys.clock
        for index, shot in enumerate(states.shots(), start=1):
            if only and only not in shot.name:
                continue
            url = await shot.make() if shot.again else None
            for width, page in pages.items():
                target = url or await shot.make()
                if shot.clock_ahead:
                    ahead = timedelta(seconds=shot.clock_ahead)
                    journeys.clock = lambda ahead=ahead: datetime.now(UTC) + ahead
                try:
                    await page.goto(target, wait_until="load")
                    await page.wait_for_timeout(100)  # focus-error.js, poll.js's first text change
                    path = out / f"{index:02d}-{shot.name}-{width}.png"
                    await page.screenshot(path=str(path), full_page=True)
                    written.append(path)
                finally:
                    journeys.clock = real_clock
        await browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "screenshots")
    parser.add_argument("--only", help="only the states whose name contains this")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)
    from connector.logs import setup_logging

    setup_logging("WARNING", "text")
    written = asyncio.run(capture(args.out, args.only, args.chromium))
    print(f"{len(written)} screenshots in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
