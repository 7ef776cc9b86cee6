"""Operator endpoints: health, readiness and metrics."""

from __future__ import annotations

import json
import logging
from urllib.parse import urlsplit

import aiohttp

from connector.logs import JsonFormatter
from connector.testing.driver import Driver
from connector.testing.fixtures import REDIRECT_PATH


async def test_health_answers(connector, http):
    async with http.get(f"{connector.url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


async def test_ready_checks_database_and_jwks(connector, http):
    async with http.get(f"{connector.url}/ready") as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["checks"] == {"config": True, "database": True, "jwks": True}


async def test_ready_fails_when_the_key_set_cannot_be_fetched(sage, connector_factory, http):
    connector = await connector_factory(extra={"sage": {"jwks_url": "http://127.0.0.1:9/.well-known/jwks.json"}})
    async with http.get(f"{connector.url}/ready") as resp:
        body = await resp.json()
    assert resp.status == 503
    assert body["checks"]["jwks"] is False


async def test_metrics_count_requests_and_token_failures(connector, sage_calls, http):
    await sage_calls.announce()
    status, _ = await sage_calls.notify({}, headers=sage_calls.headers(token="not.a.token"))
    assert status == 401
    async with http.get(f"{connector.url}/metrics") as resp:
        text = await resp.text()
    assert resp.status == 200
    assert 'connector_token_failures_total{reason="malformed"} 1.0' in text
    assert 'connector_http_requests_total{route="notification",status="200"} 1.0' in text
    assert 'connector_notifications_total{new="true",type="resourceCreated:authorisation"} 1.0' in text


async def test_a_request_id_follows_a_page_into_its_sage_calls(connector, sage, sage_calls, http):
    """The id a proxy gives a request (X-Request-ID) is sent back and carried by every log line written while
    serving it, down to the calls to Sage it makes; another request gets an id of its own."""
    lines: list[dict] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(JsonFormatter().format(record)))  # formatted as it happens, as in production

    handler = Collect(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        authorisation_id = await sage_calls.announce()
        page = await Driver(http, stop_at=(sage.base_url + REDIRECT_PATH,)).get(sage_calls.auth_url(authorisation_id))
        traced = aiohttp.ClientSession(headers={"X-Request-ID": "trace-7f3a9c"})
        async with traced:
            browser = Driver(traced, stop_at=(sage.base_url + REDIRECT_PATH,))
            page = await browser.submit(page, {"User name": "anna", "Password": "pw"}, button="Sign in")
            lines.clear()
            done = await browser.submit(page, button="Share with Sage")
        assert done.left_to and sage.patches
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    sage_calls_logged = [line for line in lines if line["message"] == "outbound call"
                         and line.get("origin", "").endswith(f":{urlsplit(sage.base_url).port}")]
    assert sage_calls_logged, lines
    assert {line.get("request_id") for line in sage_calls_logged} == {"trace-7f3a9c"}
    assert any(line["kind"] == "PATCH" and 200 <= line["status"] < 300 for line in sage_calls_logged)
    async with http.get(f"{connector.url}/health", headers={"X-Request-ID": "bad id with spaces"}) as resp:
        given = resp.headers["X-Request-ID"]
    assert given != "bad id with spaces" and given.isalnum()


async def test_metrics_count_how_journeys_end(connector, sage_calls, browser, http):
    await sage_calls.onboard(browser)
    page = await browser.get(sage_calls.auth_url(await sage_calls.announce()))
    page = await browser.submit(page, {"User name": "otp", "Password": "pw"}, button="Sign in")
    page = await browser.submit(page, button="Cancel and go back to Sage")
    assert page.h1 == "You cancelled connecting your bank"
    async with http.get(f"{connector.url}/metrics") as resp:
        text = await resp.text()
    assert 'connector_journeys_total{kind="onboarding",outcome="done"} 1.0' in text
    assert 'connector_journeys_total{kind="onboarding",outcome="cancelled"} 1.0' in text
