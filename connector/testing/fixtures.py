"""pytest fixtures for the connector's own tests and for third-party provider authors.

This module is a pytest plugin, registered through the ``pytest11`` entry point of the ``sage-banking-connector``
distribution: once the connector is installed, every pytest run in that environment has these fixtures, with no
``conftest.py`` line. (With ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, load it with ``-p connector.testing.fixtures``.)

* ``sage`` — the Sage stand-in (Sage ID + Provider API) on loopback;
* ``plugins`` — the plugin manager the connector uses: built-ins, installed entry points, and the plugins named by
  the ``connector_plugins`` marker or the ``provider_plugins`` fixture;
* ``connector_factory`` — start a real connector against it with the banks and providers you name;
* ``connector`` — one connector with Demo Bank (override it to map your own banks and providers);
* ``sage_calls`` — sign and send notifications as Sage would, and walk Demo Bank's onboarding (:class:`SageCalls`);
* ``browser`` — a :class:`~connector.testing.driver.Driver` that walks pages by labels and button names;
* ``feed`` — the running connector's statement feed with short waits: ``await feed.run_once()``.

Registering your plugin for a test module (your package need not be installed)::

    import mybank_connector

    pytestmark = pytest.mark.connector_plugins(mybank_connector)

or for a whole folder, in its ``conftest.py``::

    @pytest.fixture
    def provider_plugins():
        return (mybank_connector,)
"""

from __future__ import annotations

import importlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest

from connector.plugins import Plugins, load_plugins
from connector.testing.connector import (
    RunningConnector,
    SageEndpoints,
    connector_config,
    free_port,
    settings_from,
)
from connector.testing.driver import Driver
from connector.testing.sage import SageEmulator

if TYPE_CHECKING:
    from connector.feed import Feed

DEMO_BANK_ID = "10aaeee6-4691-4443-8198-df39aaa8007c"
REDIRECT_PATH = "/api/v1/indirectredirect/"
CHOOSE_ACCOUNTS = "Choose the accounts to share with Sage"


@dataclass(frozen=True)
class Onboarded:
    """A finished onboarding: the authorisation Sage announced, and the bank accounts the connector's PATCH named."""

    authorisation_id: str
    bank_accounts: list[dict[str, Any]]  # ``data.bankAccounts`` of the PATCH, as Sage received it

    @property
    def external_ids(self) -> list[str]:
        return [account["bankAccountExternalId"] for account in self.bank_accounts]


@dataclass
class SageCalls:
    """Calls Sage makes on the connector: signed notifications, then the browser's ``/auth`` URL."""

    sage: SageEmulator
    endpoints: SageEndpoints
    connector_url: str
    http: aiohttp.ClientSession
    #: Awaited after a bank-account notification is answered, so that what it starts is done when the call returns
    #: (``RunningConnector.settle`` for a connector in this process; ``None`` for one in another process).
    settle: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def for_connector(cls, sage: SageEmulator, connector: RunningConnector, http: aiohttp.ClientSession) -> SageCalls:
        """Sage's calls on a connector running in this process (so they wait for its work after each answer)."""
        return cls(sage, connector.endpoints, connector.url, http, connector.settle)

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {token or self.sage.identity.notification_token()}",
            "Content-Type": "application/json",
            self.endpoints.notification_header_name: self.endpoints.notification_header_value,
        }

    async def notify(self, body: Mapping[str, Any], *, headers: Mapping[str, str] | None = None,
                     raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.http.post(f"{self.connector_url}/notification", data=data,
                                  headers=dict(headers or self.headers())) as resp:
            return resp.status, await resp.json(content_type=None)

    async def announce(self, bank_id: str = DEMO_BANK_ID, authorisation_id: str | None = None) -> str:
        """Send the 'authorisation created' notification; return the authorisation id."""
        authorisation_id = authorisation_id or str(uuid.uuid4())
        status, body = await self.notify({
            "type": "resourceCreated",
            "resource": {"id": authorisation_id, "type": "authorisation", "url": "NA"},
            "additionalData": {"bankId": bank_id},
        })
        assert status == 200, body
        return authorisation_id

    async def account_created(self, external_id: str, bank_account_id: str | None = None,
                              requested_start_date: str | None = "2025-01-01T00:00:00Z",
                              bank_id: str = DEMO_BANK_ID) -> str:
        bank_account_id = bank_account_id or str(uuid.uuid4())
        extra = {"externalId": external_id, "bankId": bank_id}
        if requested_start_date:
            extra["requestedStartDate"] = requested_start_date
        status, body = await self.notify({"type": "resourceCreated",
                                          "resource": {"id": bank_account_id, "type": "bankAccount", "url": ""},
                                          "additionalData": extra})
        assert status == 200, body
        if self.settle is not None:
            await self.settle()
        return bank_account_id

    async def account_deleted(self, bank_account_id: str, external_id: str, bank_id: str = DEMO_BANK_ID) -> None:
        status, body = await self.notify({"type": "resourceDeleted",
                                          "resource": {"id": bank_account_id, "type": "bankAccount", "url": "NA"},
                                          "additionalData": {"externalId": external_id, "bankId": bank_id}})
        assert status == 200, body
        if self.settle is not None:
            await self.settle()

    async def onboard(self, browser: Driver, user: str = "alice", *, password: str = "secret",
                      bank_id: str = DEMO_BANK_ID) -> Onboarded:
        """Link a bank as a person does, on Demo Bank's form: Sage announces the authorisation, the person opens
        ``/auth``, signs in with "User name" and "Password", shares every account offered, and is back at Sage.

        The share step is skipped when the bank sends the person back at once after signing in. Returns what the
        connector told Sage in its PATCH.
        """
        authorisation_id = await self.announce(bank_id)
        page = await browser.get(self.auth_url(authorisation_id, bank_id=bank_id))
        assert page.status == 200, page.text
        page = await browser.submit(page, {"User name": user, "Password": password}, button="Sign in")
        if page.left_to is None:
            assert page.h1 == CHOOSE_ACCOUNTS, page.text
            page = await browser.submit(page, button="Share with Sage")
        assert page.left_to is not None, page.text
        patch = next(p for p in reversed(self.sage.patches) if p.authorisation_id == authorisation_id)
        return Onboarded(authorisation_id, patch.body["data"]["bankAccounts"])

    def redirect_uri(self) -> str:
        return f"{self.sage.base_url}{REDIRECT_PATH}{uuid.uuid4()}"

    def auth_url(self, authorisation_id: str, *, bank_id: str = DEMO_BANK_ID, state: str | None = None,
                 redirect_uri: str | None = None, path: str = "/auth", **extra: str) -> str:
        from urllib.parse import urlencode

        params = {"bank": bank_id, "authorisation_id": authorisation_id,
                  "redirect_uri": redirect_uri or self.redirect_uri(), "state": state or str(uuid.uuid4()), **extra}
        return f"{self.connector_url}{path}?{urlencode(params)}"


@pytest.fixture
async def sage() -> AsyncIterator[SageEmulator]:
    async with SageEmulator(rate=None) as emulator:
        yield emulator


MARKER = "connector_plugins"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*plugins): register these provider plugins (modules, objects or dotted names) with the test's "
        "connector, besides the built-ins and installed entry points",
    )


@pytest.fixture
def provider_plugins(request: pytest.FixtureRequest) -> tuple[Any, ...]:
    """Extra provider plugins for the ``plugins`` fixture: by default those named by the ``connector_plugins``
    marker (closest first). Override it in a ``conftest.py`` to register your plugin for a whole folder."""
    found: list[Any] = []
    for marker in request.node.iter_markers(MARKER):
        for plugin in marker.args:
            plugin = importlib.import_module(plugin) if isinstance(plugin, str) else plugin
            if plugin not in found:
                found.append(plugin)
    return tuple(found)


@pytest.fixture
def plugins(provider_plugins: tuple[Any, ...]) -> Plugins:
    """The plugin manager the connector uses: built-ins and installed entry points, then ``provider_plugins``
    (a plugin already loaded through its entry point is not registered twice). Override it to choose exactly."""
    loaded = load_plugins()
    for plugin in provider_plugins:
        if not loaded.pm.is_registered(plugin):
            loaded.register(plugin, f"test: {getattr(plugin, '__name__', type(plugin).__name__)}")
    loaded.pm.check_pending()
    return loaded


ConnectorFactory = Callable[..., Awaitable[RunningConnector]]

DEMO_BANKS: Sequence[Mapping[str, Any]] = (
    {"sage_bank_id": DEMO_BANK_ID, "name": "Demo Bank", "provider": "demobank"},
)


#: Set to a PostgreSQL server URL (``postgres://user@host:port``) to run the suite on PostgreSQL: each test then
#: gets a fresh database on that server, dropped afterwards.
POSTGRES_ENV = "CONNECTOR_TEST_POSTGRES"


@pytest.fixture
async def database_url(tmp_path) -> AsyncIterator[str]:
    server = os.environ.get(POSTGRES_ENV)
    if not server:
        yield f"sqlite://{tmp_path}/connector.sqlite3"
        return
    import asyncpg

    name = f"connector_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(f"{server.rstrip('/')}/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield f"{server.rstrip('/')}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def connector_factory(sage: SageEmulator, plugins: Plugins, database_url: str
                            ) -> AsyncIterator[ConnectorFactory]:
    running: list[RunningConnector] = []

    async def start(*, banks: Sequence[Mapping[str, Any]] = DEMO_BANKS,
                    providers: Mapping[str, Mapping[str, Any]] | None = None,
                    database: str | None = None, extra: Mapping[str, Mapping[str, Any]] | None = None,
                    endpoints: SageEndpoints | None = None) -> RunningConnector:
        endpoints = endpoints or SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key)
        config = connector_config(
            endpoints, database_url=database or database_url, port=free_port(),
            banks=banks, providers=providers if providers is not None else {"demobank": {}}, extra=extra)
        connector = RunningConnector(settings_from(config), plugins, endpoints=endpoints)
        running.append(await connector.start())
        return connector

    yield start
    for connector in reversed(running):
        await connector.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def connector(connector_factory: ConnectorFactory) -> RunningConnector:
    return await connector_factory()


@pytest.fixture
def sage_calls(sage: SageEmulator, connector: RunningConnector, http: aiohttp.ClientSession) -> SageCalls:
    return SageCalls.for_connector(sage, connector, http)


@pytest.fixture
def browser(http: aiohttp.ClientSession, sage: SageEmulator) -> Driver:
    return Driver(http, stop_at=(sage.base_url + REDIRECT_PATH,))


#: Waits of the ``feed`` fixture: a statement is polled after 50 ms, a failed read retried after 10 ms.
FAST_FEED: dict[str, float] = {
    "poll_first": 0.05, "poll_cap": 0.2, "late_poll": 0.5, "failed_backoff": 0.2, "failed_backoff_cap": 1.0,
    "read_retry": 0.01, "read_retry_cap": 0.05, "read_backoff": 0.3, "read_backoff_cap": 1.0,
}


@pytest.fixture
def feed(connector: RunningConnector) -> Feed:
    """The running connector's statement feed (its providers, database and Sage client), with short waits.

    ``report = await feed.run_once()`` reads every linked account and sends its statements to the ``sage``
    emulator; ``report.ok``, ``report.outcomes[bank_account_id]`` and ``sage.statements`` tell what happened.
    """
    from connector.feed import Feed, FeedOptions

    ctx = connector.app.ctx
    return Feed(connector.settings, ctx.providers, ctx.box, ctx.sage,
                options=FeedOptions.from_settings(connector.settings, **FAST_FEED))
