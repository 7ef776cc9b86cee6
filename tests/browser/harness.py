"""Browser test kit: Chromium (Debian's package) driven by Playwright, a stand-in Sage product page on another origin
that frames ``/auth``, and the checks every page state gets (axe-core at WCAG 2.1 A/AA, reflow at 320 CSS px and at
200 % zoom, one ``h1``, no CSP violation).

A :class:`Person` walks our pages the way a bank customer does: inside the iframe of the Sage product, by visible
labels and button names only (never ids). When a provider page forces a top-level navigation, the person follows it
and the journey continues in the top window (product Decision 11).
"""

from __future__ import annotations

import html
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from aiohttp import web
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Frame,
    Page,
    expect,
)

CHROMIUM = os.environ.get("CONNECTOR_CHROMIUM", "/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
DESKTOP = {"width": 1280, "height": 900}
REDIRECT_PATH = "/api/v1/indirectredirect/"
TIMEOUT_MS = 10_000

# Every frame reports CSP violations to the console, so one listener on the page sees them all (OOPIFs included).
CSP_PROBE = """
document.addEventListener("securitypolicyviolation", function (e) {
  console.error("CSP-VIOLATION " + e.violatedDirective + " " + e.blockedURI);
});
"""

ACTIVE_ELEMENT = """() => {
  const el = document.activeElement;
  if (!el || el === document.body || !document.hasFocus()) return null;
  const style = getComputedStyle(el);
  let name = "";
  if (el.labels && el.labels.length) name = el.labels[0].textContent;
  else if (el.getAttribute("aria-label")) name = el.getAttribute("aria-label");
  else name = el.textContent;
  const hint = (el.getAttribute("aria-describedby") || "").split(/\\s+/).filter(Boolean)
    .map(id => (document.getElementById(id) || {}).textContent || "").join(" ");
  return {
    tag: el.tagName.toLowerCase(), type: el.getAttribute("type") || "", name: name.replace(/\\s+/g, " ").trim(),
    role: el.getAttribute("role") || "", checked: !!el.checked, described: hint.replace(/\\s+/g, " ").trim(),
    outline: style.outlineStyle !== "none" && parseFloat(style.outlineWidth) >= 2,
    shadow: style.boxShadow && style.boxShadow !== "none",
  };
}"""


# --- the Sage product stand-in ------------------------------------------------------------------------------------


@dataclass
class Arrival:
    """A person arriving at Sage's ``redirect_uri``: where, with which query, and whether inside the iframe."""

    path: str
    query: dict[str, list[str]]
    patches_before: int | None = None  # how many PATCHes Sage had received when the person arrived


class SageSite:
    """A tiny "Sage product" on ``http://localhost:<port>`` (another origin than the connector on 127.0.0.1).

    ``/frame?src=…`` is a product page framing ``src`` as Sage does; ``/api/v1/indirectredirect/<id>`` is where Sage's
    ``redirect_uri`` points, recording each arrival.
    """

    def __init__(self, host: str = "localhost", patch_count: Callable[[], int] | None = None) -> None:
        self.host = host
        self.patch_count = patch_count
        self.arrivals: list[Arrival] = []
        self._runner: web.AppRunner | None = None
        self.origin = ""

    async def start(self) -> SageSite:
        app = web.Application()
        app.router.add_get("/frame", self._frame)
        app.router.add_get(REDIRECT_PATH + "{id}", self._landing)
        app.router.add_get("/favicon.ico", self._favicon)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.origin = f"http://{self.host}:{self._runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def redirect_uri(self) -> str:
        return f"{self.origin}{REDIRECT_PATH}{uuid.uuid4()}"

    def frame_url(self, src: str) -> str:
        return f"{self.origin}/frame?{urlencode({'src': src})}"

    async def _frame(self, request: web.Request) -> web.Response:
        src = html.escape(request.query["src"], quote=True)
        page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Sage product (test)</title>
<style>body{{margin:0;font-family:sans-serif}} p{{margin:.5rem}}
iframe{{display:block;border:0;width:100%;height:760px}}</style>
</head><body><p>Sage product (test): bank feeds</p>
<iframe title="Connect your bank" src="{src}"></iframe></body></html>"""
        return web.Response(text=page, content_type="text/html")

    async def _favicon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _landing(self, request: web.Request) -> web.Response:
        self.arrivals.append(Arrival(request.path, {k: request.query.getall(k) for k in request.query},
                                     self.patch_count() if self.patch_count else None))
        return web.Response(text="<!doctype html><html lang='en'><head><title>Back in Sage</title></head>"
                                 "<body><h1>Back in Sage</h1></body></html>", content_type="text/html")


# --- checks ------------------------------------------------------------------------------------------------------


def describe_violations(violations: list[dict[str, Any]]) -> str:
    lines = []
    for v in violations:
        targets = [" ".join(map(str, n.get("target", []))) for n in v.get("nodes", [])][:5]
        lines.append(f"{v['id']} ({v.get('impact')}): {v.get('help')} at {targets}")
    return "\n".join(lines)


async def axe_violations(frame: Frame | Page) -> list[dict[str, Any]]:
    results = await Axe().run(frame, options={"runOnly": {"type": "tag", "values": WCAG_TAGS},
                                              "resultTypes": ["violations"]})
    return list(results.response["violations"])


# --- the person ----------------------------------------------------------------------------------------------------


@dataclass
class Person:
    """One browser tab of a bank customer in a Sage product."""

    page: Page
    site: SageSite
    console: list[str] = field(default_factory=list)
    checked_states: list[str] = field(default_factory=list)
    in_frame: bool = True
    csp_expected: bool = False  # a test that provokes a CSP violation on purpose sets this
    scripts: bool = True  # False in a context with java_script_enabled=False (see :meth:`check`)

    @classmethod
    async def in_context(cls, context: BrowserContext, site: SageSite) -> Person:
        await context.add_init_script(CSP_PROBE)
        page = await context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        person = cls(page, site)
        page.on("console", person._on_console)
        return person

    def _on_console(self, message: ConsoleMessage) -> None:
        self.console.append(f"{message.type}: {message.text}")

    @property
    def csp_violations(self) -> list[str]:
        return [m for m in self.console if "CSP-VIOLATION" in m or "Content Security Policy" in m]

    # --- where the journey is ---

    async def open(self, auth_url: str) -> Frame:
        """Open the Sage product page that frames ``auth_url`` and wait for our first page in the iframe."""
        self.in_frame = True
        await self.page.goto(self.site.frame_url(auth_url))
        frame = await self.frame()
        await frame.wait_for_load_state()
        await expect(frame.locator("h1")).to_be_visible()
        return frame

    async def frame(self) -> Frame:
        """The frame the journey is in: the iframe, or the top window after a top-level navigation."""
        if not self.in_frame:
            return self.page.main_frame
        handle = await self.page.wait_for_selector("iframe", state="attached")
        frame = await handle.content_frame()
        assert frame is not None
        return frame

    async def heading(self) -> str:
        frame = await self.frame()
        return " ".join((await frame.locator("h1").inner_text()).split())

    async def expect_heading(self, text: str, *, timeout: float = TIMEOUT_MS) -> Frame:
        frame = await self.frame()
        await expect(frame.locator("h1")).to_have_text(text, timeout=timeout)
        return frame

    async def expect_error_page(self) -> str:
        """Wait for an error page (whatever its title) and return its heading."""
        frame = await self.frame()
        await expect(frame.get_by_text("Reference for support")).to_be_visible()
        return await self.heading()

    # --- acting by label and button name ---

    async def fill(self, label: str, value: str) -> None:
        frame = await self.frame()
        await frame.get_by_label(label, exact=True).fill(value)

    async def press(self, button: str) -> None:
        frame = await self.frame()
        await frame.get_by_role("button", name=button, exact=True).click()

    async def follow(self, link: str) -> None:
        frame = await self.frame()
        await frame.get_by_role("link", name=link, exact=True).click()

    async def leave_frame(self, link: str) -> None:
        """Click a link that opens a page in the top window (``target=_top``): the journey leaves the iframe."""
        frame = await self.frame()
        target = frame.get_by_role("link", name=link, exact=True)
        assert await target.get_attribute("target") == "_top"
        async with self.page.expect_navigation():
            await target.click()
        self.in_frame = False

    async def text(self) -> str:
        frame = await self.frame()
        return " ".join((await frame.locator("main").inner_text()).split())

    # --- Sage's end of the journey ---

    async def expect_back_at_sage(self, redirect_uri: str, state: str) -> Arrival:
        """The browsing context the journey is in has reached ``redirect_uri`` with exactly our ``state``; the
        arrival as Sage's page recorded it (with the number of PATCHes Sage had by then)."""
        frame = await self.frame()
        await expect(frame.locator("h1")).to_have_text("Back in Sage")
        url = frame.url
        parts = urlsplit(url)
        assert url.startswith(redirect_uri + "?"), url
        assert parse_qs(parts.query) == {"state": [state]}, url
        [arrival] = [a for a in self.site.arrivals if a.path == parts.path and a.query == {"state": [state]}]
        return arrival

    async def expect_linked(self, visit: Visit, sage: Any) -> Any:
        """Success as Sage sees it: the PATCH for this authorisation reached Sage *before* the person arrived back
        at redirect_uri with state. Returns that PATCH."""
        arrival = await self.expect_back_at_sage(visit.redirect_uri, visit.state)
        mine = [i for i, p in enumerate(sage.patches) if p.authorisation_id == visit.authorisation_id]
        assert mine, "no PATCH for this authorisation"
        assert arrival.patches_before is not None and arrival.patches_before > mine[-1], \
            "the person was sent back before the PATCH"
        return sage.patches[mine[-1]]

    # --- what the page tells the person ---

    async def current_step(self) -> str:
        """The step the indicator marks with ``aria-current="step"`` (as read aloud, without its prefix)."""
        frame = await self.frame()
        current = frame.locator('[aria-current="step"]')
        assert await current.count() == 1
        return " ".join((await current.inner_text()).replace("Current:", "").split())

    async def expect_error_announced(self, message: str, field: str | None = None, *, focused: bool = True) -> None:
        """The error is in a live region (role=alert) that has focus, and is tied to its field (aria-describedby,
        aria-invalid) when it belongs to one."""
        frame = await self.frame()
        alert = frame.get_by_role("alert")
        await expect(alert).to_contain_text(message)
        if focused:
            await expect(alert).to_be_focused()
        if field is not None:
            control = frame.get_by_label(field, exact=True)
            assert await control.get_attribute("aria-invalid") == "true"
            await expect(control).to_have_accessible_description(re.compile(re.escape(message)))

    # --- keyboard ---

    async def focused(self) -> dict[str, Any] | None:
        frame = await self.frame()
        return await frame.evaluate(ACTIVE_ELEMENT)

    async def tab_to(self, name: str, *, backwards: bool = False, max_steps: int = 25) -> dict[str, Any]:
        """Press Tab (or Shift+Tab) until the element with this accessible name has focus; every stop on our page
        must show a visible focus indicator."""
        await (await self.frame()).wait_for_load_state()  # the stylesheet (and its focus ring) is in
        seen = []
        for _ in range(max_steps):
            await self.page.keyboard.press("Shift+Tab" if backwards else "Tab")
            info = await self.focused()
            if info is None:
                seen.append("(outside the page)")
                continue
            assert info["outline"] or info["shadow"], f"no visible focus on {info}"
            seen.append(info["name"])
            if info["name"] == name:
                return info
        raise AssertionError(f"Tab never reached {name!r}; focus went through {seen}")

    async def tab_to_checkbox(self, max_steps: int = 20) -> dict[str, Any]:
        """Press Tab until a checkbox has focus (with a visible focus indicator)."""
        await (await self.frame()).wait_for_load_state()
        for _ in range(max_steps):
            await self.page.keyboard.press("Tab")
            info = await self.focused()
            if info and info["type"] == "checkbox":
                assert info["outline"] or info["shadow"], info
                return info
        raise AssertionError("no checkbox reached")

    async def type(self, text: str) -> None:
        await self.page.keyboard.type(text)

    async def key(self, key: str) -> None:
        await self.page.keyboard.press(key)

    # --- per-state checks ---

    async def check(self, state: str, *, reflow: bool = True) -> None:
        """axe-core (WCAG 2.1 A/AA) on the page as it is now, one h1, and reflow at 320 CSS px and 200 % zoom.

        Without JavaScript nothing can be evaluated in the page (axe would wait for ever), so the page as the person
        sees it is checked in a scripted tab of the same browser: :meth:`check_copy`."""
        if not self.scripts:
            await self.check_copy(state, reflow=reflow)
            return
        frame = await self.frame()
        await frame.wait_for_load_state()
        violations = await axe_violations(frame)
        assert not violations, f"{state}: axe found\n{describe_violations(violations)}"
        assert await frame.locator("h1").count() == 1, f"{state}: not exactly one h1"
        if reflow:
            for width in (320, 640):  # 640 CSS px: a 1280 px window at 200 % zoom
                overflow = await self.overflow_at(width)
                assert overflow is None, f"{state}: scrolls sideways at {width} CSS px ({overflow})"
        self.checked_states.append(state)

    async def check_copy(self, state: str, *, reflow: bool = True) -> None:
        """:meth:`check` on a copy of the page as it is now: its DOM, served at its own URL (so styles load as they
        do here) inside the Sage page or alone as here, in a new scripted context where our scripts are not fetched
        and the connector never sees the request (checking cannot move the journey on)."""
        frame = await self.frame()
        await frame.wait_for_load_state()
        url, markup = frame.url, await frame.content()
        browser = self.page.context.browser
        assert browser is not None
        checker, context = await new_person(browser, self.site)
        try:
            async def serve(route: Any) -> None:
                await route.fulfill(status=200, body=markup, content_type="text/html; charset=utf-8")

            await context.route(lambda u: u == url, serve)
            await context.route(re.compile(r"\.js(\?.*)?$"), lambda route: route.abort())
            if self.in_frame:
                await checker.open(url)
            else:
                checker.in_frame = False
                await checker.page.goto(url)
            assert await checker.heading() == await self.heading(), "the copy shows another page"
            await checker.check(state, reflow=reflow)
        finally:
            await context.close()
        self.checked_states.append(state)

    async def overflow_at(self, width: int) -> str | None:
        """Lay the journey out ``width`` CSS px wide; describe any horizontal overflow (``None``: none)."""
        frame = await self.frame()
        if self.in_frame:
            await self.page.evaluate("w => { document.querySelector('iframe').style.width = w + 'px'; }", width)
        else:
            await self.page.set_viewport_size({"width": width, "height": DESKTOP["height"]})
        try:
            # The iframe lives in another renderer process: wait until its new size has reached the document.
            await frame.wait_for_function("w => window.innerWidth === w", arg=width)
            await frame.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
            return await frame.evaluate("""w => {
              const d = document.documentElement;
              if (d.scrollWidth <= Math.min(w, d.clientWidth)) return null;
              const wide = [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > d.clientWidth)
                .map(e => e.tagName.toLowerCase() + (e.className ? '.' + e.className : '')).slice(0, 5);
              return 'scrollWidth ' + d.scrollWidth + ' > ' + d.clientWidth + ': ' + wide.join(', ');
            }""", width)
        finally:
            if self.in_frame:
                await self.page.evaluate("() => { document.querySelector('iframe').style.width = ''; }")
            else:
                await self.page.set_viewport_size(DESKTOP)


async def new_person(browser: Browser, site: SageSite, **context_options: Any) -> tuple[Person, BrowserContext]:
    context = await browser.new_context(viewport=DESKTOP, **context_options)
    person = await Person.in_context(context, site)
    person.scripts = context_options.get("java_script_enabled", True) is not False
    return person, context


def state_of(url: str) -> str:
    [state] = parse_qs(urlsplit(url).query)["state"]
    return state


@dataclass
class Visit:
    """One ``/auth`` (or ``/authrefresh``) visit as Sage starts it: announced, with its own redirect_uri and state."""

    authorisation_id: str
    redirect_uri: str
    state: str
    url: str


async def announce_and_link(sage_calls: Any, site: SageSite, bank_id: str, *, path: str = "/auth",
                            **extra: str) -> Visit:
    """Send the signed "authorisation created" notification, then build the URL Sage opens in its iframe."""
    authorisation_id = await sage_calls.announce(bank_id)
    redirect_uri = site.redirect_uri()
    state = str(uuid.uuid4())
    url = sage_calls.auth_url(authorisation_id, bank_id=bank_id, redirect_uri=redirect_uri, state=state, path=path,
                              **extra)
    return Visit(authorisation_id, redirect_uri, state, url)
