"""Fixtures for the browser tests: Chromium (Debian's ``/usr/bin/chromium``) through Playwright's async API, a Sage
product page on ``http://localhost:<port>`` that frames the connector on ``http://127.0.0.1:<port>``, and a connector
running every provider stack of ``connector.demo`` (Demo Bank, ConnectPay; Powens once its stack is listed here).

To add a provider's browser flows: give ``connector/demo.py`` a ``<name>_stack`` (emulator, config, banks), add it to
``BROWSER_STACKS`` below, and walk its pages with :class:`harness.Person` as ``test_connectpay.py`` does.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
from harness import CHROMIUM, LAUNCH_ARGS, Person, SageSite, new_person
from playwright.async_api import Browser, async_playwright

from connector.demo import ProviderStack, connectpay_stack, demobank_stack
from connector.testing.connector import RunningConnector
from connector.testing.fixtures import ConnectorFactory, SageCalls

BROWSER_STACKS = (demobank_stack, connectpay_stack)

if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
    pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's chromium package)", allow_module_level=True)


@pytest.fixture
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        yield browser
        await browser.close()


@pytest.fixture
async def site() -> AsyncIterator[SageSite]:
    s = await SageSite().start()
    yield s
    await s.stop()


@pytest.fixture
async def stacks(tmp_path) -> AsyncIterator[dict[str, ProviderStack]]:
    started = {}
    for factory in BROWSER_STACKS:
        stack = await factory(tmp_path)
        assert stack is not None
        started[stack.provider] = stack
    yield started
    for stack in started.values():
        if stack.close:
            await stack.close()


@pytest.fixture
async def connector(connector_factory: ConnectorFactory, stacks: dict[str, ProviderStack]) -> RunningConnector:
    """The connector with every bank of every stack (replaces the Demo-Bank-only connector of the core fixtures)."""
    running = await connector_factory(
        banks=[bank.config() for stack in stacks.values() for bank in stack.banks],
        providers={stack.provider: stack.config for stack in stacks.values()})
    for stack in stacks.values():
        if stack.on_connector:
            stack.on_connector(running.url)
    return running


@pytest.fixture
async def person(chromium: Browser, site: SageSite) -> AsyncIterator[Person]:
    """A person in a desktop-sized tab. At the end, no Content-Security-Policy violation may have been reported."""
    someone, context = await new_person(chromium, site)
    yield someone
    await context.close()
    if not getattr(someone, "csp_expected", False):
        assert someone.csp_violations == [], someone.csp_violations


@pytest.fixture
def sage_calls(sage, connector: RunningConnector, http) -> SageCalls:
    return SageCalls(sage, connector.endpoints, connector.url, http)  # type: ignore[attr-defined]
