"""A journey driver: walks our pages over HTTP the way a person would, by visible labels and button names.

It follows 303 redirects itself and stops when the browser would leave for Sage (``stop_at``), so a test can assert
where the person ended up. Browser tests (Chromium) cover what this can't: scripts, focus, framing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin

import aiohttp


@dataclass
class Control:
    tag: str
    type: str
    name: str
    value: str
    id: str = ""
    checked: bool = False
    label: str = ""
    options: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class HtmlForm:
    action: str
    method: str
    controls: list[Control] = field(default_factory=list)


class _Parser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[HtmlForm] = []
        self.links: list[tuple[str, str, dict[str, str]]] = []
        self.labels: dict[str, str] = {}
        self.h1 = ""
        self.text: list[str] = []
        self._label_for: str | None = None
        self._label_text: list[str] = []
        self._in_h1 = False
        self._link: tuple[str, dict[str, str]] | None = None
        self._link_text: list[str] = []
        self._button: Control | None = None
        self._select: Control | None = None
        self._select_chosen = False  # an option of the open <select> carried ``selected``
        self._option: str | None = None
        self._skip = 0

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "form":
            self.forms.append(HtmlForm(attrs.get("action", ""), attrs.get("method", "get").lower()))
        elif tag == "input" and self.forms:
            self.forms[-1].controls.append(Control("input", attrs.get("type", "text"), attrs.get("name", ""),
                                                   attrs.get("value", ""), attrs.get("id", ""),
                                                   "checked" in attrs))
        elif tag == "button" and self.forms:
            self._button = Control("button", attrs.get("type", "submit"), attrs.get("name", ""),
                                   attrs.get("value", ""), attrs.get("id", ""))
            self.forms[-1].controls.append(self._button)
        elif tag == "select" and self.forms:
            self._select = Control("select", "select", attrs.get("name", ""), "", attrs.get("id", ""))
            self._select_chosen = False
            self.forms[-1].controls.append(self._select)
        elif tag == "option" and self._select is not None:
            self._option = attrs.get("value", "")
            if "selected" in attrs:
                self._select.value, self._select_chosen = self._option, True
        elif tag == "label":
            self._label_for, self._label_text = attrs.get("for", ""), []
        elif tag == "h1":
            self._in_h1 = True
        elif tag == "a":
            self._link, self._link_text = (attrs.get("href", ""), attrs), []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "label" and self._label_for is not None:
            self.labels[self._label_for] = " ".join("".join(self._label_text).split())
            self._label_for = None
        elif tag == "h1":
            self._in_h1 = False
        elif tag == "a" and self._link is not None:
            self.links.append((" ".join("".join(self._link_text).split()), self._link[0], self._link[1]))
            self._link = None
        elif tag == "button":
            self._button = None
        elif tag == "select":
            # As a browser does: without a ``selected`` option, the first option is the select's value.
            if self._select is not None and not self._select_chosen and self._select.options:
                self._select.value = self._select.options[0][0]
            self._select = None

    def handle_data(self, data: str) -> None:
        if self._skip:
            return
        self.text.append(data)
        if self._label_for is not None:
            self._label_text.append(data)
        if self._in_h1:
            self.h1 += data
        if self._link is not None:
            self._link_text.append(data)
        if self._button is not None:
            self._button.label = (self._button.label + data).strip()
        if self._select is not None and self._option is not None:
            self._select.options.append((self._option, data.strip()))
            self._option = None


@dataclass
class Page:
    url: str
    status: int
    html: str
    left_to: str | None = None  # set when the browser left our pages (back to Sage, or off to a provider)

    def __post_init__(self) -> None:
        parser = _Parser()
        parser.feed(self.html)
        self.forms = parser.forms
        self.links = parser.links
        self.h1 = " ".join(parser.h1.split())
        self.text = " ".join(" ".join(parser.text).split())
        for form in self.forms:
            for c in form.controls:
                if c.id and c.id in parser.labels:
                    c.label = c.label or parser.labels[c.id]

    def link(self, text: str) -> tuple[str, dict[str, str]]:
        for label, href, attrs in self.links:
            if label == text:
                return urljoin(self.url, href), attrs
        raise AssertionError(f"no link {text!r} on {self.h1!r}; links: {[t for t, _, _ in self.links]}")

    def has_button(self, label: str) -> bool:
        return any(c.tag == "button" and c.label == label for f in self.forms for c in f.controls)


class Driver:
    """``stop_at``: URL prefixes where the person leaves our pages (Sage's redirect_uri, a provider's site)."""

    def __init__(self, session: aiohttp.ClientSession, stop_at: tuple[str, ...],
                 foreign: tuple[str, ...] = ()) -> None:
        self.session = session
        self.stop_at = stop_at
        #: URL prefixes of provider sites a journey visits (an emulator's sign-in page). Their forms may answer a
        #: POST with 302 as real sites do; our own pages must answer every POST with 303.
        self.foreign = foreign
        #: every redirect followed, oldest first: (method, url, status, Location as sent)
        self.hops: list[tuple[str, str, int, str]] = []

    async def get(self, url: str) -> Page:
        return await self._go("GET", url, None)

    async def _go(self, method: str, url: str, data: list[tuple[str, str]] | None) -> Page:
        for _ in range(10):
            if url.startswith(self.stop_at):
                return Page(url, 0, "", left_to=url)
            async with self.session.request(method, url, data=data, allow_redirects=False) as resp:
                body = await resp.text()
                if resp.status in (301, 302, 303, 307, 308):
                    self.hops.append((method, url, resp.status, resp.headers["Location"]))
                    allowed = (302, 303) if url.startswith(self.foreign) else (303,)
                    assert method == "GET" or resp.status in allowed, f"a post answered {resp.status}, not 303"
                    url, method, data = urljoin(url, resp.headers["Location"]), "GET", None
                    continue
                return Page(str(resp.url), resp.status, body)
        raise AssertionError("too many redirects")

    async def submit(self, page: Page, fields: dict[str, str | list[str]] | None = None,
                     button: str | None = None) -> Page:
        """Fill controls by their visible label (or name), then press the button with that visible label."""
        fields = dict(fields or {})
        for form in page.forms:
            buttons = [c for c in form.controls if c.tag == "button"]
            pressed = next((b for b in buttons if button is None or b.label == button), None)
            if pressed is None:
                continue
            data: list[tuple[str, str]] = []
            for c in form.controls:
                key = c.label if c.label in fields else c.name if c.name in fields else None
                if c.tag == "button":
                    continue
                if c.type in ("checkbox", "radio"):
                    if c.label in fields:
                        chosen = bool(fields[c.label])
                    elif c.name in fields:
                        wanted = fields[c.name]
                        chosen = c.value in wanted if isinstance(wanted, list) else c.value == wanted
                    else:
                        chosen = c.checked
                    if chosen:
                        data.append((c.name, c.value))
                elif key is not None:
                    data.append((c.name, str(fields[key])))
                elif c.name:
                    data.append((c.name, c.value))
            if pressed.name:
                data.append((pressed.name, pressed.value))
            return await self._go(form.method.upper(), urljoin(page.url, form.action), data)
        raise AssertionError(f"no button {button!r} on page {page.h1!r}")

    async def follow(self, page: Page, link_text: str) -> Page:
        url, _ = page.link(link_text)
        return await self.get(url)
