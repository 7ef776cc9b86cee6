"""Fixtures for the browser tests: Chromium (Debian's ``/usr/bin/chromium``) through Playwright's async API, a Sage
product page on ``http://localhost:<port>`` that frames the connector on ``http://127.0.0.1:<port>``, and a connector
running the provider stacks of ``connector.demo`` listed in ``BROWSER_STACKS``.

Every browser test runs in one session-wide event loop so that one Chromium serves them all; each test still gets
its own Sage stand-in, provider emulators, connector (fresh SQLite) and browser context.

To add a provider's browser flows: give ``connector/demo.py`` a ``<name>_stack`` (emulator, config, banks), add it
to ``BROWSER_STACKS`` below, and walk its pages with :class:`harness.Person` the way ``test_connectpay.py`` and
``test_powens.py`` do (``announce_and_link`` → ``person.open`` → labels and button names → ``person.check`` on every
state → ``expect_linked`` or ``expect_back_at_sage``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

pytest.importorskip("playwright", reason="pip install -e '.[test]' (Playwright drives Debian's Chromium)")
pytest.importorskip("axe_playwright_python", reason="pip install -e '.[test]'")

from harness import CHROMIUM, LAUNCH_ARGS, Person, SageSite, new_person
from playwright.async_api import Browser, async_playwright

from connector.demo import (
    ProviderStack,
    StackFactory,
    connectpay_stack,
    demobank_stack,
    powens_stack,
)
from connector.plugins import Plugins
from connector.testing.connector import (
    RunningConnector,
    SageEndpoints,
    connector_config,
    free_port,
    settings_from,
)
from connector.testing.sage import SageEmulator

#: Sage's id for the Powens bank with two sources (credentials, then webauth), which only the browser tests add.
BROWSER_STACKS: tuple[StackFactory, ...] = (demobank_stack, connectpay_stack, powens_stack)
LOOP = "session"
HERE = Path(__file__).resolve().parent

def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    marker = pytest.mark.asyncio(loop_scope=LOOP)
    missing = None if os.path.exists(CHROMIUM) else pytest.mark.skip(
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CONNECTOR_CHROMIUM)")
    for item in items:
        if HERE not in Path(str(item.path)).resolve().parents:
            continue
        if missing is not None:
            item.add_marker(missing)
        if pytest_asyncio.is_async_test(item):
            item.add_marker(marker, append=False)


@pytest_asyncio.fixture(scope="session", loop_scope=LOOP)
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        await browser.close()


# The core fixtures (connector.testing.fixtures), again, in the session loop the browser lives in. The kit's
# ``sage_calls`` is a plain function, so it serves here as it is, on these.


@pytest_asyncio.fixture(loop_scope=LOOP)
async def sage() -> AsyncIterator[SageEmulator]:
    async with SageEmulator(rate=None) as emulator:
        yield emulator


@pytest_asyncio.fixture(loop_scope=LOOP)
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(loop_scope=LOOP)
async def site(sage: SageEmulator) -> AsyncIterator[SageSite]:
    s = await SageSite(patch_count=lambda: len(sage.patches)).start()
    yield s
    await s.stop()


@pytest_asyncio.fixture(loop_scope=LOOP)
async def stacks(tmp_path: Path) -> AsyncIterator[dict[str, ProviderStack]]:
    started: dict[str, ProviderStack] = {}
    for factory in BROWSER_STACKS:
        stack = await factory(tmp_path)
        assert stack is not None, factory
        started[stack.provider] = stack
    yield started
    for stack in started.values():
        if stack.close:
            await stack.close()


@pytest_asyncio.fixture(loop_scope=LOOP)
async def connector_factory(sage: SageEmulator, plugins: Plugins, stacks: dict[str, ProviderStack],
                            tmp_path: Path) -> AsyncIterator[Any]:
    """Start a connector with every bank of every stack; ``extra`` overrides config sections."""
    running: list[RunningConnector] = []

    async def start(*, extra: dict[str, dict[str, Any]] | None = None) -> RunningConnector:
        endpoints = SageEndpoints(sage.base_url, sage.client_id, sage.client_secret, sage.api_key)
        config = connector_config(
            endpoints, database_url=f"sqlite://{tmp_path}/connector-{len(running)}.sqlite3", port=free_port(),
            banks=[bank.config() for stack in stacks.values() for bank in stack.banks],
            providers={stack.provider: stack.config for stack in stacks.values()}, extra=extra)
        connector = RunningConnector(settings_from(config), plugins, endpoints=endpoints)
        await connector.start()
        running.append(connector)
        for stack in stacks.values():
            if stack.on_connector:
                stack.on_connector(connector.url)
        return connector

    yield start
    for connector in reversed(running):
        await connector.stop()


@pytest_asyncio.fixture(loop_scope=LOOP)
async def connector(connector_factory: Any) -> RunningConnector:
    return await connector_factory()


@pytest_asyncio.fixture(loop_scope=LOOP)
async def person(chromium: Browser, site: SageSite) -> AsyncIterator[Person]:
    """A person in a desktop-sized tab. At the end, no Content-Security-Policy violation may have been reported."""
    someone, context = await new_person(chromium, site)
    yield someone
    await context.close()
    if not someone.csp_expected:
        assert someone.csp_violations == [], someone.csp_violations


@pytest_asyncio.fixture(loop_scope=LOOP)
async def no_js(chromium: Browser, site: SageSite) -> AsyncIterator[Person]:
    """A person whose browser runs no JavaScript at all (``person.check`` then checks a copy of each page)."""
    someone, context = await new_person(chromium, site, java_script_enabled=False)
    yield someone
    await context.close()
    assert someone.csp_violations == [], someone.csp_violations
