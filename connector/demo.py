"""``connector demo``: the whole journey on one computer, with no credentials and no network.

One process and one event loop run:

* the Sage stand-in (:class:`connector.testing.sage.SageEmulator`, rate limited like Sage);
* the ConnectPay stand-in, and the Powens stand-in when its plugin and emulator are available;
* the connector itself, configured with Demo Bank, ConnectPay (PSD2, BaaS, and "choose how") and Powens banks that
  point at those stand-ins (SQLite in a temporary folder, keys made at start);
* a small "Sage product" page on another origin (``http://localhost:<port>``) that lists the banks. Choosing one
  sends the signed notification and opens our ``/auth`` in an iframe, exactly as Sage does; afterwards the page shows
  what Sage received and offers "Reconnect" (``/authrefresh``) for linked accounts.

The provider stacks (:func:`demobank_stack`, :func:`connectpay_stack`, :func:`powens_stack`) are also what the
browser tests and ``scripts/screenshots.py`` start, so a new provider is added to all three in one place: write a
``<name>_stack`` function returning a :class:`ProviderStack` and list it in :data:`STACKS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import signal
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

from connector.plugins import Plugins, load_plugins
from connector.testing.connector import (
    RunningConnector,
    SageEndpoints,
    connector_config,
    free_port,
    settings_from,
)
from connector.testing.sage import SageEmulator

log = logging.getLogger("connector.demo")

DEMO_BANK_ID = "10aaeee6-4691-4443-8198-df39aaa8007c"  # the same id as connector.testing.fixtures.DEMO_BANK_ID
CONNECTPAY_PSD2_ID = "6f1d2c3b-0a9e-4c8d-9b7a-1e2f3a4b5c01"
CONNECTPAY_BAAS_ID = "6f1d2c3b-0a9e-4c8d-9b7a-1e2f3a4b5c02"
CONNECTPAY_ANY_ID = "6f1d2c3b-0a9e-4c8d-9b7a-1e2f3a4b5c03"
POWENS_CREDENTIALS_ID = "6f1d2c3b-0a9e-4c8d-9b7a-1e2f3a4b5c11"
POWENS_WEBAUTH_ID = "6f1d2c3b-0a9e-4c8d-9b7a-1e2f3a4b5c12"
POWENS_TWO_SOURCES_ID = "6f1d2c3b-0a9e-4c8d-9b7a-1e2f3a4b5c13"
BAAS_OTP = "123456"
REDIRECT_PATH = "/api/v1/indirectredirect/"


# --- provider stacks ----------------------------------------------------------------------------------------------


@dataclass
class DemoBank:
    """A ``[[banks]]`` entry plus what a tester needs to know to walk it (shown on the demo page)."""

    sage_bank_id: str
    name: str
    provider: str
    provider_bank: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    hints: Sequence[tuple[str, str]] = ()

    def config(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"sage_bank_id": self.sage_bank_id, "name": self.name, "provider": self.provider}
        if self.provider_bank:
            entry["provider_bank"] = self.provider_bank
        if self.options:
            entry["options"] = dict(self.options)
        return entry


@dataclass
class ProviderStack:
    """One provider as the demo and the browser tests run it: its config table, its banks, and its emulator."""

    provider: str
    config: dict[str, Any]
    banks: list[DemoBank]
    emulator: Any = None
    #: called with the connector's public URL once it runs (e.g. to register our callback at the emulator)
    on_connector: Callable[[str], None] | None = None
    close: Callable[[], Awaitable[None]] | None = None


async def demobank_stack(folder: Path) -> ProviderStack:
    del folder
    return ProviderStack("demobank", {}, [DemoBank(DEMO_BANK_ID, "Demo Bank", "demobank", hints=(
        ("Any user name", "links at once (the password can be anything but “wrong”)"),
        ("otp", "asks for a security code: 123456"),
        ("redirect", "sends you to the bank's own page and back"),
        ("decoupled", "waits for approval in the bank's app (approved after two checks)"),
        ("locked", "the bank says the online banking is locked"),
        ("down", "the bank is unavailable"),
        ("Password “wrong”", "the bank refuses the details"),
    ))])


async def connectpay_stack(folder: Path, *, otp: str | None = BAAS_OTP) -> ProviderStack:
    from connector.testing.connectpay import ConnectPayEmulator

    emulator = await ConnectPayEmulator(otp=otp).start()
    key_file = folder / "connectpay-password-key.pem"
    key_file.write_bytes(emulator.public_key_pem())
    email, password = next(iter((u.email, u.password) for u in emulator.users.values()))
    code = otp or "shown in emulator.last_otp"
    banks = [
        DemoBank(CONNECTPAY_PSD2_ID, "ConnectPay", "connectpay", provider_bank="psd2", hints=(
            ("ConnectPay's page", "opens full window: choose a customer, then Allow (or Deny)"),
        )),
        DemoBank(CONNECTPAY_BAAS_ID, "ConnectPay Business", "connectpay", options={"mode": "baas"}, hints=(
            ("Email address", email), ("Password", password), ("Text message code", code),
        )),
        DemoBank(CONNECTPAY_ANY_ID, "ConnectPay (choose how)", "connectpay", provider_bank="any", hints=(
            ("First page", "choose where to sign in, then as above"),
        )),
    ]

    def register_callback(connector_url: str) -> None:
        emulator.redirect_urls.append(f"{connector_url}/providers/connectpay/callback")

    return ProviderStack("connectpay", emulator.provider_config(key_file), banks, emulator,
                         on_connector=register_callback, close=emulator.close)


async def powens_stack(folder: Path) -> ProviderStack | None:
    """Powens, if its plugin and emulator are there and start (the plugin is younger than the others)."""
    del folder
    try:
        from connector.testing.powens import (
            CREDENTIALS_BANK,
            TWO_SOURCE_BANK,
            WEBAUTH_BANK,
            PowensEmulator,
        )
        from plugins.powens import Powens  # noqa: F401  (the plugin must import too)
    except Exception as exc:  # noqa: BLE001  (any import problem means: no Powens in this demo)
        log.warning("Powens left out of the demo: %s", type(exc).__name__)
        return None
    try:
        emulator = await PowensEmulator().start()
    except Exception as exc:  # noqa: BLE001
        log.warning("Powens left out of the demo: its emulator did not start (%s)", type(exc).__name__)
        return None
    banks = [
        DemoBank(POWENS_CREDENTIALS_ID, "Credentials Bank (Powens)", "powens", provider_bank=CREDENTIALS_BANK, hints=(
            ("Customer number", "any, e.g. alice (wrongpass, otp, decoupled script the bank)"),
            ("Password", "anything"), ("Code (login otp)", emulator.otp),
        )),
        DemoBank(POWENS_WEBAUTH_ID, "Webauth Bank (Powens)", "powens", provider_bank=WEBAUTH_BANK, hints=(
            ("The bank's page", "opens full window: Allow"),
        )),
        DemoBank(POWENS_TWO_SOURCES_ID, "Two Source Bank (Powens)", "powens", provider_bank=TWO_SOURCE_BANK, hints=(
            ("First source", "any customer number and password; then \"Add more accounts\" opens the bank's page"),
        )),
    ]
    config = emulator.config()
    # The emulator has no request budget to respect: a person clicking through must never wait for the limiter.
    config.update(requests_per_minute=100_000, sync_timeout_seconds=5, timeout_seconds=5)
    return ProviderStack("powens", config, banks, emulator, close=emulator.close)


StackFactory = Callable[[Path], Awaitable[ProviderStack | None]]
STACKS: tuple[StackFactory, ...] = (demobank_stack, connectpay_stack, powens_stack)


async def start_stacks(folder: Path, factories: Sequence[StackFactory] = STACKS,
                       plugins: Plugins | None = None) -> list[ProviderStack]:
    """Start each provider's emulator; leave out a stack whose config or banks its plugin refuses."""
    from connector.config import check_settings

    plugins = plugins or load_plugins()
    stacks = []
    for factory in factories:
        stack = await factory(folder)
        if stack is None:
            continue
        probe = connector_config(SageEndpoints("http://127.0.0.1:1", "x", "x", "x"), database_url="sqlite://:memory:",
                                 port=1, banks=[b.config() for b in stack.banks], providers={stack.provider: stack.config})
        try:
            problems = check_settings(settings_from(probe), plugins)
        except ValueError as exc:
            problems = [str(exc)]
        if problems:
            log.warning("%s left out of the demo: %s", stack.provider, "; ".join(map(str, problems)))
            if stack.close:
                await stack.close()
            continue
        stacks.append(stack)
    return stacks


# --- Sage's side: notifications -----------------------------------------------------------------------------------


class SageNotifier:
    """The notifications Sage sends the connector, signed by the Sage stand-in's Sage ID."""

    def __init__(self, sage: SageEmulator, connector: RunningConnector, http: aiohttp.ClientSession) -> None:
        self.sage = sage
        self.url = connector.url
        header = connector.settings.sage["notification_header"]
        self.header = (header["name"], header["value"])
        self.http = http

    async def send(self, body: Mapping[str, Any]) -> None:
        headers = {"Authorization": f"Bearer {self.sage.identity.notification_token()}",
                   "Content-Type": "application/json", self.header[0]: self.header[1]}
        async with self.http.post(f"{self.url}/notification", data=json.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"the connector refused a notification: {resp.status} {await resp.text()}")

    async def authorisation(self, bank_id: str) -> str:
        authorisation_id = str(uuid.uuid4())
        await self.send({"type": "resourceCreated",
                         "resource": {"id": authorisation_id, "type": "authorisation", "url": "NA"},
                         "additionalData": {"bankId": bank_id}})
        return authorisation_id

    async def bank_account(self, external_id: str, bank_id: str, start: str = "2025-01-01T00:00:00Z") -> str:
        bank_account_id = str(uuid.uuid4())
        await self.send({"type": "resourceCreated",
                         "resource": {"id": bank_account_id, "type": "bankAccount", "url": ""},
                         "additionalData": {"externalId": external_id, "bankId": bank_id,
                                            "requestedStartDate": start}})
        return bank_account_id


# --- the Sage product page ----------------------------------------------------------------------------------------


@dataclass
class Connection:
    """One time the person chose a bank (or "Reconnect") on the product page."""

    id: str
    bank: DemoBank
    kind: str  # "onboarding" or "reauthorisation"
    authorisation_id: str
    state: str
    redirect_uri: str
    auth_url: str
    returned: bool = False
    returned_url: str = ""


@dataclass
class LinkedAccount:
    bank: DemoBank
    external_id: str
    bank_account_id: str
    name: str


class ProductSite:
    """A stand-in Sage product: lists banks, frames ``/auth``, shows what Sage received, offers "Reconnect"."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.connections: dict[str, Connection] = {}
        self.linked: list[LinkedAccount] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.home)
        app.router.add_post("/connect", self.connect)
        app.router.add_post("/reconnect", self.reconnect)
        app.router.add_get("/connections/{id}", self.connection)
        app.router.add_get(REDIRECT_PATH + "{id}", self.landing)
        app.router.add_get("/static/demo.js", self.script)
        return app

    # --- actions ---

    async def start_connection(self, bank: DemoBank, kind: str = "onboarding",
                               extra: Mapping[str, str] | None = None) -> Connection:
        """What Sage does when a person picks a bank: the signed notification, then the ``/auth`` (or
        ``/authrefresh``) URL to frame, with a redirect_uri back to this page and a fresh state."""
        demo = self.demo
        authorisation_id = await demo.notifier.authorisation(bank.sage_bank_id)
        cid = uuid.uuid4().hex[:12]
        state = str(uuid.uuid4())
        redirect_uri = f"{demo.url.rstrip('/')}{REDIRECT_PATH}{cid}"
        params = {"bank": bank.sage_bank_id, "authorisation_id": authorisation_id, "redirect_uri": redirect_uri,
                  "state": state, **(extra or {})}
        path = "/authrefresh" if kind == "reauthorisation" else "/auth"
        connection = Connection(cid, bank, kind, authorisation_id, state, redirect_uri,
                                f"{demo.connector.url}{path}?{urlencode(params)}")
        self.connections[cid] = connection
        return connection

    async def connect(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        bank = self.demo.bank(str(form.get("bank", "")))
        if bank is None:
            raise web.HTTPBadRequest(text="Unknown bank")
        connection = await self.start_connection(bank, "onboarding")
        raise web.HTTPSeeOther(f"/connections/{connection.id}")

    async def reconnect(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        account = next((a for a in self.linked if a.external_id == form.get("externalId")), None)
        if account is None:
            raise web.HTTPBadRequest(text="Unknown account")
        connection = await self.start_connection(
            account.bank, "reauthorisation", {"externalId": account.external_id, "bankaccount": account.bank_account_id})
        raise web.HTTPSeeOther(f"/connections/{connection.id}")

    async def landing(self, request: web.Request) -> web.Response:
        """Sage's ``redirect_uri``: the journey ended (linked, cancelled or failed). Sage then tells the connector
        about each new bank account, as Sage does after an onboarding PATCH."""
        connection = self.connections.get(request.match_info["id"])
        if connection is None or request.query.getall("state", []) != [connection.state]:
            raise web.HTTPBadRequest(text="This return address doesn't match a connection started here.")
        if not connection.returned:
            connection.returned = True
            connection.returned_url = str(request.url)
            patch = self.demo.patch_for(connection.authorisation_id)
            if patch is not None and connection.kind == "onboarding":
                for account in patch.get("data", {}).get("bankAccounts", []):
                    external_id = account["bankAccountExternalId"]
                    bank_account_id = await self.demo.notifier.bank_account(external_id, connection.bank.sage_bank_id)
                    self.linked.append(LinkedAccount(connection.bank, external_id, bank_account_id,
                                                     account.get("accountName", external_id)))
        target = f"/connections/{connection.id}"
        body = (f'<h1>Back in the Sage product</h1><p><a href="{target}" target="_top">See what Sage received</a></p>'
                f'<script src="/static/demo.js" data-top="{target}"></script>')
        return self._page("Back in the Sage product", body, bare=True)

    async def script(self, request: web.Request) -> web.Response:
        del request
        # The landing page may be inside the iframe (or the top window after a bank's page): show the result on top.
        js = ("(function(){var s=document.currentScript;var t=s&&s.getAttribute('data-top');"
              "if(t){window.top.location.href=t;}})();")
        return web.Response(text=js, content_type="application/javascript")

    # --- pages ---

    async def home(self, request: web.Request) -> web.Response:
        del request
        banks = []
        for bank in self.demo.banks:
            hints = "".join(f"<li><strong>{html.escape(k)}</strong>: {html.escape(v)}</li>" for k, v in bank.hints)
            banks.append(f"""<li class="bank"><h3>{html.escape(bank.name)}</h3>
<p class="muted">Provider: {html.escape(self.demo.provider_title(bank.provider))}</p>
<ul class="hints">{hints}</ul>
<form method="post" action="/connect"><input type="hidden" name="bank" value="{html.escape(bank.sage_bank_id)}">
<button type="submit">Connect {html.escape(bank.name)}</button></form></li>""")
        body = f"""<h1>Bank feeds (demo Sage product)</h1>
<p>This page plays the part of a Sage product. Everything runs on this computer: the banks, ConnectPay, Powens and
Sage are local stand-ins, so no real credentials are needed.</p>
<p>Choose a bank: Sage tells the connector, then shows the connector's pages in a frame, as Sage does.</p>
{self._linked_html()}
<h2>Banks</h2><ul class="banks">{''.join(banks)}</ul>
{self._history_html()}"""
        return self._page("Bank feeds (demo)", body)

    def _linked_html(self) -> str:
        if not self.linked:
            return ""
        rows = []
        for account in self.linked:
            statements = self.demo.statements_for(account.bank_account_id)
            latest = ""
            if statements:
                latest = f"<details><summary>Latest statement</summary><pre>{_pretty(statements[-1])}</pre></details>"
            rows.append(f"""<tr><td>{html.escape(account.name)}</td><td>{html.escape(account.bank.name)}</td>
<td>{len(statements)}{latest}</td>
<td><form method="post" action="/reconnect"><input type="hidden" name="externalId"
value="{html.escape(account.external_id)}"><button type="submit" class="secondary"
aria-label="Reconnect {html.escape(account.name)}">Reconnect</button></form></td></tr>""")
        return f"""<h2>Linked accounts</h2>
<table><thead><tr><th scope="col">Account</th><th scope="col">Bank</th><th scope="col">Statements received</th>
<th scope="col"><span class="visually-hidden">Action</span></th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<p class="muted">“Reconnect” runs a re-authorisation (<code>/authrefresh</code>), as Sage does when a bank's consent
has ended. Statements arrive when the feed runs.</p>"""

    def _history_html(self) -> str:
        done = [c for c in self.connections.values() if c.returned]
        if not done:
            return ""
        items = "".join(f'<li><a href="/connections/{c.id}">{html.escape(c.bank.name)}: '
                        f'{"reconnect" if c.kind == "reauthorisation" else "connect"}</a> '
                        f'({self._outcome(c)})</li>' for c in reversed(done))
        return f"<h2>Earlier connections</h2><ul>{items}</ul>"

    def _outcome(self, connection: Connection) -> str:
        return "linked" if self.demo.patch_for(connection.authorisation_id) is not None else "nothing linked"

    async def connection(self, request: web.Request) -> web.Response:
        connection = self.connections.get(request.match_info["id"])
        if connection is None:
            raise web.HTTPNotFound(text="No such connection")
        verb = "Reconnect" if connection.kind == "reauthorisation" else "Connect"
        title = f"{verb} {connection.bank.name}"
        if not connection.returned:
            body = f"""<h1>{html.escape(title)}</h1>
<p><a href="/">Back to the bank list</a></p>
<iframe title="Connect your bank" src="{html.escape(connection.auth_url, quote=True)}"></iframe>"""
            return self._page(title, body, wide=True)
        patch = self.demo.patch_for(connection.authorisation_id)
        if patch is None:
            received = ("<p>Sage received <strong>no PATCH</strong>: the person came back without linking "
                        "(cancelled, or the bank refused).</p>")
        else:
            received = f"<p>Sage received this PATCH for authorisation {html.escape(connection.authorisation_id)}:" \
                       f"</p><pre>{_pretty(patch)}</pre>"
        body = f"""<h1>{html.escape(title)}: back in Sage</h1>
{received}
<p>The person came back to: <code>{html.escape(connection.returned_url)}</code></p>
<p><a href="/">Back to the bank list</a></p>"""
        return self._page(title, body)

    def _page(self, title: str, body: str, *, wide: bool = False, bare: bool = False) -> web.Response:
        style = "" if bare else """<style>
body{margin:0;font-family:system-ui,sans-serif;color:#1b1b1b;line-height:1.5}
header{background:#00273d;color:#fff;padding:.75rem 1rem;font-weight:700}
main{max-width:%s;margin:0 auto;padding:0 1rem 2rem}
h1{font-size:1.6rem} .muted{color:#4a4a4a} .banks{list-style:none;padding:0;display:grid;gap:1rem;
grid-template-columns:repeat(auto-fill,minmax(17rem,1fr))} .bank{border:1px solid #6b6b6b;padding:0 1rem 1rem}
.hints{padding-left:1.2rem;font-size:.95rem;margin-bottom:1rem} button{font:inherit;font-weight:600;padding:.5rem 1rem;
background:#00636b;color:#fff;border:2px solid #00636b;border-radius:4px;cursor:pointer}
button.secondary{background:#fff;color:#004a50} a{color:#004a50}
:focus-visible{outline:3px solid #1b1b1b;outline-offset:2px;box-shadow:0 0 0 6px #ffbf47}
table{border-collapse:collapse;width:100%%} th,td{text-align:left;border-bottom:1px solid #6b6b6b;padding:.4rem}
pre{background:#f3f3f3;padding:.75rem;overflow:auto;font-size:.85rem;max-width:100%%}
iframe{display:block;width:100%%;height:44rem;border:1px solid #6b6b6b}
.visually-hidden{position:absolute!important;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
</style>""" % ("64rem" if wide else "52rem")
        header = "" if bare else "<header>Sage (demo product)</header>"
        page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>{style}
</head><body>{header}<main>{body}</main></body></html>"""
        return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def _pretty(value: Any) -> str:
    def plain(v: Any) -> Any:
        if isinstance(v, Decimal):
            return str(v)
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list):
            return [plain(x) for x in v]
        return v

    return html.escape(json.dumps(plain(value), indent=2, ensure_ascii=False))


# --- the demo ------------------------------------------------------------------------------------------------------


class Demo:
    """Everything ``connector demo`` runs. ``port``: the product page (0: any free port); ``connector_port``: the
    connector (0: any free port). ``stacks``: which providers to run (default: all that start)."""

    def __init__(self, *, port: int = 0, connector_port: int = 0, host: str = "localhost",
                 stacks: Sequence[StackFactory] = STACKS, feed: bool = True, quiet: bool = False) -> None:
        self.port = port
        self.connector_port = connector_port
        self.host = host
        self.factories = stacks
        self.feed = feed
        self.quiet = quiet
        self.sage = SageEmulator()  # rate limited like Sage
        self.stacks: list[ProviderStack] = []
        self.connector: RunningConnector = None  # type: ignore[assignment]
        self.notifier: SageNotifier = None  # type: ignore[assignment]
        self.site = ProductSite(self)
        self.url = ""
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None

    @property
    def banks(self) -> list[DemoBank]:
        return [bank for stack in self.stacks for bank in stack.banks]

    def bank(self, sage_bank_id: str) -> DemoBank | None:
        return next((b for b in self.banks if b.sage_bank_id == sage_bank_id), None)

    def provider_title(self, provider: str) -> str:
        return str(self.connector.app.ctx.provider_titles.get(provider, provider))

    def patch_for(self, authorisation_id: str) -> Any:
        found = [p.body for p in self.sage.patches if p.authorisation_id == authorisation_id]
        return found[-1] if found else None

    def statements_for(self, bank_account_id: str) -> list[Any]:
        return [s for s in self.sage.statements
                if isinstance(s, dict) and s.get("data", {}).get("principalId") == bank_account_id]

    async def start(self) -> Self:
        self._tmp = tempfile.TemporaryDirectory(prefix="connector-demo-")
        folder = Path(self._tmp.name)
        try:
            await self.sage.start()
            plugins = load_plugins()
            self.stacks = await start_stacks(folder, self.factories, plugins)
            endpoints = SageEndpoints(self.sage.base_url, self.sage.client_id, self.sage.client_secret,
                                      self.sage.api_key)
            port = self.connector_port or free_port()
            providers = {s.provider: s.config for s in self.stacks}
            config = connector_config(
                endpoints, database_url=f"sqlite://{folder}/connector.sqlite3", port=port,
                banks=[b.config() for b in self.banks], providers=providers,
                extra={"feed": {"enabled": self.feed, "interval_seconds": 15},
                       "logging": {"level": "INFO", "format": "text"}})
            self.connector = RunningConnector(settings_from(config), plugins)
            if self.quiet:
                _quiet_sanic()
            await self.connector.start()
            for stack in self.stacks:
                if stack.on_connector:
                    stack.on_connector(self.connector.url)
            self._http = aiohttp.ClientSession()
            self.notifier = SageNotifier(self.sage, self.connector, self._http)
            self._runner = web.AppRunner(self.site.app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
            self.port = self._runner.addresses[0][1]
            self.url = f"http://{self.host}:{self.port}/"
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.connector is not None:
            await self.connector.stop()
        for stack in self.stacks:
            if stack.close:
                with contextlib.suppress(Exception):
                    await stack.close()
        await self.sage.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _quiet_sanic() -> None:
    """Sanic's start-up banner and info lines would bury the one URL the demo prints."""
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.WARNING)


async def serve(port: int, connector_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with Demo(port=port, connector_port=connector_port, quiet=True) as demo:
        names = ", ".join(b.name for b in demo.banks)
        print(f"Demo banks: {names}", file=sys.stderr)
        print(f"Connector: {demo.connector.url} (stop with Ctrl+C)", file=sys.stderr)
        print(demo.url, flush=True)
        await stop.wait()


def run(port: int = 8400, connector_port: int = 0) -> int:
    from connector.logs import setup_logging

    setup_logging("WARNING", "text")
    try:
        asyncio.run(serve(port, connector_port))
    except OSError as exc:
        print(f"connector demo: {exc}", file=sys.stderr)
        return 1
    return 0
