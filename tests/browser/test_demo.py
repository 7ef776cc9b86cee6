"""``connector demo`` end to end: start it on free ports, open the one URL it prints in Chromium, link Demo Bank
through the iframe, see what Sage received, then reconnect (re-authorisation)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from playwright.async_api import Browser, Page, expect

from connector.demo import Demo
from connector.testing.connector import free_port


@pytest_asyncio.fixture(loop_scope="session")
async def demo() -> AsyncIterator[Demo]:
    async with Demo(port=free_port(), connector_port=free_port()) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def tab(chromium: Browser) -> AsyncIterator[Page]:
    context = await chromium.new_context(viewport={"width": 1280, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(10_000)
    yield page
    await context.close()


async def test_demo_links_demo_bank_and_reconnects(demo: Demo, tab: Page) -> None:
    assert demo.url.startswith("http://localhost:")
    assert demo.connector.url.startswith("http://127.0.0.1:")  # another origin, as Sage and we are
    await tab.goto(demo.url)
    await expect(tab.get_by_role("heading", level=1)).to_have_text("Bank feeds (demo Sage product)")
    for name in ("Demo Bank", "ConnectPay", "ConnectPay Business"):
        await expect(tab.get_by_role("button", name=f"Connect {name}", exact=True)).to_be_visible()
    await expect(tab.get_by_text("asks for a security code: 123456")).to_be_visible()

    await tab.get_by_role("button", name="Connect Demo Bank").click()
    frame = tab.frame_locator("iframe[title='Connect your bank']")
    await expect(frame.locator("h1")).to_have_text("Sign in to Demo Bank")
    await frame.get_by_label("User name").fill("alice")
    await frame.get_by_label("Password").fill("secret")
    await frame.get_by_role("button", name="Sign in").click()
    await frame.get_by_role("button", name="Share with Sage").click()

    # Back in the product (top window): what Sage received.
    await expect(tab.get_by_role("heading", level=1)).to_have_text("Connect Demo Bank: back in Sage")
    await expect(tab.locator("pre")).to_contain_text('"bankAccounts"')
    assert len(demo.sage.patches) == 1
    assert len(demo.site.linked) == 2  # Sage announced each new bank account to the connector

    await tab.get_by_role("link", name="Back to the bank list").click()
    await tab.get_by_role("button", name=f"Reconnect {demo.site.linked[0].name}").click()
    await expect(frame.locator("h1")).to_have_text("Sign in to Demo Bank")
    await frame.get_by_label("User name").fill("alice")
    await frame.get_by_label("Password").fill("secret")
    await frame.get_by_role("button", name="Sign in").click()
    await frame.get_by_role("button", name="Reconnect").click()
    await expect(tab.get_by_role("heading", level=1)).to_have_text("Reconnect Demo Bank: back in Sage")
    await expect(tab.locator("pre")).to_contain_text('"status": "success"')
    assert demo.sage.patches[-1].body == {"data": {"status": "success"}}


async def test_connector_demo_command_prints_one_url() -> None:
    """The command itself: starts, prints one URL on stdout, stops on Ctrl+C."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "connector.cli", "demo", "--port", str(port), "--connector-port", str(free_port()),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        cwd=Path(__file__).resolve().parents[2])
    try:
        line = await asyncio.wait_for(process.stdout.readline(), timeout=30)  # type: ignore[union-attr]
        assert line.decode().strip() == f"http://localhost:{port}/"
    finally:
        process.send_signal(signal.SIGINT)
        rest, _ = await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 0
    assert rest.decode().strip() == ""
